"""bench/gpu_bench.py is a script for a GPU machine; its correctness stage also runs here, through Triton's
interpreter at tiny sizes, so the script is known to import and its checks to pass before a GPU lease."""

import importlib.util
import json
import pathlib
import sys

import torch

from fastprefix import kernels

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "gpu_bench.py"


def load_bench():
    """bench/gpu_bench.py as a module; its directory on sys.path, as when it runs as a script (it imports
    gpu_decode from there)."""
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_lines(bench, argv, capsys):
    assert bench.main(argv) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("check ")]


def test_correctness_stage_passes_on_cpu(capsys):
    """Every check, and --quick's: a case with every feature per dtype, a decode case per dtype, dropout once."""
    assert kernels.INTERPRETED
    bench = load_bench()
    lines = check_lines(bench, ["--check-only"], capsys)
    per_dtype = len(bench.CHECK_VARIANTS) + len(bench.DECODE_CHECK_VARIANTS) + 1
    assert len(lines) == len(bench.CHECK_DTYPES) * per_dtype and all(line.endswith("ok") for line in lines)
    quick = check_lines(bench, ["--check-only", "--quick"], capsys)
    assert len(quick) == len(bench.CHECK_DTYPES) * 2 + 1 and all(line.endswith("ok") for line in quick)
    for feature in ("causal", "mask", "bias", "dropout"):
        assert any(feature in line for line in quick), feature


def test_a_case_over_its_timeout_is_reported_not_waited_for(capsys):
    bench = load_bench()
    assert bench.time_case("sleeper", 1, lambda: __import__("time").sleep(5)) is None
    assert "skipped, over 1 s" in capsys.readouterr().out


def test_the_quick_runs_compile_plan_and_estimate(tmp_path, monkeypatch, capsys):
    """The plan names every kernel the quick run launches on sm_90 (the bias gradient, both dK/dV segments, the
    decode kernels); the estimate prices each by the compile report's JSON (here a made-up one: 2 s each)."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import gpu_plan

    bench = load_bench()
    sizes = dict(B=bench.B, HQ=bench.HQ, D=bench.D, DECODE_HKV=bench.DECODE_HKV, DECODE_P=bench.DECODE_P,
                 DECODE_S=bench.DECODE_S)
    dropout = dict(bench.GPU_CHECK_SIZE, **{k: v for k, v in bench.DROPOUT_CHECK.items() if k != "dropout_p"})
    planned = gpu_plan.plan(bench.check_cases("cuda", quick=True), ["fp16", "bf16"], ("bf16", dropout),
                            bench.QUICK_TIMING_SHAPES, bench.QUICK_DECODE_SHAPES, sizes)
    assert {v[0] for v in planned} == {"fwd", "bwd_preprocess", "dq", "dkdv", "dkdv_shared_prefix", "dbias",
                                       "decode_prefix", "decode_rows", "decode_merge"}
    report = [{"variant": dict(kernel=k, features=f, arch=90, head_dim=d, dtype=t, block_m=c[0], block_n=c[1],
                               num_warps=c[2], num_stages=c[3]), "seconds": 2.0, "error": ""}
              for k, f, d, t, c in planned]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert bench.main(["--estimate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"about {len(planned)} kernel variants on sm_90: {2 * len(planned)} s" in out


def test_decode_case_matches_sdpa_over_copies_on_cpu():
    """The decode timing's providers at a tiny size on CPU: fastprefix (the decode kernels, interpreted) and
    SDPA over per-row copies give the same output, one token and a few (causal) per row."""
    bench = load_bench()
    for n in (1, 3):
        fused, baselines = bench.decode_providers(3, n, device="cpu", p=19, s=7, dtype=torch.float32)
        assert "flash" in bench.usable_baselines(fused, baselines)


def test_two_level_decode_case_matches_sdpa_over_copies_on_cpu():
    """The two-level decode timing's providers at a tiny size on CPU: levels_prefix_attention (a shared system
    prompt, then a document per row) and SDPA over per-row copies of both prompts give the same output."""
    bench = load_bench()
    for n in (1, 3):
        fused, baselines = bench.two_level_providers(5, n, device="cpu", system=11, document=6, documents=3, s=7,
                                                     dtype=torch.float32)
        assert "flash" in bench.usable_baselines(fused, baselines)
