"""What `fastprefix bench` prints and writes: the table alone (no warnings of other packages, no profiler lines),
each row's spread, the machine's load, and a warning when the spread or the load makes the ratios meaningless."""

import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import pytest

from fastprefix import bench, cli
from fastprefix.bench import AttentionShape, Row, Settings
from fastprefix.bench_report import format_table, run_warning
from fastprefix.presets import tiny_llama, tiny_t5
from fastprefix.quiet import others_warnings_hidden
from fastprefix.timing import MAX_REPEATS, MIN_REPEATS, SPREAD_LIMIT, Load, Timing, busy_cpu_seconds, plan_repeats

TINY = ["--batch", "2", "--seq-len", "32", "--prefix-len", "8"]
NOISE = ("Warning", "warnings.warn", "Memory block", "SyncActivityProfilerHandler", "USDT", "Traceback",
         "Loading weights")


def test_the_bench_prints_its_table_and_nothing_of_other_packages(tmp_path):
    """One real run in a fresh process (the profiler logs its native lines once per process): stdout is the
    header, the table with each row's spread, and where the files went; stderr holds the progress bar and
    one line counting the warnings PEFT's own calls raised."""
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run([sys.executable, "-m", "fastprefix.cli", "bench", *TINY, "--repeats", "3",
                           "--json", str(out_json), "--plot", str(out_png)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, noise
    assert "hidden: warnings raised by other packages' own calls (" in proc.stderr and "from peft" in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fastprefix bench: tiny random LLaMA and T5 on CPU")
    assert lines[2].startswith(f"machine: {os.cpu_count()} CPUs; other processes used ") and "load average" in lines[2]
    assert lines[3] == "attention sweep: one attention layer shaped as llama's (Hq=8 Hkv=4 D=32)"
    assert lines[4].split()[:6] == ["workload", "variant", "median", "ms", "IQR", "min-max"]
    for workload in ("llama train step", "llama generate (", "llama generate, shared", "t5 train step", "t5 generate",
                     "attention fwd+bwd"):
        assert workload in proc.stdout, workload
    assert f"wrote the results as JSON to {out_json}" in proc.stdout
    assert f"wrote the attention sweep's figure to {out_png}" in proc.stdout
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_json(json.loads(out_json.read_text()))


def check_json(result: dict) -> None:
    assert result["settings"]["batch"] == 2 and result["settings"]["repeats"] == 3
    assert result["load"]["cpus"] == os.cpu_count() and len(result["load"]["load_1min_samples"]) >= 2
    assert result["trust"]["trusted"] == (result["trust"]["warning"] is None)
    rows = result["rows"]
    assert {r["variant"] for r in rows} == {"fastprefix", "peft", "no prefix", "copied cache", "concat rows"}
    for r in rows:
        baseline = next(b for b in rows if b["workload"] == r["workload"] and b["variant"] == r["baseline"])
        assert r["ratio_to_baseline"] == pytest.approx(r["seconds"] / baseline["seconds"])
        assert len(r["times"]) == 3 and r["seconds"] == statistics.median(r["times"])
        assert r["seconds_min"] <= r["seconds_q1"] <= r["seconds"] <= r["seconds_q3"] <= r["seconds_max"]
        assert r["spread"] == pytest.approx((r["seconds_q3"] - r["seconds_q1"]) / r["seconds"])
        assert r["tokens_per_second"] > 0 and r["peak_bytes"] > 0, r
    assert all(r["matched"] for r in rows if r["variant"] == "fastprefix")


def noisy_time_runs(fn, repeats, synchronize=lambda: None):
    """Times whose interquartile range is most of their median, as on a busy machine."""
    return Timing([0.01 * (1 + i % 4) ** 2 for i in range(repeats)])


def test_a_run_with_a_high_spread_says_its_ratios_cannot_be_trusted(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "time_runs", noisy_time_runs)
    assert cli.main(["bench", "--model", "tiny-t5", *TINY, "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fastprefix bench: tiny random T5 on CPU")
    assert "attention sweep: one attention layer shaped as t5's (Hq=8 Hkv=8 D=32)" in out
    assert "WARNING: the times and ratios of this run cannot be trusted" in out
    assert f"rows vary by more than {SPREAD_LIMIT:.0%} of their median between runs" in out
    trust = json.loads((tmp_path / "b.json").read_text())["trust"]
    assert trust["trusted"] is False and "vary by more than" in trust["warning"]


def rows_with(times_by_variant: dict) -> list[Row]:
    rows = [Row("train step", variant, times, 100, 1, True) for variant, times in times_by_variant.items()]
    for r in rows:
        r.ratio_to_baseline = r.seconds / rows[-1].seconds
    return rows


QUIET = Load(cpus=2, samples=[0.2, 2.4, 2.1])


def test_steady_rows_on_a_quiet_machine_raise_no_warning():
    rows = rows_with({"fastprefix": [1.00, 1.01, 1.02, 1.01], "peft": [2.0, 2.02, 2.01, 2.03]})
    assert run_warning(rows, QUIET) is None
    assert "0.50x   yes" in format_table(rows)


def test_the_warning_names_the_noisy_row_and_the_table_marks_ratios_within_noise():
    rows = rows_with({"fastprefix": [1.0, 1.5, 2.0, 1.2], "peft": [1.1, 1.12, 1.11, 1.13]})
    warning = run_warning(rows, QUIET)
    assert "1 of 2 rows vary by more than 10% of their median" in warning and "train step: fastprefix" in warning
    line = next(line for line in format_table(rows).splitlines() if "fastprefix" in line)
    assert line.split() == ["train", "step", "fastprefix", "1350.0", "35%", "1000.0-2000.0", "4", "74", "0.0", "1.21x~",
                            "yes"]


@pytest.mark.parametrize("samples, reason", [([1.5, 1.6], "the machine was already busy at the start"),
                                             ([0.3, 3.5, 3.2], "other work competed with the run")])
def test_a_busy_machine_is_named_in_the_warning(samples, reason):
    rows = rows_with({"fastprefix": [1.00, 1.01, 1.02], "peft": [2.0, 2.02, 2.01]})
    assert reason in run_warning(rows, Load(cpus=2, samples=samples))


@pytest.mark.parametrize("others, reason", [([0.45, 0.02], "the machine was already busy at the start"),
                                            ([0.01, 0.03, 0.6, 0.1], "other work competed with the run")])
def test_other_processes_cpu_time_is_named_in_the_warning(others, reason):
    rows = rows_with({"fastprefix": [1.00, 1.01, 1.02], "peft": [2.0, 2.02, 2.01]})
    warning = run_warning(rows, Load(cpus=2, samples=[0.1, 0.2], others=others))
    assert reason in warning and "other processes used" in warning


def test_a_load_average_left_by_an_ended_run_is_no_warning_where_cpu_time_is_measured():
    """The 1-minute load average decays over minutes: right after another run it is high though nothing runs."""
    rows = rows_with({"fastprefix": [1.00, 1.01, 1.02], "peft": [2.0, 2.02, 2.01]})
    assert run_warning(rows, Load(cpus=2, samples=[1.8, 2.0, 1.9], others=[0.01, 0.04, 0.02])) is None


@pytest.mark.skipif(busy_cpu_seconds() is None, reason="the OS reports no machine-wide CPU time (not Linux)")
def test_the_probe_sees_a_process_that_keeps_a_cpu_busy():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        load = Load()
        load.probe(1.0)
    finally:
        spin.kill()
        spin.wait()
    assert load.others[0] >= 0.6 / load.cpus, load.others
    assert "already busy at the start" in run_warning(rows_with({"fastprefix": [1.0, 1.0, 1.0]}), load)


def test_a_single_timed_run_has_no_spread_and_says_so():
    rows = rows_with({"fastprefix": [1.0], "peft": [2.0]})
    assert "2 rows have one timed run each, hence no spread" in run_warning(rows, QUIET)


def test_repeats_fit_the_budget_cheapest_first():
    one_run = {"op": 0.001, "generate": 1.0, "train": 10.0}
    plan = plan_repeats(one_run, 60)
    assert plan == {"op": MAX_REPEATS, "generate": MAX_REPEATS, "train": 3}
    assert sum((plan[k] + 1) * t for k, t in one_run.items()) <= 60
    assert plan_repeats({"train": 10.0}, 5) == {"train": MIN_REPEATS}


def test_the_attention_sweep_is_shaped_as_the_model():
    """GQA included: the concatenation baseline repeats the key/value heads, and both variants agree."""
    assert bench.attention_shape(tiny_llama()) == AttentionShape(8, 4, 32)
    assert bench.attention_shape(tiny_t5()) == AttentionShape(8, 8, 32)
    workload = bench.op_workload(2, 8, Settings(seq_len=16), AttentionShape(9, 3, 64))
    assert workload.matched == {"fastprefix": True, "peft": True}


def _warn_from(module: str, caller=None):
    """A function defined in a module named `module` that raises a FutureWarning, or calls `caller()`."""
    namespace = {"__name__": module, "warnings": warnings, "caller": caller}
    exec("def f():\n    return caller() if caller else warnings.warn('old API', FutureWarning)", namespace)
    return namespace["f"]


def test_warnings_are_hidden_only_when_another_package_made_the_call():
    """transformers raising on behalf of PEFT's call is PEFT's; on behalf of fastprefix's call, fastprefix's."""
    raised_by_transformers = _warn_from("transformers.utils.deprecation")
    peft_call, fastprefix_call = (_warn_from(name, raised_by_transformers) for name in ("peft.peft_model",
                                                                                         "fastprefix.bench"))
    with pytest.warns(FutureWarning, match="old API") as shown:
        warnings.simplefilter("always")
        with others_warnings_hidden() as hidden:
            peft_call()
            fastprefix_call()
        with others_warnings_hidden(verbose=True) as hidden_when_verbose:
            peft_call()
    assert dict(hidden.by_package) == {"peft": 1} and "1 from peft" in hidden.summary()
    assert not hidden_when_verbose.by_package and hidden_when_verbose.summary() == ""
    assert len(shown) == 2
