"""Ahead-of-time compile report: every kernel variant the launchers can use, compiled for the GPUs fastprefix
targets, no GPU needed.

    python -m fastprefix.kernels.report [--quick] [--json PATH]

Variants: each kernel (forward, backward preprocess, dQ, dK/dV of the sequence or a per-row prefix, dK/dV
of a shared prefix into fp32 partials, dBias; the decode kernels: shared prefix over stacked queries,
split-KV over per-row keys, merge of the parts; reading a prefix bank by row index: forward, dQ, dK/dV of
each entry over its rows, decode of each entry over its rows' stacked queries) x features ("plain": none;
"all": causal, mask, bias, dropout, those the kernel has; a bank has no bias) x every launch the resource
gate admits (`tuning.Gate`: the autotune configs the pruner can keep for a long sequence or a decoding step,
the fixed launches of the other kernels) x D in {64, 128, 256} (the decode kernels: 64, 128) x fp16/bf16 x
sm_80 (A100), sm_86 (RTX 30xx, A10), sm_89 (RTX 40xx, L4, L40S), sm_90 (H100, H200). float32 is not launched
on GPUs (`tuning.FLOAT32_ON_GPUS`: its IEEE dots spill at most tile sizes, which this report showed when it
covered float32). `--quick` compiles a representative set of targets (every architecture, head dim and
dtype at least once; about 2 minutes on 2 cores) instead of all of them. Arguments are specialized the way
Triton's JIT specializes a typical call (unit last-dim strides become constants, pointers and other strides
16-divisible).

For each variant: registers, shared memory, stack, local memory and local loads/stores in the SASS
(spills), the tensor-core instructions present (HMMA: mma.sync, Ampere and later; HGMMA: Hopper wgmma), and
the compile time. Exits 1 when a variant fails to compile, spills, needs more shared memory than its
architecture allows a block, or is a kernel with dots but no tensor-core instruction. Targets where
a kernel has no launch that fits are listed: the dispatcher sends those calls to the torch backend. Needs
Triton's compiler and the cuobjdump shipped with it; TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

ARCHS = (80, 86, 89, 90)
HEAD_DIMS = (64, 128, 256)
DTYPES = ("fp16", "bf16")
"""float32 is not launched on GPUs (`tuning.FLOAT32_ON_GPUS`): its IEEE dots spill at most tile sizes."""
ITEMSIZE = {"fp16": 2, "bf16": 2}
QUICK_TARGETS = ((80, 128, "fp16"), (86, 256, "bf16"), (89, 64, "bf16"), (90, 128, "bf16"), (90, 256, "fp16"))
"""(arch, head dim, dtype) of `--quick`: every architecture, head dim and dtype at least once, and the corners
that matter most (D = 256 on the smallest shared memory; Hopper's wgmma at D = 128)."""
DECODE_MAX_HEAD_DIM = 128
"""The decode kernels take head dims up to 128 (the dispatcher sends larger heads to the general kernels)."""
FEATURES = {
    "plain": dict(CAUSAL=False, HAS_MASK=False, HAS_BIAS=False, DROPOUT=False),
    "all": dict(CAUSAL=True, HAS_MASK=True, HAS_BIAS=True, DROPOUT=True),
}
DEFAULT_LAUNCH = (4, 3)  # (num_warps, num_stages) of a launch that passes neither

_FP32_POINTERS = {"LSE", "DELTA", "LSE2", "DB", "PART_O", "PART_L"}
_INT64_POINTERS = {"ENTRIES", "INDEX", "ORDER", "STARTS"}
BANK = {"BANK": True, "ALIGN": 8, "HAS_BIAS": False}
"""Constexprs of the bank variants: no bias, entries' offsets and strides 16-byte aligned (fp16/bf16)."""
_FLOATS = {"scale", "scale_log2", "dropout_p"}
_SIZES = {"Hq", "G", "N", "S", "P", "n_keys", "col0", "shift", "pairs", "per_chunk", "seed", "TUNE_Q",
          "TUNE_KV", "Hb", "units_h", "units_m", "units", "out_rows", "chunks", "Hkv", "n_rows", "per_split",
          "part0", "n_parts", "tiles"}
_NO_DOTS = {"bwd_preprocess", "decode_merge"}


def targets(quick: bool) -> list[tuple[int, int, str]]:
    """(arch, head dim, dtype) of every target compiled for."""
    if quick:
        return list(QUICK_TARGETS)
    return [(arch, head_dim, dtype) for arch in ARCHS for head_dim in HEAD_DIMS for dtype in DTYPES]


@dataclass(frozen=True)
class Variant:
    kernel: str
    features: str
    arch: int
    head_dim: int
    dtype: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def has_dots(self) -> bool:
        return self.kernel not in _NO_DOTS


@dataclass
class Result:
    variant: Variant
    registers: int = 0
    shared_bytes: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    local_accesses: int = 0
    hmma: int = 0
    hgmma: int = 0
    seconds: float = 0.0
    error: str = ""

    @property
    def problems(self) -> list[str]:
        if self.error:
            return [f"does not compile: {self.error}"]
        found = []
        v = self.variant
        if self.local_bytes or self.local_accesses:
            found.append(f"spills to local memory ({self.local_bytes} B, {self.local_accesses} LDL/STL)")
        limit = _shared_memory_limit(v.arch)
        if self.shared_bytes > limit:
            found.append(f"needs {self.shared_bytes} B of shared memory, sm_{v.arch} allows {limit} per block")
        if v.has_dots and not (self.hmma or self.hgmma):
            found.append("no tensor-core instruction (HMMA/HGMMA) in a kernel with dots")
        return found


def _shared_memory_limit(arch: int) -> int:
    from fastprefix.kernels.tuning import ARCH_SHARED_MEMORY

    return ARCH_SHARED_MEMORY[arch]


def _kernels():
    """name -> (jit function, constexpr overrides, DK/DV element type or None, its Tuning or None)."""
    from fastprefix.kernels import backward, decode, forward, tuning

    return {
        "fwd": (forward._fwd_kernel, {}, None, tuning.FWD),
        "bwd_preprocess": (backward._bwd_preprocess_kernel, {}, None, None),
        "dq": (backward._dq_kernel, {}, None, tuning.DQ),
        "dkdv": (backward._dkdv_kernel, {}, None, tuning.DKDV),
        # a prefix is never causal- or attn_mask-masked
        "dkdv_shared_prefix": (backward._dkdv_kernel, {"CAUSAL": False, "HAS_MASK": False}, "fp32", tuning.DKDV),
        "dbias": (backward._dbias_kernel, {"SUM_COLS": False}, None, None),
        "decode_prefix": (decode._decode_prefix_kernel, {}, None, None),
        "decode_rows": (decode._decode_rows_kernel, {}, None, None),
        "decode_merge": (decode._decode_merge_kernel, {}, None, None),
        "fwd_bank": (forward._fwd_kernel, BANK, None, tuning.FWD),
        "dq_bank": (backward._dq_kernel, BANK, None, tuning.DQ),
        # each entry's gradient over its rows: like a prefix, never causal- or attn_mask-masked
        "dkdv_bank": (backward._dkdv_kernel, {**BANK, "CAUSAL": False, "HAS_MASK": False}, None, tuning.DKDV),
        "decode_prefix_bank": (decode._decode_prefix_kernel, BANK, None, None),
    }


def _constexprs(kernel: str, features: str) -> dict:
    return {**FEATURES[features], **_kernels()[kernel][1]}


def _gate(arch: int, head_dim: int, dtype: str, constexprs: dict):
    from fastprefix.kernels import tuning

    return tuning.Gate(arch, _shared_memory_limit(arch), _block_d(head_dim), ITEMSIZE[dtype],
                       tuning.features_of(constexprs))


def _configs(kernel: str, gate) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the launcher can use at `gate`: the launches the pruner can
    keep for a long sequence or a decoding step, or the fixed launches of an untuned kernel. Empty where no
    launch fits (the dispatcher then runs the torch backend)."""
    from fastprefix.kernels import tuning

    tuned = _kernels()[kernel][3]
    if kernel in ("bwd_preprocess", "decode_merge"):
        warps = tuning.MERGE_WARPS if kernel == "decode_merge" else DEFAULT_LAUNCH[0]
        return [(tuning.preprocess_block(gate.block_d), 0, warps, DEFAULT_LAUNCH[1])]
    if kernel.startswith("decode_"):
        if not gate.launchable(tuning.DECODE):
            return []
        gathers = "mask" in gate.features or "bias" in gate.features
        preferred = {tuning.decode_preference(kernel.removeprefix("decode_"), rows, gathers) for rows in (1, 4096)}
        launches = sorted({gate.choose(tuning.DECODE, c) for c in preferred}, key=dataclasses.astuple, reverse=True)
    elif tuned is None:
        bias_gate = dataclasses.replace(gate, features=gate.features | {"bias"})
        fits = bias_gate.launchable(tuning.DBIAS)
        launches = [bias_gate.choose(tuning.DBIAS, tuning.DBIAS.preferred)] if fits else []
    elif not gate.launchable(tuned):
        launches = []
    else:
        chosen = [c for n_q in (1, 4096) for c in tuning.select(tuned, gate, n_q=n_q, n_kv=4096)]
        launches = list(dict.fromkeys(chosen))
    return [dataclasses.astuple(c) for c in launches]


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def _launches(quick: bool):
    """(kernel, features, arch, head dim, dtype, its launches) of every target; the decode kernels at the head
    dims they take."""
    for arch, head_dim, dtype in targets(quick):
        for name, (fn, _, _, _) in _kernels().items():
            if name.startswith("decode_") and head_dim > DECODE_MAX_HEAD_DIM:
                continue
            has_features = any(flag in fn.arg_names for flag in FEATURES["all"])
            for features in FEATURES if has_features else ("plain",):
                gate = _gate(arch, head_dim, dtype, _constexprs(name, features))
                yield name, features, arch, head_dim, dtype, _configs(name, gate)


def variants(quick: bool = False) -> list[Variant]:
    return [Variant(name, features, arch, head_dim, dtype, *config)
            for name, features, arch, head_dim, dtype, configs in _launches(quick) for config in configs]


def unlaunched(quick: bool = False) -> list[str]:
    """The (kernel, features, target) with no launch that fits: the dispatcher runs those calls on torch."""
    return [f"{name} {features} sm_{arch} D={head_dim} {dtype}"
            for name, features, arch, head_dim, dtype, configs in _launches(quick) if not configs]


def _signature(fn, dtype: str, dk_dtype: str):
    """Triton signature, constexpr values and divisibility attributes of a typical call: the stride of the
    last dimension of every tensor (named stride_<tensor>d or, over key columns, stride_<tensor>j) is 1,
    other strides and pointers are 16-divisible."""
    signature, constants, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in _SIZES:
            signature[name] = "i32"
        elif name.isupper():
            element = ("fp32" if name in _FP32_POINTERS else "i64" if name in _INT64_POINTERS
                       else "u8" if name == "MASK" else dk_dtype if name in ("DK", "DV") else dtype)
            signature[name] = "*" + element
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            signature[name] = "fp32"
        elif name.startswith("stride_") and name[-1] in "dj":
            signature[name] = "constexpr"
            constants[name] = 1
        elif name.startswith("stride_"):
            signature[name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"report: unknown argument {name!r} of {fn.__name__}; classify it in report.py")
    return signature, constants, attrs


def _cuobjdump(*args: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True).stdout


def compile_variant(v: Variant) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    fn, _, dk_dtype, _ = _kernels()[v.kernel]
    result = Result(v)
    signature, constants, attrs = _signature(fn, v.dtype, dk_dtype or v.dtype)
    values = dict(HEAD_DIM=v.head_dim, BLOCK_D=_block_d(v.head_dim), EVEN_D=_block_d(v.head_dim) == v.head_dim,
                  BLOCK_M=v.block_m, UPCAST=False, PRECISION="tf32", BLOCK_N=v.block_n, BANK=False, ALIGN=1)
    values.update(_constexprs(v.kernel, v.features))
    for name, kind in signature.items():
        if kind == "constexpr" and name not in constants:
            constants[name] = values[name]
    start = time.perf_counter()
    try:
        compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constants, attrs),
                                  target=GPUTarget("cuda", v.arch, 32),
                                  options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    except Exception as error:  # the report lists every failure instead of stopping at the first
        result.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return result
    result.seconds = time.perf_counter() - start
    result.shared_bytes = compiled.metadata.shared
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = _cuobjdump("--dump-resource-usage", "--dump-sass", cubin.name)
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", dump))
    result.registers, result.stack_bytes, result.local_bytes = (int(fields[k]) for k in ("REG", "STACK", "LOCAL"))
    result.local_accesses = len(re.findall(r"\b(?:LDL|STL)\b", dump))
    result.hgmma = len(re.findall(r"\bHGMMA\b", dump))
    result.hmma = len(re.findall(r"\bHMMA\b", dump))
    return result


def run_all(quick: bool = False, workers: int | None = None) -> list[Result]:
    todo = variants(quick)
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(compile_variant, todo))


def format_table(results: list[Result]) -> str:
    header = (f"{'kernel':<19}{'features':<9}{'sm':>3}{'D':>5} {'dtype':<5}{'BM x BN':>9}{'warps':>6}{'stages':>7}"
              f"{'regs':>6}{'smem KB':>9}{'stack':>6}{'local':>6}{'LDL/STL':>8}{'HMMA':>6}{'HGMMA':>7}  problems")
    lines = [header, "-" * len(header)]
    for r in results:
        v = r.variant
        lines.append(
            f"{v.kernel:<19}{v.features:<9}{v.arch:>3}{v.head_dim:>5} {v.dtype:<5}{f'{v.block_m}x{v.block_n}':>9}"
            f"{v.num_warps:>6}{v.num_stages:>7}{r.registers:>6}{r.shared_bytes / 1024:>9.1f}{r.stack_bytes:>6}"
            f"{r.local_bytes:>6}{r.local_accesses:>8}{r.hmma:>6}{r.hgmma:>7}  {'; '.join(r.problems) or 'ok'}")
    bad = sum(bool(r.problems) for r in results)
    archs = sorted({r.variant.arch for r in results})
    lines.append(f"{len(results)} variants compiled for sm_{'/sm_'.join(map(str, archs))} in "
                 f"{sum(r.seconds for r in results):.0f} s of compile time; {bad} with problems (compile failure, "
                 "local-memory spill, shared memory over the architecture's limit, or dots without tensor-core "
                 "instructions).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastprefix.kernels.report", description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write every result as JSON to PATH")
    parser.add_argument("--quick", action="store_true", help="a representative set of targets (QUICK_TARGETS)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("report: unset TRITON_INTERPRET; the interpreter cannot compile kernels ahead of time.", file=sys.stderr)
        return 2
    results = run_all(args.quick)
    print(format_table(results))
    for line in unlaunched(args.quick):
        print(f"no launch fits (the dispatcher runs these calls on backend='torch'): {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(asdict(r), problems=r.problems) for r in results], f, indent=1)
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
