"""What a run of bench/gpu_bench.py compiles on a GPU, and how long that takes, from the ahead-of-time compile
report (`python -m fastprefix.kernels.report --json REPORT.json`) measured without a GPU.

Triton compiles, for every launch, each config its autotuner keeps (`tuning.select`) or the fixed launch's
one (`Gate.choose`), once per kernel, constexpr set and dtype. The plan lists those (kernel, features, head
dim, dtype, launch) for every case of a run, the way the launchers choose them on the target architecture;
the estimate adds up each one's compile time in the report (a variant with some of causal, mask, bias and
dropout costs what the report's "all" variant did; a launch the report lacks costs its kernel's mean). Two
things it leaves out: Triton compiles a kernel again for shape arguments that specialize differently (a
size divisible by 16 or not), and the report's times are those of the machine that made it.
"""

from __future__ import annotations

import dataclasses
import json
import statistics

from fastprefix.kernels import tuning


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _call(plan, arch, dtype, D, N, S, P, *, shared, causal, mask, bias, bias_grad, dropout, backward, decode):
    """Add to `plan` the variants one prefix_attention call compiles."""
    itemsize = {"fp16": 2, "bf16": 2, "fp32": 4}[dtype]
    features = frozenset(name for name, on in (("mask", mask), ("bias", bias), ("dropout", dropout)) if on)
    every = "all" if features or causal else "plain"
    gate = tuning.Gate(arch, tuning.ARCH_SHARED_MEMORY[arch], max(16, _pow2(D)), itemsize, features)

    def add(kernel, configs, features_class=every):
        plan.update((kernel, features_class, D, dtype, dataclasses.astuple(c)) for c in configs)

    if decode:
        gathers = mask or bias
        prefix_kernel = "decode_prefix" if shared else "decode_rows"
        add(prefix_kernel, [gate.choose(tuning.DECODE, tuning.decode_preference(prefix_kernel[7:], N, gathers))])
        add("decode_rows", [gate.choose(tuning.DECODE, tuning.decode_preference("rows", N, gathers))])
        add("decode_merge", [tuning.LaunchConfig(tuning.preprocess_block(gate.block_d), 0, tuning.MERGE_WARPS, 3)])
        return
    add("fwd", tuning.select(tuning.FWD, gate, n_q=_pow2(N), n_kv=_pow2(P + S)))
    if not backward:
        return
    add("bwd_preprocess", [tuning.LaunchConfig(tuning.preprocess_block(gate.block_d), 0, 4, 3)], "plain")
    add("dq", tuning.select(tuning.DQ, gate, n_q=_pow2(N), n_kv=_pow2(P + S)))
    add("dkdv", tuning.select(tuning.DKDV, gate, n_q=_pow2(N), n_kv=_pow2(S)))
    prefix_kernel = "dkdv_shared_prefix" if shared else "dkdv"
    add(prefix_kernel, tuning.select(tuning.DKDV, gate, n_q=_pow2(N), n_kv=_pow2(P)), "all" if features else "plain")
    if bias_grad:
        bias_gate = dataclasses.replace(gate, features=features | {"bias"})
        add("dbias", [bias_gate.choose(tuning.DBIAS, tuning.DBIAS.preferred)])


def plan(check_cases, dtypes, dropout_case, timing_shapes, decode_shapes, sizes, arch=90) -> set[tuple]:
    """The variants a run compiles on `arch`: `check_cases` (name, Case options, with backward) in each of
    `dtypes`, the dropout check `dropout_case` (dtype, Case options), the timed shapes (Hkv, N, P) and decode
    shapes (B, N) at `sizes` (gpu_bench's B, HQ, D, DECODE_HKV, DECODE_P, DECODE_S)."""
    found = set()
    for dtype in dtypes:
        for _, o, backward in check_cases:
            _call(found, arch, dtype, o["D"], o["N"], o["S"], o["P"], shared=o.get("shared", True),
                  causal=o.get("causal", False), mask=bool(o.get("mask")), bias=bool(o.get("bias")),
                  bias_grad=o.get("bias_grad", False), dropout=False, backward=backward,
                  decode=not backward and o["N"] <= 16)
    dtype, o = dropout_case
    _call(found, arch, dtype, o["D"], o["N"], o["S"], o["P"], shared=False, causal=False, mask=False, bias=False,
          bias_grad=False, dropout=True, backward=True, decode=False)
    for _, n, p in timing_shapes:
        for backward in (False, True):
            _call(found, arch, "bf16", sizes["D"], n, n, p, shared=True, causal=True, mask=False, bias=False,
                  bias_grad=False, dropout=False, backward=backward, decode=False)
    for _, n in decode_shapes:
        _call(found, arch, "bf16", sizes["D"], n, sizes["DECODE_S"], sizes["DECODE_P"], shared=True,
              causal=n > 1, mask=False, bias=False, bias_grad=False, dropout=False, backward=False, decode=True)
    return found


def estimate(report_path: str, planned: set[tuple], arch=90) -> str:
    """The compile time of `planned` variants by the report's per-variant compile seconds, in one line."""
    with open(report_path) as f:
        results = json.load(f)
    seconds, by_kernel = {}, {}
    for r in results:
        v = r["variant"]
        key = (v["kernel"], v["features"], v["head_dim"], v["dtype"],
               (v["block_m"], v["block_n"], v["num_warps"], v["num_stages"]))
        if v["arch"] == arch and not r["error"]:
            seconds[key] = r["seconds"]
            by_kernel.setdefault(v["kernel"], []).append(r["seconds"])
    found = [seconds.get(key) for key in planned]
    missing = sum(s is None for s in found)
    total = sum(s if s is not None else statistics.mean(by_kernel[key[0]]) for s, key in zip(found, planned))
    return (f"the quick run compiles about {len(planned)} kernel variants on sm_{arch}: {total:.0f} s of compile time "
            f"by the compile report's per-variant times ({missing} priced at their kernel's mean)")
