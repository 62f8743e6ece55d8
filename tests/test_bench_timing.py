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
