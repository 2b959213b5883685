"""fastprefix's Triton kernels on a GPU: correctness first, then one timing table.

    python bench/gpu_bench.py --quick [--json PATH] [--markdown PATH]   # on a CUDA machine: about 6 minutes
    python bench/gpu_bench.py [--json PATH] [--markdown PATH]           # every case
    python bench/gpu_bench.py --check-only      # correctness only; on a CPU machine it runs the kernels at
                                                # tiny sizes through Triton's interpreter
    python bench/gpu_bench.py --estimate REPORT.json   # no GPU: the quick run's compile time, from the
                                                       # ahead-of-time compile report's JSON

1. Correctness: forward, lse and every gradient of backend="triton" against the float64 oracle
   (fastprefix.testing.compare_to_oracle) on random inputs, fp16/bf16 (fp32 too under the interpreter: on a
   GPU fp32 runs on the torch backend), with causal, GQA, a padding mask, a bias with its gradient, a per-row
   prefix; the decode kernels; dropout (forward and backward draw the same mask,
   fastprefix.testing.dropout_probabilities). Any failure stops the script (exit 1) before timing.
2. The dense bf16 matmul rate of this GPU (8192^3 torch.matmul), the ceiling for the forward.
3. Timing (bf16, causal, B=8, Hq=32, D=128, S=N, shared prefix [Hkv, P, D] with a gradient):
   forward and forward+backward of
     fastprefix      prefix_attention(..., backend="triton")
     concat+SDPA     the prefix expanded over the batch and concatenated (what PEFT does), then
                     scaled_dot_product_attention with the flash backend and a lower-right causal mask
     floor           the same SDPA without any prefix
   at Hkv in {32, 8}, N in {1024, 4096}, P in {16, 128, 1024} (--quick: three of them). Times are medians
   of triton.testing.do_bench. FLOPs count P + S/2 keys per query (causal halves the sequence part);
   forward = 4 B Hq N D keys, backward = 2.5 x forward.
4. Decode timing (bf16, inference, Hq=32, Hkv=8, D=128, a shared prefix of P=4096 tokens, a per-row cache
   of S=256 tokens): prefix_attention(..., backend="triton") on N query tokens per row (the decode kernels)
   against SDPA over per-row copies (each row's cache holds [prefix ; own tokens], as when the prompt's
   cache is copied to every row; the G query heads of a KV head are passed as G queries of that head, so
   SDPA reads each copy once per KV head; the faster of its flash and memory-efficient kernels). Memory
   read: fastprefix reads the prefix once and each row's S keys; the copies are B x (P + S) keys.

Every case runs under a timeout (--case-timeout, seconds; a case that passes it is reported and skipped),
and the script counts the kernel variants Triton compiled. Goals (issue 3 and 6), checked and printed at the
end:
   fused fwd+bwd time <= 1.15 x floor time x (P + S/2) / (S/2)   (the floor plus the prefix's own FLOPs)
   concat+SDPA time >= 1.3 x fused time, for P >= 128 (forward and forward+backward)
   bf16 forward at N = 4096 >= 60% of the dense matmul rate
   decode at B=64, N=1 >= 5 x faster than SDPA over per-row copies
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastprefix loads its kernels (and Triton)

import torch.nn.functional as F  # noqa: E402

from gpu_decode import (D, DECODE_HKV, DECODE_P, DECODE_S, HQ, TWO_LEVEL_DOCUMENT, TWO_LEVEL_DOCUMENTS,  # noqa: E402
                        TWO_LEVEL_SYSTEM, decode_providers, two_level_providers, usable_baselines)
from fastprefix import prefix_attention  # noqa: E402
from fastprefix.testing import (Case, compare_forward_to_oracle, compare_to_oracle, dropout_probabilities,  # noqa: E402
                                make_inputs)

CHECK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GPU_CHECK_DTYPES = (torch.float16, torch.bfloat16)  # float32 runs on the torch backend on GPUs
CHECK_VARIANTS = {  # name: Case options
    "plain": {},
    "causal": {"causal": True},
    "gqa": {"Hkv": 2},
    "causal-gqa-mask-per_row": {"causal": True, "Hkv": 2, "mask": "rows", "shared": False},
    "causal-gqa-mask-biasgrad": {"causal": True, "Hkv": 2, "mask": "rows", "bias": "heads", "bias_grad": True},
}
QUICK_CHECK_VARIANTS = ("causal-gqa-mask-biasgrad",)
QUICK_DECODE_CHECK_VARIANTS = ("decode-gqa-mask",)
DROPOUT_CHECK = dict(B=1, Hq=2, Hkv=1, N=32, S=48, P=16, dropout_p=0.3)  # D: the check size's (one-hot columns)
GPU_CHECK_SIZE = dict(B=2, Hq=8, Hkv=8, N=300, S=333, P=48, D=128)
CPU_CHECK_SIZE = dict(B=1, Hq=2, Hkv=2, N=20, S=23, P=5, D=16)
DECODE_CHECK_VARIANTS = {  # name: Case options; forward only, under no_grad (the decode kernels)
    "decode-gqa-mask": {"Hkv": 2, "N": 1, "mask": "rows"},
    "decode-spec4-causal-per_row": {"Hkv": 2, "N": 4, "causal": True, "shared": False},
}
GPU_DECODE_CHECK_SIZE = dict(B=24, Hq=8, S=1000, P=700, D=128)
CPU_DECODE_CHECK_SIZE = dict(B=3, Hq=4, S=20, P=17, D=16)

TIMING_SHAPES = [(hkv, n, p) for hkv in (32, 8) for n in (1024, 4096) for p in (16, 128, 1024)]
QUICK_TIMING_SHAPES = [(8, 4096, 128), (8, 4096, 1024), (32, 1024, 128)]
B = 8
DECODE_SHAPES = [(64, 1), (64, 4), (8, 1)]  # (B, N)
QUICK_DECODE_SHAPES = [(64, 1)]
TWO_LEVEL_SHAPES = [(64, 1), (64, 4)]  # (B, N)
QUICK_TWO_LEVEL_SHAPES = [(64, 1)]


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int | None):
    """Raise CaseTimeout in the block after `seconds` (none: no limit)."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_cases(device: str, quick: bool):
    """(name, Case options, with backward) of the correctness checks."""
    gpu = device == "cuda"
    size = GPU_CHECK_SIZE if gpu else CPU_CHECK_SIZE
    decode_size = GPU_DECODE_CHECK_SIZE if gpu else CPU_DECODE_CHECK_SIZE
    names = QUICK_CHECK_VARIANTS if quick else CHECK_VARIANTS
    decode_names = QUICK_DECODE_CHECK_VARIANTS if quick else DECODE_CHECK_VARIANTS
    return ([(name, {**size, **CHECK_VARIANTS[name]}, True) for name in names]
            + [(name, {**decode_size, **DECODE_CHECK_VARIANTS[name]}, False) for name in decode_names])


def check_dropout(device: str, dtype) -> list[str]:
    """Dropout through the general kernels: forward and backward drew the same mask, at rate 1 - p."""
    p = DROPOUT_CHECK["dropout_p"]
    size = {k: v for k, v in DROPOUT_CHECK.items() if k != "dropout_p"}
    head_dim = (GPU_CHECK_SIZE if device == "cuda" else CPU_CHECK_SIZE)["D"]
    size["D"] = max(head_dim, size["P"] + size["S"])
    forward, backward, kept = dropout_probabilities(**size, dropout_p=p, dtype=dtype, device=device)
    rate = kept.float().mean().item()
    bad = [] if torch.equal(kept, backward != 0) else ["forward and backward drew different dropout masks"]
    if (backward - forward).abs().max().item() > 1e-2 * forward.abs().max().item():
        bad.append("backward's kept probabilities differ from the forward's")
    if abs(rate - (1 - p)) > 5 * (p * (1 - p) / kept.numel()) ** 0.5:
        bad.append(f"keep rate {rate:.3f}, expected {1 - p:.2f}")
    return bad


def check(device: str, quick: bool = False, timeout: int | None = None) -> bool:
    """Print one line per (dtype, case); True when all match the oracle."""
    ok = True
    for dtype in GPU_CHECK_DTYPES if device == "cuda" else CHECK_DTYPES:
        cases = [(name, Case(**options), backward) for name, options, backward in check_cases(device, quick)]
        cases += [("dropout", None, True)] if dtype == torch.bfloat16 or not quick else []
        for name, case, backward in cases:
            try:
                with time_limit(timeout):
                    if case is None:
                        bad = check_dropout(device, dtype)
                    else:
                        compare = compare_to_oracle if backward else compare_forward_to_oracle
                        bad = [str(c) for c in compare(make_inputs(case, dtype, device, requires_grad=backward),
                                                       "triton") if not c.ok]
            except (AssertionError, CaseTimeout) as error:
                bad = [f"{type(error).__name__}: {error}"]
            ok &= not bad
            print(f"check {str(dtype).removeprefix('torch.'):<9} {name:<28} {case or ''}  "
                  + ("ok" if not bad else "FAIL " + "; ".join(bad)), flush=True)
    return ok


def matmul_tflops() -> float:
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def providers(hkv: int, n: int, p: int):
    """(name, step(mode) -> None) closures over preallocated inputs; mode is "fwd" or "fwd_bwd"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16).requires_grad_()

    q, k, v = randn(B, HQ, n, D), randn(B, hkv, n, D), randn(B, hkv, n, D)
    prefix_k, prefix_v = randn(hkv, p, D), randn(hkv, p, D)
    dout = torch.randn(B, HQ, n, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    lower_right = causal_lower_right(n, p + n)

    def fused():
        out = prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, backend="triton")
        return out, (q, k, v, prefix_k, prefix_v)

    def concat_sdpa():
        rows = (B, -1, -1, -1)
        keys = torch.cat([prefix_k.expand(rows), k], dim=2)
        values = torch.cat([prefix_v.expand(rows), v], dim=2)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=lower_right, enable_gqa=hkv != HQ)
        return out, (q, k, v, prefix_k, prefix_v)

    def floor():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != HQ), (q, k, v)

    def stepper(attention):
        def step(mode):
            if mode == "fwd":
                with torch.no_grad():
                    attention()
            else:
                out, inputs = attention()
                torch.autograd.grad(out, inputs, dout)
        return step

    return {"fastprefix": stepper(fused), "concat+SDPA": stepper(concat_sdpa), "floor": stepper(floor)}


def time_case(label: str, timeout: int | None, measure) -> dict | None:
    """measure() under the case timeout; None (and a line saying so) when it passes it."""
    start = time.perf_counter()
    try:
        with time_limit(timeout):
            row = measure()
    except CaseTimeout as error:
        print(f"timed {label}: skipped, {error}", flush=True)
        return None
    print(f"timed {label} ({time.perf_counter() - start:.0f} s, compiles included)", flush=True)
    return row


def time_all(shapes, timeout: int | None = None):
    from triton.testing import do_bench

    def measure(steps, hkv, n, p, mode):
        row = dict(Hkv=hkv, N=n, P=p, mode=mode)
        for name, step in steps.items():
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(mode)
            torch.cuda.synchronize()
            row[f"{name} peak MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            row[f"{name} ms"] = do_bench(lambda: step(mode), warmup=25, rep=100, return_mode="median")
        keys = p + n / 2
        flops = 4 * B * HQ * n * D * keys * (1 if mode == "fwd" else 3.5)
        row["TFLOP/s"] = flops / row["fastprefix ms"] / 1e9
        row["vs floor+prefix"] = row["fastprefix ms"] / (row["floor ms"] * keys / (n / 2))
        row["concat / fused"] = row["concat+SDPA ms"] / row["fastprefix ms"]
        return row

    rows = []
    for hkv, n, p in shapes:
        steps = providers(hkv, n, p)
        for mode in ("fwd", "fwd_bwd"):
            row = time_case(f"Hkv={hkv} N={n} P={p} {mode}", timeout, lambda: measure(steps, hkv, n, p, mode))
            rows += [row] if row else []
    return rows


def time_decode(shapes, timeout: int | None = None, providers=decode_providers, stored: int = DECODE_P,
                per_row: int = DECODE_P, label: str = "decode"):
    """Decode rows of `shapes` [(B, N)] for `providers` (`decode_providers` or `two_level_providers`): fastprefix
    reads the `stored` prompt tokens once, each row's copy holds `per_row` prompt tokens."""
    from triton.testing import do_bench

    def measure(b, n):
        fused, baselines = providers(b, n)
        baselines = usable_baselines(fused, baselines)
        row = dict(B=b, N=n, **{"fastprefix ms": do_bench(fused, warmup=25, rep=100, return_mode="median")})
        sdpa_ms = {name: do_bench(step, warmup=25, rep=100, return_mode="median") for name, step in baselines.items()}
        best = min(sdpa_ms, key=sdpa_ms.get)
        row.update({"SDPA ms": sdpa_ms[best], "SDPA kernel": best})
        kv_bytes = 2 * 2 * D * DECODE_HKV  # K and V, bf16, per token
        row["fastprefix GB/s"] = kv_bytes * (stored + b * DECODE_S) / row["fastprefix ms"] / 1e6
        row["SDPA GB/s"] = kv_bytes * b * (per_row + DECODE_S) / row["SDPA ms"] / 1e6
        row["speedup"] = row["SDPA ms"] / row["fastprefix ms"]
        return row

    rows = []
    for b, n in shapes:
        row = time_case(f"{label} B={b} N={n}", timeout, lambda: measure(b, n))
        rows += [row] if row else []
    return rows


def time_two_level(shapes, timeout: int | None = None):
    stored = TWO_LEVEL_SYSTEM + TWO_LEVEL_DOCUMENTS * TWO_LEVEL_DOCUMENT
    return time_decode(shapes, timeout, two_level_providers, stored, TWO_LEVEL_SYSTEM + TWO_LEVEL_DOCUMENT,
                       "two-level decode")


def markdown(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def decode_table(rows, title: str | None = None) -> list[str]:
    title = title or (f"Decode, bf16, Hq={HQ}, Hkv={DECODE_HKV}, D={D}, shared prefix P={DECODE_P}, per-row cache "
                      f"S={DECODE_S}; GB/s = K/V bytes each reads / time.")
    header = ["B", "N", "fused ms", "fused GB/s", "SDPA ms", "SDPA GB/s", "SDPA kernel", "speedup"]
    return [title, ""] + markdown(header, [
        [r["B"], r["N"], f"{r['fastprefix ms']:.3f}", f"{r['fastprefix GB/s']:.0f}", f"{r['SDPA ms']:.3f}",
         f"{r['SDPA GB/s']:.0f}", r["SDPA kernel"], f"{r['speedup']:.2f}"] for r in rows])


TWO_LEVEL_TITLE = (f"Two-level decode (levels_prefix_attention), bf16, Hq={HQ}, Hkv={DECODE_HKV}, D={D}, a shared "
                   f"{TWO_LEVEL_SYSTEM}-token system prompt, {TWO_LEVEL_DOCUMENTS} documents of {TWO_LEVEL_DOCUMENT} "
                   f"tokens read by row, per-row cache S={DECODE_S}; SDPA over per-row copies of both prompts.")


def table(rows, dense_tflops) -> list[str]:
    title = (f"bf16, causal, B={B}, Hq={HQ}, D={D}, S=N, shared prefix with gradient; dense bf16 matmul "
             f"{dense_tflops:.0f} TFLOP/s.")
    header = ["Hkv", "N", "P", "mode", "fused ms", "TFLOP/s", "concat ms", "floor ms", "fused/(floor+P)",
              "concat/fused", "fused MiB", "concat MiB"]
    return [title, ""] + markdown(header, [
        [r["Hkv"], r["N"], r["P"], r["mode"], f"{r['fastprefix ms']:.3f}", f"{r['TFLOP/s']:.1f}",
         f"{r['concat+SDPA ms']:.3f}", f"{r['floor ms']:.3f}", f"{r['vs floor+prefix']:.2f}",
         f"{r['concat / fused']:.2f}", f"{r['fastprefix peak MiB']:.0f}", f"{r['concat+SDPA peak MiB']:.0f}"]
        for r in rows])


def goals(rows, dense_tflops, decode_rows) -> list[str]:
    """One line per goal of issues 3 and 6, with PASS/FAIL and the worst case (NOT MEASURED without rows)."""
    found = []

    def goal(text, candidates, worst_of, passes, describe):
        if not candidates:
            found.append(f"NOT MEASURED {text}")
            return
        worst = worst_of(candidates)
        found.append(f"{'PASS' if passes(worst) else 'FAIL'} {text}: worst {describe(worst)}")

    where = lambda r: f"at Hkv={r['Hkv']} N={r['N']} P={r['P']} {r['mode']}"
    goal("fwd+bwd <= 1.15 x (floor + prefix FLOPs)", [r for r in rows if r["mode"] == "fwd_bwd"],
         lambda c: max(c, key=lambda r: r["vs floor+prefix"]), lambda r: r["vs floor+prefix"] <= 1.15,
         lambda r: f"{r['vs floor+prefix']:.2f} {where(r)}")
    goal("concat+SDPA >= 1.3 x fused at P >= 128", [r for r in rows if r["P"] >= 128],
         lambda c: min(c, key=lambda r: r["concat / fused"]), lambda r: r["concat / fused"] >= 1.3,
         lambda r: f"{r['concat / fused']:.2f} {where(r)}")
    goal(f"bf16 forward at N=4096 >= 60% of {dense_tflops:.0f} TFLOP/s",
         [r for r in rows if r["mode"] == "fwd" and r["N"] == 4096], lambda c: min(c, key=lambda r: r["TFLOP/s"]),
         lambda r: r["TFLOP/s"] >= 0.6 * dense_tflops, lambda r: f"{r['TFLOP/s']:.0f} {where(r)}")
    goal("decode B=64 N=1 >= 5 x faster than SDPA over per-row copies",
         [r for r in decode_rows if r["B"] == 64 and r["N"] == 1], lambda c: c[0], lambda r: r["speedup"] >= 5,
         lambda r: f"{r['speedup']:.2f}")
    return found


def describe() -> str:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {device}, torch {torch.__version__}, "
            f"triton {triton.__version__}, commit {commit}")


class CompileCounter:
    """Counts the kernel variants Triton compiles (its JIT's post-compile hook) while active."""

    def __enter__(self):
        import triton

        self.compiled, self._knobs = [], triton.knobs.runtime
        self._previous = self._knobs.jit_post_compile_hook
        self._knobs.jit_post_compile_hook = lambda **kwargs: self.compiled.append(kwargs["fn"].name)
        return self

    def __exit__(self, *exc):
        self._knobs.jit_post_compile_hook = self._previous


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="fastprefix Triton kernels on a GPU: correctness, then timing.")
    parser.add_argument("--quick", action="store_true", help="the cases a short GPU lease needs (about 6 minutes)")
    parser.add_argument("--check-only", action="store_true", help="stop after the correctness checks")
    parser.add_argument("--case-timeout", type=int, default=240, metavar="S",
                        help="seconds one case may take, compiles included (default: 240)")
    parser.add_argument("--json", metavar="PATH", help="write the setup, timings and goals as JSON to PATH")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables and goals as markdown to PATH")
    parser.add_argument("--estimate", metavar="REPORT.json",
                        help="print the quick run's compile time estimated from the compile report, and exit")
    args = parser.parse_args(argv)
    if args.estimate:
        from gpu_plan import estimate, plan

        dropout = {k: v for k, v in DROPOUT_CHECK.items() if k != "dropout_p"}
        dropout["D"] = max(GPU_CHECK_SIZE["D"], dropout["P"] + dropout["S"])
        sizes = dict(B=B, HQ=HQ, D=D, DECODE_HKV=DECODE_HKV, DECODE_P=DECODE_P, DECODE_S=DECODE_S)
        planned = plan(check_cases("cuda", quick=True), ["fp16", "bf16"], ("bf16", dropout),
                       QUICK_TIMING_SHAPES, QUICK_DECODE_SHAPES, sizes)
        print(estimate(args.estimate, planned))
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    print(describe(), flush=True)
    with CompileCounter() as counter:
        if not check(device, args.quick, args.case_timeout):
            print("correctness checks failed: no timing.")
            return 1
        if args.check_only:
            return 0
        if device != "cuda":
            print("no CUDA device: timing needs a GPU (use --check-only here).")
            return 2
        dense = matmul_tflops()
        rows = time_all(QUICK_TIMING_SHAPES if args.quick else TIMING_SHAPES, args.case_timeout)
        decode_rows = time_decode(QUICK_DECODE_SHAPES if args.quick else DECODE_SHAPES, args.case_timeout)
        two_level_rows = time_two_level(QUICK_TWO_LEVEL_SHAPES if args.quick else TWO_LEVEL_SHAPES,
                                        args.case_timeout)
    summary = (f"{len(counter.compiled)} kernel variants compiled; {time.perf_counter() - start:.0f} s in all"
               f"{' (--quick)' if args.quick else ''}")
    lines = [describe(), "", *table(rows, dense), "", *decode_table(decode_rows), "",
             *decode_table(two_level_rows, TWO_LEVEL_TITLE), "", summary, "",
             *goals(rows, dense, decode_rows)]
    print("\n" + "\n".join(lines))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": describe(), "quick": args.quick, "dense_bf16_tflops": dense, "rows": rows,
                       "decode_rows": decode_rows, "two_level_rows": two_level_rows, "compiled": len(counter.compiled),
                       "seconds": time.perf_counter() - start, "goals": goals(rows, dense, decode_rows)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
