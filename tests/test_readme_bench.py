"""README's benchmark summary and docs/bench.md are generated from the recorded run in
docs/bench.json by bench/report.py:

    python bench/report.py --write    # rewrite README's block and docs/bench.md

docs/bench.json is written by ``python -m bnkernels bench --json docs/bench.json``.  The
tests fail when README's block or docs/bench.md differs from what that file produces, so
every number in them comes from a recorded run.
"""

import importlib.util
import json
import os

import pytest

from bnkernels import _bench

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIX = "run `python bench/report.py --write`"


def _load_report():
    """bench/report.py, imported by path (bench/ is no installed package)."""
    path = os.path.join(ROOT, "bench", "report.py")
    spec = importlib.util.spec_from_file_location("_bnkernels_bench_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report()


def _recorded_run():
    with open(report.RUN, encoding="utf-8") as f:
        return json.load(f)


def test_readme_benchmark_summary_is_current():
    with open(report.README, encoding="utf-8") as f:
        block = report.read_block(f.read())
    assert block == report.readme_block(_recorded_run()), (
        "README's benchmark summary is out of date: " + FIX
    )
    assert len(block.encode()) <= 1200, "README's benchmark summary should stay compact"


def test_docs_bench_md_is_current():
    with open(report.BENCH_MD, encoding="utf-8") as f:
        text = f.read()
    assert text == report.bench_md(_recorded_run()), "docs/bench.md is out of date: " + FIX


def _record(case, pass_, impl, ms, shape=(1024, 1024), dtype="float32"):
    return {
        "case": case,
        "shape": list(shape),
        "dtype": dtype,
        "pass": pass_,
        "impl": impl,
        "median_s": ms / 1e3,
        "iqr_s": 0.0,
        "repeats": 7,
    }


def _small_run():
    results = []
    # a 4 MiB case (below the roofline ratios' size) and a 16 MiB one
    for case, shape, bk, roof in (("a", (1024, 1024), 2.0, 0.5), ("b", (2048, 2048), 8.0, 5.0)):
        for impl, ms in (
            ("graph", 40.0),
            ("alt", 30.0),
            ("bnkernels", bk),
            ("torch", 3 * bk),
            ("roofline", roof),
        ):
            results.append(_record(case, "backward", impl, ms, shape))
        for impl, ms in (("reference", 10.0), ("bnkernels", bk), ("torch", bk), ("roofline", roof)):
            results.append(_record(case, "forward", impl, ms, shape))
    machine = {
        "cpu": "Some CPU",
        "cores": 4,
        "usable_cores": 4,
        "bnkernels": "0.1.0",
        "numpy": "2.0.0",
        "torch": None,
        "build_flags": "-O3",
    }
    return {
        "date": "2026-01-01T00:00:00+00:00",
        "machine": machine,
        "settings": {"threads": 4},
        "results": results,
    }


def test_markdown_tables_of_a_small_run(tmp_path, capsys):
    doc = _small_run()
    lines = _bench.format_markdown(doc).splitlines()
    assert "| a | 40.0 | 30.0 | 2.00 | 6.00 | 0.500 | 20.0 | 15.0 | 3.00 | 4.00 |" in lines
    # medians over both cases: alt/bnk (15 + 3.75)/2, bnk/roof (4 + 1.6)/2
    assert "| **median** | | | | | | **12.5** | **9.4** | **3.00** | **2.80** |" in lines
    assert not any("target" in line.lower() for line in lines)
    # python -m bnkernels bench --markdown RUN prints the same
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    assert _bench.main(["--markdown", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == lines


def _printed_markdown(tmp_path, capsys, doc):
    """What ``python -m bnkernels bench --markdown RUN`` prints for the run doc."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    assert _bench.main(["--markdown", str(path)]) == 0
    return capsys.readouterr().out


def test_markdown_prints_load_and_fused_runs_as_they_printed(tmp_path, capsys):
    load = {
        "case": "2d-50x100-f64",
        "shape": [50, 100],
        "dtype": "float64",
        "pass": "backward",
        "threads": "default",
        "busy": 2,
        "quiet_1_thread_median_s": 1e-5,
        "p50_s": 1.5e-5,
        "p99_s": 4e-5,
        "calls": 100,
    }
    out = _printed_markdown(tmp_path, capsys, {"date": "2026-01-01", "machine": {}, "load": [load]})
    assert out == _bench.format_load([load])
    row = ["2d-50x100-f64", "backward", "default", "0.010", "0.015", "0.040", "4.0"]
    assert out.splitlines()[-1].split() == row
    fused = [
        {"case": "a", "pass": "forward", "impl": impl, "median_s": t}
        for impl, t in (("unfused", 3e-3), ("fused", 2e-3))
    ]
    doc = {"date": "2026-01-01", "machine": {}, "threads": 2, "fused": fused}
    out = _printed_markdown(tmp_path, capsys, doc)
    assert out == _bench.format_fused(fused)
    assert out.splitlines()[-1].split() == ["a", "forward", "3", "2", "1.50"]


def test_markdown_of_something_else_is_a_usage_error(tmp_path, capsys):
    for name, content in (("missing.json", None), ("bad.json", "{"), ("other.json", "[1, 2]")):
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(SystemExit) as exc:
            _bench.main(["--markdown", str(path)])
        assert exc.value.code == 2
        assert "--markdown %s" % path in capsys.readouterr().err


def test_summary_of_a_small_run():
    lines = report.summary(_small_run()).splitlines()
    assert "Some CPU, 4 cores, 4 threads, 2026-01-01 00:00 UTC" in lines[1]
    # torch/bnk 3.00 on both cases; bnk/roof over case b (16 MiB) only; alt/bnk 15 and 3.75
    assert "| backward | 3.00 (3.00–3.00) | 1.60 (1.60–1.60) | 9.4 (3.8–15.0) |" in lines
    assert "| forward | 1.00 (1.00–1.00) | 1.60 (1.60–1.60) | – |" in lines
    assert "the 2 cases; bnkernels/roofline over the 1 whose arrays take 8 MiB" in lines[-1]


def test_targets_of_a_small_run():
    doc = _small_run()
    lines = report.format_targets(doc).splitlines()
    # the roofline targets look at case b only (16 MiB arrays): 1.6 <= 1.6 for the maximum
    assert "| backward | bnk/roof | max (8 MiB+) | <= 1.60 | 1.60 met |" in lines
    assert "| backward | bnk/roof | median (8 MiB+) | <= 1.30 | 1.60 not met |" in lines
    assert "| backward | torch/bnk | min | >= 1.00 | 3.00 met |" in lines
    assert "| forward | torch/bnk | median | >= 1.50 | 1.00 not met |" in lines
    # with an earlier run, a column for each
    both = report.format_targets(doc, doc).splitlines()
    assert "| backward | torch/bnk | min | >= 1.00 | 3.00 met | 3.00 met |" in both


def test_write_puts_the_summary_between_the_markers(tmp_path):
    readme, bench_md = tmp_path / "README.md", tmp_path / "bench.md"
    readme.write_text("# x\n\n%s\nold\n%s\n\nafter\n" % (report.START, report.END))
    doc = _small_run()
    report.write(doc, str(readme), str(bench_md))
    text = readme.read_text()
    assert text == "# x\n\n%s%s%s\n\nafter\n" % (report.START, report.readme_block(doc), report.END)
    assert bench_md.read_text() == report.bench_md(doc)
