"""The benchmark's timing loop: implementations of a case take turns."""

import time

from bnkernels import _bench


def test_implementations_take_turns_until_each_meets_its_budget():
    calls = []

    def fn(name):
        return lambda: calls.append(name)

    budget = _bench.Budget(seconds=0.0, min_repeats=5, max_repeats=50)
    result = _bench.measure_turns({"a": fn("a"), "b": fn("b"), "c": fn("c")}, budget)
    # one warm-up call each, then rounds of one call each, the first place rotating
    assert calls[:3] == ["a", "b", "c"]
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a"]
    assert {name: t.repeats for name, t in result.items()} == {"a": 5, "b": 5, "c": 5}
    assert all(t.median >= 0 and t.iqr >= 0 for t in result.values())


def test_a_slow_implementation_leaves_the_rounds_when_its_time_is_spent():
    calls = []
    slow_calls = []

    def slow():
        time.sleep(0.01)  # at least 10 ms a call; the budget is 25 ms
        slow_calls.append(1)

    budget = _bench.Budget(seconds=0.025, min_repeats=2, max_repeats=40)
    result = _bench.measure_turns({"fast": lambda: calls.append(1), "slow": slow}, budget)
    assert result["slow"].repeats == 3  # the third call of >= 10 ms passes 25 ms
    assert result["fast"].repeats == 40  # stops at the maximum count
    assert result["slow"].median >= 0.01
    assert len(slow_calls) == result["slow"].repeats + 1  # and one warm-up
    assert len(calls) == 41


def test_measure_is_one_implementation_taking_every_turn():
    calls = []
    t = _bench.measure(lambda: calls.append(1), _bench.Budget(0.0, 3, 10))
    assert t.repeats == 3 and len(calls) == 4


def test_the_load_report_has_every_pass_and_thread_setting_and_the_control():
    """run_load on the smallest case without busy processes: per pass the settings it
    promises (backward: 1 thread, every core, the default; forward: 1 and the default; the
    controls, the roofline and a spin as long as the quiet backward: 1 thread only), each
    with p50 <= p99 over at least LOAD_MIN_CALLS calls, and format_load has a line for
    each."""
    case = _bench.LOAD_CASES[0]
    records = _bench.run_load(0, [case], 0.01)
    cores = str(_bench.usable_cores())
    got = [(r["pass"], r["threads"]) for r in records]
    want = [("backward", "1")]
    want += [("backward", cores)] + [("backward", "default"), ("forward", "1")]
    want += [("forward", "default"), ("roofline", "1"), ("spin", "1")]
    assert got == want
    spin, backward = records[-1], records[0]
    # the spin lasts the quiet backward's median (its own quiet median at least that)
    assert spin["quiet_1_thread_median_s"] >= backward["quiet_1_thread_median_s"]
    for r in records:
        assert r["case"] == case.name and r["busy"] == 0
        assert 0 < r["p50_s"] <= r["p99_s"]
        assert r["calls"] >= _bench.LOAD_MIN_CALLS
        assert r["quiet_1_thread_median_s"] > 0
    table = _bench.format_load(records).splitlines()
    assert len(table) == 2 + len(records)
    assert all(line.split()[1:3] == [p, t] for line, (p, t) in zip(table[2:], got))
