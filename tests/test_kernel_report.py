"""The ahead-of-time compile report (`python -m fastprefix.kernels.report --quick`), run as a user would: every
kernel variant the launchers can choose compiles, for sm_80, sm_86, sm_89 and sm_90, without local-memory
spills, within its architecture's shared memory, with tensor-core instructions in fp16/bf16.

The report runs in a subprocess without TRITON_INTERPRET (the interpreter, which the other tests use, cannot
compile ahead of time). `--quick` compiles its representative targets (every architecture, head dim and dtype
at least once): about 2 minutes on 2 cores with a cold Triton cache. The full report (every target) is run by
hand; its figures are in bench/RESULTS.md.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ALL_KERNELS = {"fwd", "bwd_preprocess", "dq", "dkdv", "dkdv_shared_prefix", "dbias", "decode_prefix", "decode_rows",
               "decode_merge", "fwd_bank", "dq_bank", "dkdv_bank", "decode_prefix_bank"}
NO_DOTS = {"bwd_preprocess", "decode_merge"}
QUICK_TARGETS = {(80, 128, "fp16"), (86, 256, "bf16"), (89, 64, "bf16"), (90, 128, "bf16"), (90, 256, "fp16")}
SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def run_without_interpreter(*args, timeout):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.json"
    proc = run_without_interpreter("-m", "fastprefix.kernels.report", "--quick", "--json", str(path), timeout=1800)
    assert path.exists(), proc.stderr[-3000:]
    return proc, json.loads(path.read_text())


def test_every_variant_is_covered(report):
    _, results = report
    variants = [r["variant"] for r in results]
    assert {v["kernel"] for v in variants} == ALL_KERNELS
    covered = {(v["arch"], v["head_dim"], v["dtype"]) for v in variants}
    assert covered == QUICK_TARGETS
    for kernel in ALL_KERNELS - NO_DOTS:
        assert {v["features"] for v in variants if v["kernel"] == kernel} == {"plain", "all"}, kernel


def test_all_compile_within_resources(report):
    """No failure, no spill, no variant over its architecture's shared memory per block, tensor cores in every
    fp16/bf16 kernel with dots (fp32 dots are IEEE fp32, on CUDA cores)."""
    proc, results = report
    for r in results:
        v = r["variant"]
        where = f"{v['kernel']} {v['features']} sm_{v['arch']} D={v['head_dim']} {v['dtype']} {v['block_m']}x" \
                f"{v['block_n']}/{v['num_warps']}w/{v['num_stages']}s"
        assert not r["error"], where + ": " + r["error"]
        assert r["local_bytes"] == 0 and r["local_accesses"] == 0, where + " spills"
        assert r["shared_bytes"] <= SHARED_MEMORY[v["arch"]], where + f" needs {r['shared_bytes']} B of shared memory"
        if v["kernel"] not in NO_DOTS and v["dtype"] != "fp32":
            assert r["hmma"] + r["hgmma"] > 0, where + " has no tensor-core instruction"
    assert proc.returncode == 0, proc.stdout[-3000:]
    unlaunched = [line for line in proc.stdout.splitlines() if "no launch fits" in line]
    # A bank's dK/dV at D = 256 spills on sm_86: such calls run on the torch path (the dispatcher says why).
    assert all("dkdv_bank" in line and "sm_86 D=256" in line for line in unlaunched), unlaunched


def test_stacked_prefix_tiles_are_tensor_core_products(report):
    """The point of stacking the queries of all rows and heads of a KV group against a shared prefix: QK^T and
    PV are real matrix products, wgmma (HGMMA) on sm_90 for 64-row tiles, mma.sync (HMMA) on sm_80; both
    tile sizes the launcher uses (16 rows for a small batch, 64 for more) are in the report."""
    _, results = report
    decode = [r for r in results if r["variant"]["kernel"] == "decode_prefix" and r["variant"]["dtype"] != "fp32"]
    assert {r["variant"]["block_m"] for r in decode} == {16, 64}
    for r in decode:
        v = r["variant"]
        if v["arch"] == 90 and v["block_m"] >= 64:
            assert r["hgmma"] > 0, v
        else:
            assert r["hmma"] > 0, v


def test_report_flags_a_spilling_or_oversized_variant():
    """The checks can fail: a forward with every feature on in 128 x 64 tiles spills on sm_80 at D = 128 (why
    the pruner never picks it there), and in float32 with 3 stages needs more shared memory than sm_86 has."""
    code = ("from fastprefix.kernels import report as r; "
            "print(r.compile_variant(r.Variant('fwd', 'all', 80, 128, 'fp16', 128, 64, 8, 3)).problems); "
            "print(r.compile_variant(r.Variant('fwd', 'plain', 86, 128, 'fp32', 64, 64, 8, 3)).problems)")
    proc = run_without_interpreter("-c", code, timeout=600)
    assert "spills to local memory" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "shared memory, sm_86 allows 101376 per block" in proc.stdout, proc.stdout + proc.stderr[-2000:]
