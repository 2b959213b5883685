"""bench/gpu_bench.py is a script for a GPU machine; its correctness stage also runs here, through Triton's
interpreter at tiny sizes, so the script is known to import and its checks to pass before a GPU lease."""

import importlib.util
import pathlib

import torch

from fastprefix import kernels

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "gpu_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_correctness_stage_passes_on_cpu(capsys):
    assert kernels.INTERPRETED
    bench = load_bench()
    assert bench.main(["--check-only"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("check ")]
    assert len(lines) == len(bench.CHECK_DTYPES) * (len(bench.CHECK_VARIANTS) + len(bench.DECODE_CHECK_VARIANTS))
    assert all(line.endswith("ok") for line in lines)


def test_decode_case_matches_sdpa_over_copies_on_cpu():
    """The decode timing's providers at a tiny size on CPU: fastprefix (the decode kernels, interpreted) and
    SDPA over per-row copies give the same output, one token and a few (causal) per row."""
    bench = load_bench()
    for n in (1, 3):
        fused, baselines = bench.decode_providers(3, n, device="cpu", p=19, s=7, dtype=torch.float32)
        assert "flash" in bench.usable_baselines(fused, baselines)
