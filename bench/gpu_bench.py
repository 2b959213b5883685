"""fastprefix's Triton kernels on a GPU: correctness first, then one timing table.

    python bench/gpu_bench.py [--json PATH]     # on a CUDA machine
    python bench/gpu_bench.py --check-only      # correctness only; on a CPU machine it runs the kernels at
                                                # tiny sizes through Triton's interpreter

1. Correctness: forward, lse and every gradient of backend="triton" against the float64 oracle
   (fastprefix.testing.compare_to_oracle) on random inputs, fp16/bf16/fp32, with and without causal, GQA,
   a padding mask, a per-row prefix. Any failure stops the script (exit 1) before timing.
2. The dense bf16 matmul rate of this GPU (8192^3 torch.matmul), the ceiling for the forward.
3. Timing (bf16, causal, B=8, Hq=32, D=128, S=N, shared prefix [Hkv, P, D] with a gradient):
   forward and forward+backward of
     fastprefix      prefix_attention(..., backend="triton")
     concat+SDPA     the prefix expanded over the batch and concatenated (what PEFT does), then
                     scaled_dot_product_attention with the flash backend and a lower-right causal mask
     floor           the same SDPA without any prefix
   at Hkv in {32, 8}, N in {1024, 4096}, P in {16, 128, 1024}. Times are medians of
   triton.testing.do_bench. FLOPs count P + S/2 keys per query (causal halves the sequence part);
   forward = 4 B Hq N D keys, backward = 2.5 x forward.
4. Decode timing (bf16, inference, Hq=32, Hkv=8, D=128, a shared prefix of P=4096 tokens, a per-row cache
   of S=256 tokens): prefix_attention(..., backend="triton") on N query tokens per row (the decode kernels)
   against SDPA over per-row copies (each row's cache holds [prefix ; own tokens], as when the prompt's
   cache is copied to every row; the G query heads of a KV head are passed as G queries of that head, so
   SDPA reads each copy once per KV head; the faster of its flash and memory-efficient kernels). Memory
   read: fastprefix reads the prefix once and each row's S keys; the copies are B x (P + S) keys.

Goals (issue 3), checked and printed at the end:
   fused fwd+bwd time <= 1.15 x floor time x (P + S/2) / (S/2)   (the floor plus the prefix's own FLOPs)
   concat+SDPA time >= 1.3 x fused time, for P >= 128 (forward and forward+backward)
   bf16 forward at N = 4096 >= 60% of the dense matmul rate
   decode at B=64, N=1 >= 5 x faster than SDPA over per-row copies (issue 6)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastprefix loads its kernels (and Triton)

import torch.nn.functional as F  # noqa: E402

from fastprefix import prefix_attention  # noqa: E402
from fastprefix.testing import Case, compare_forward_to_oracle, compare_to_oracle, make_inputs  # noqa: E402

CHECK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHECK_VARIANTS = {  # name: Case options
    "plain": {},
    "causal": {"causal": True},
    "gqa": {"Hkv": 2},
    "causal-gqa-mask-per_row": {"causal": True, "Hkv": 2, "mask": "rows", "shared": False},
}
GPU_CHECK_SIZE = dict(B=2, Hq=8, Hkv=8, N=300, S=333, P=48, D=128)
CPU_CHECK_SIZE = dict(B=1, Hq=2, Hkv=2, N=20, S=23, P=5, D=16)
DECODE_CHECK_VARIANTS = {  # name: Case options; forward only, under no_grad (the decode kernels)
    "decode-gqa-mask": {"Hkv": 2, "N": 1, "mask": "rows"},
    "decode-spec4-causal-per_row": {"Hkv": 2, "N": 4, "causal": True, "shared": False},
}
GPU_DECODE_CHECK_SIZE = dict(B=24, Hq=8, S=1000, P=700, D=128)
CPU_DECODE_CHECK_SIZE = dict(B=3, Hq=4, S=20, P=17, D=16)

TIMING_SHAPES = [(hkv, n, p) for hkv in (32, 8) for n in (1024, 4096) for p in (16, 128, 1024)]
B, HQ, D = 8, 32, 128
DECODE_SHAPES = [(64, 1), (64, 4), (8, 1)]  # (B, N)
DECODE_HKV, DECODE_P, DECODE_S = 8, 4096, 256


def check(device: str) -> bool:
    """Print one line per (dtype, variant); True when all match the oracle."""
    gpu = device == "cuda"
    size = GPU_CHECK_SIZE if gpu else CPU_CHECK_SIZE
    decode_size = GPU_DECODE_CHECK_SIZE if gpu else CPU_DECODE_CHECK_SIZE
    variants = [(name, {**size, **options}, True) for name, options in CHECK_VARIANTS.items()]
    variants += [(name, {**decode_size, **options}, False) for name, options in DECODE_CHECK_VARIANTS.items()]
    ok = True
    for dtype in CHECK_DTYPES:
        for name, options, backward in variants:
            case = Case(**options)
            try:
                compare = compare_to_oracle if backward else compare_forward_to_oracle
                bad = [str(c) for c in compare(make_inputs(case, dtype, device, requires_grad=backward), "triton")
                       if not c.ok]
            except AssertionError as error:
                bad = [str(error)]
            ok &= not bad
            print(f"check {str(dtype).removeprefix('torch.'):<9} {name:<28} {case}  "
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


def time_all():
    from triton.testing import do_bench

    rows = []
    for hkv, n, p in TIMING_SHAPES:
        steps = providers(hkv, n, p)
        for mode in ("fwd", "fwd_bwd"):
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
            rows.append(row)
            print(f"timed Hkv={hkv} N={n} P={p} {mode}", flush=True)
    return rows


def decode_providers(b: int, n: int, device: str = "cuda", p: int = DECODE_P, s: int = DECODE_S,
                     dtype=torch.bfloat16):
    """(fused, {SDPA kernel: step}) for the decode case, each step() -> out: fastprefix on a shared prefix
    [Hkv, P, D] and per-row caches [B, Hkv, S, D], and SDPA over per-row copies [B, Hkv, P + S, D]
    (allocated before timing, as a copied cache would be)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    hkv, g = DECODE_HKV, HQ // DECODE_HKV
    q, k, v = randn(b, HQ, n, D), randn(b, hkv, s, D), randn(b, hkv, s, D)
    prefix_k, prefix_v = randn(hkv, p, D), randn(hkv, p, D)
    copies_k = torch.cat([prefix_k.expand(b, -1, -1, -1), k], dim=2)
    copies_v = torch.cat([prefix_v.expand(b, -1, -1, -1), v], dim=2)
    # Query i of head h * G + j is row j * N + i of KV head h, so SDPA reads each copy once per KV head; with
    # N > 1 a bool mask gives query i the lower-right causal window (sequence keys up to S - N + i).
    grouped_q = q.view(b, hkv, g * n, D)
    mask = None
    if n > 1:
        last_key = p + s - n + torch.arange(n, device=device).repeat(g)
        mask = torch.arange(p + s, device=device)[None, :] <= last_key[:, None]

    def fused():
        with torch.no_grad():
            return prefix_attention(q, k, v, prefix_k, prefix_v, causal=n > 1, backend="triton")

    def sdpa(backend):
        def step():
            with torch.no_grad(), sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(grouped_q, copies_k, copies_v, attn_mask=mask)
            return out.view(b, HQ, n, D)
        return step

    return fused, {"flash": sdpa(SDPBackend.FLASH_ATTENTION), "efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)}


def usable_baselines(fused, baselines) -> dict:
    """The SDPA kernels that take these shapes, each checked against fastprefix's output (bf16: 2e-2
    relative); raises AssertionError on a mismatch."""
    from fastprefix.testing import relative_error

    expected = fused()
    usable = {}
    for name, step in baselines.items():
        try:
            out = step()
        except RuntimeError as error:  # a kernel that refuses these shapes or this device
            print(f"SDPA {name}: not usable here ({str(error).splitlines()[0]})", flush=True)
            continue
        error = relative_error(expected, out)
        assert error < 2e-2, f"fastprefix decode differs from SDPA {name} over per-row copies: {error:.2e}"
        usable[name] = step
    return usable


def time_decode():
    from triton.testing import do_bench

    rows = []
    for b, n in DECODE_SHAPES:
        fused, baselines = decode_providers(b, n)
        baselines = usable_baselines(fused, baselines)
        row = dict(B=b, N=n, **{"fastprefix ms": do_bench(fused, warmup=25, rep=100, return_mode="median")})
        sdpa_ms = {name: do_bench(step, warmup=25, rep=100, return_mode="median") for name, step in baselines.items()}
        best = min(sdpa_ms, key=sdpa_ms.get)
        row.update({"SDPA ms": sdpa_ms[best], "SDPA kernel": best})
        kv_bytes = 2 * 2 * D * DECODE_HKV  # K and V, bf16, per token
        row["fastprefix GB/s"] = kv_bytes * (DECODE_P + b * DECODE_S) / row["fastprefix ms"] / 1e6
        row["SDPA GB/s"] = kv_bytes * b * (DECODE_P + DECODE_S) / row["SDPA ms"] / 1e6
        row["speedup"] = row["SDPA ms"] / row["fastprefix ms"]
        rows.append(row)
        print(f"timed decode B={b} N={n}", flush=True)
    return rows


def print_decode_table(rows):
    print(f"\ndecode, bf16, Hq={HQ}, Hkv={DECODE_HKV}, D={D}, shared prefix P={DECODE_P}, per-row cache "
          f"S={DECODE_S}; GB/s = K/V bytes each reads / time")
    header = (f"{'B':>4}{'N':>4}{'fused ms':>10}{'fused GB/s':>11}{'SDPA ms':>9}{'SDPA GB/s':>10}{'SDPA kernel':>12}"
              f"{'speedup':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['B']:>4}{r['N']:>4}{r['fastprefix ms']:>10.3f}{r['fastprefix GB/s']:>11.0f}{r['SDPA ms']:>9.3f}"
              f"{r['SDPA GB/s']:>10.0f}{r['SDPA kernel']:>12}{r['speedup']:>9.2f}")


def print_table(rows, dense_tflops):
    print(f"\nbf16, causal, B={B}, Hq={HQ}, D={D}, S=N, shared prefix with gradient; dense bf16 matmul "
          f"{dense_tflops:.0f} TFLOP/s")
    header = (f"{'Hkv':>4}{'N':>6}{'P':>6} {'mode':<8}{'fused ms':>9}{'TFLOP/s':>9}{'concat ms':>10}{'floor ms':>9}"
              f"{'fused/(floor+P)':>16}{'concat/fused':>13}{'fused MiB':>10}{'concat MiB':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['Hkv']:>4}{r['N']:>6}{r['P']:>6} {r['mode']:<8}{r['fastprefix ms']:>9.3f}{r['TFLOP/s']:>9.1f}"
              f"{r['concat+SDPA ms']:>10.3f}{r['floor ms']:>9.3f}{r['vs floor+prefix']:>16.2f}"
              f"{r['concat / fused']:>13.2f}{r['fastprefix peak MiB']:>10.0f}{r['concat+SDPA peak MiB']:>11.0f}")


def goals(rows, dense_tflops, decode_rows) -> list[str]:
    """One line per goal of issues 3 and 6, with PASS/FAIL and the worst case."""
    bwd = [r for r in rows if r["mode"] == "fwd_bwd"]
    worst = max(bwd, key=lambda r: r["vs floor+prefix"])
    big_p = [r for r in rows if r["P"] >= 128]
    slowest = min(big_p, key=lambda r: r["concat / fused"])
    fwd_4k = [r for r in rows if r["mode"] == "fwd" and r["N"] == 4096]
    decode = next(r for r in decode_rows if r["B"] == 64 and r["N"] == 1)
    weakest = min(fwd_4k, key=lambda r: r["TFLOP/s"])
    return [
        f"{'PASS' if worst['vs floor+prefix'] <= 1.15 else 'FAIL'} fwd+bwd <= 1.15 x (floor + prefix FLOPs): worst "
        f"{worst['vs floor+prefix']:.2f} at Hkv={worst['Hkv']} N={worst['N']} P={worst['P']}",
        f"{'PASS' if slowest['concat / fused'] >= 1.3 else 'FAIL'} concat+SDPA >= 1.3 x fused at P >= 128: worst "
        f"{slowest['concat / fused']:.2f} at Hkv={slowest['Hkv']} N={slowest['N']} P={slowest['P']} "
        f"{slowest['mode']}",
        f"{'PASS' if weakest['TFLOP/s'] >= 0.6 * dense_tflops else 'FAIL'} bf16 forward at N=4096 >= 60% of "
        f"{dense_tflops:.0f} TFLOP/s: worst {weakest['TFLOP/s']:.0f} at Hkv={weakest['Hkv']} P={weakest['P']}",
        f"{'PASS' if decode['speedup'] >= 5 else 'FAIL'} decode B={decode['B']} N=1 >= 5 x faster than SDPA over "
        f"per-row copies: {decode['speedup']:.2f}",
    ]


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="fastprefix Triton kernels on a GPU: correctness, then timing.")
    parser.add_argument("--check-only", action="store_true", help="stop after the correctness checks")
    parser.add_argument("--json", metavar="PATH", help="write the timing rows as JSON to PATH")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(describe(), flush=True)
    if not check(device):
        print("correctness checks failed: no timing.")
        return 1
    if args.check_only:
        return 0
    if device != "cuda":
        print("no CUDA device: timing needs a GPU (use --check-only here).")
        return 2
    dense = matmul_tflops()
    rows = time_all()
    decode_rows = time_decode()
    print_table(rows, dense)
    print_decode_table(decode_rows)
    print("\n".join(goals(rows, dense, decode_rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": describe(), "dense_bf16_tflops": dense, "rows": rows, "decode_rows": decode_rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
