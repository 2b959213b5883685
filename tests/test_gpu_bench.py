"""bench/gpu_bench.py is a script for a GPU machine; its correctness stage also runs here, through Triton's
interpreter at tiny sizes, so the script is known to import and its checks to pass before a GPU lease."""

import importlib.util
import pathlib

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
    assert len(lines) == len(bench.CHECK_DTYPES) * len(bench.CHECK_VARIANTS)
    assert all(line.endswith("ok") for line in lines)
