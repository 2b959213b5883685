"""The ahead-of-time compile report (`python -m fastprefix.kernels.report`), run as a user would: every
kernel variant compiles for sm_80 and sm_90 without local-memory spills and with tensor-core instructions.

The report runs in a subprocess without TRITON_INTERPRET (the interpreter, which the other tests use, cannot
compile ahead of time). Takes a few minutes on 2 cores with a cold Triton cache.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ALL_KERNELS = {"fwd", "bwd_preprocess", "dq", "dkdv", "dkdv_shared_prefix", "dbias", "decode_prefix", "decode_rows",
               "decode_merge"}
NO_DOTS = {"bwd_preprocess", "decode_merge"}


def run_without_interpreter(*args, timeout):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.json"
    proc = run_without_interpreter("-m", "fastprefix.kernels.report", "--json", str(path), timeout=1800)
    assert path.exists(), proc.stderr[-3000:]
    return proc, json.loads(path.read_text())


def test_every_variant_is_covered(report):
    _, results = report
    variants = [r["variant"] for r in results]
    assert {v["kernel"] for v in variants} == ALL_KERNELS
    covered = {(v["arch"], v["head_dim"], v["dtype"]) for v in variants}
    assert covered == {(arch, d, dtype) for arch in (80, 90) for d in (64, 128) for dtype in ("fp16", "bf16")}
    for kernel in ALL_KERNELS - NO_DOTS:
        assert {v["features"] for v in variants if v["kernel"] == kernel} == {"plain", "all"}, kernel


def test_all_compile_without_spills_with_tensor_cores(report):
    proc, results = report
    for r in results:
        v = r["variant"]
        where = f"{v['kernel']} {v['features']} sm_{v['arch']} D={v['head_dim']} {v['dtype']} {v['block_m']}x" \
                f"{v['block_n']}/{v['num_warps']}w"
        assert not r["error"], where + ": " + r["error"]
        assert r["local_bytes"] == 0 and r["local_accesses"] == 0, where + " spills"
        if v["kernel"] not in NO_DOTS:
            assert r["hmma"] + r["hgmma"] > 0, where + " has no tensor-core instruction"
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_stacked_prefix_tiles_are_tensor_core_products(report):
    """The point of stacking the queries of all rows and heads of a KV group against a shared prefix: QK^T and
    PV are real matrix products, wgmma (HGMMA) on sm_90 for 64-row tiles, mma.sync (HMMA) on sm_80; both
    tile sizes the launcher uses (16 rows for a small batch, 64 for more) are in the report."""
    _, results = report
    decode = [r for r in results if r["variant"]["kernel"] == "decode_prefix"]
    assert {r["variant"]["block_m"] for r in decode} == {16, 64}
    for r in decode:
        v = r["variant"]
        if v["arch"] == 90 and v["block_m"] >= 64:
            assert r["hgmma"] > 0, v
        else:
            assert r["hmma"] > 0, v


def test_report_flags_a_spilling_variant():
    """The spill check can fail: a forward with every feature on in 128 x 64 tiles spills on sm_80 at D = 128
    (why the pruner never picks it there)."""
    code = ("from fastprefix.kernels import report as r; "
            "res = r.compile_variant(r.Variant('fwd', 'all', 80, 128, 'fp16', 128, 64, 8, 3)); "
            "print(res.problems)")
    proc = run_without_interpreter("-c", code, timeout=600)
    assert "spills to local memory" in proc.stdout, proc.stdout + proc.stderr[-2000:]
