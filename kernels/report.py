"""Ahead-of-time compile report: every kernel variant compiled for sm_80 and sm_90, no GPU needed.

    python -m fastprefix.kernels.report [--json PATH]

Variants: each kernel (forward, backward preprocess, dQ, dK/dV of the sequence or a per-row prefix, dK/dV
of a shared prefix into fp32 partials, dBias; the decode kernels: shared prefix over stacked queries,
split-KV over per-row keys, merge of the parts) x features ("plain": none; "all": causal, mask, bias,
dropout, those the kernel has) x every autotune config the pruner can keep at that head dim (every launch
config for the decode kernels) x D in {64, 128} x fp16/bf16 x sm_80/sm_90. Arguments are specialized the
way Triton's JIT specializes a typical call (unit last-dim strides become constants, pointers and other
strides 16-divisible).

For each variant: registers, shared memory, stack, local memory and local loads/stores in the SASS
(spills), and the tensor-core instructions present (HMMA: mma.sync, Ampere and later; HGMMA: Hopper
wgmma). Exits 1 when a variant fails to compile, spills, or a kernel with dots has no tensor-core
instruction. Needs Triton's compiler and the cuobjdump shipped with it; TRITON_INTERPRET must be unset.
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

ARCHS = (80, 90)
HEAD_DIMS = (64, 128)
DTYPES = ("fp16", "bf16")
FEATURES = {
    "plain": dict(CAUSAL=False, HAS_MASK=False, HAS_BIAS=False, DROPOUT=False),
    "all": dict(CAUSAL=True, HAS_MASK=True, HAS_BIAS=True, DROPOUT=True),
}
DEFAULT_LAUNCH = (4, 3)  # (num_warps, num_stages) of a launch that passes neither
SMEM_BYTES = {80: 163 * 1024, 90: 227 * 1024}  # shared memory a block may opt into (A100, H100/H200)

_FP32_POINTERS = {"LSE", "DELTA", "LSE2", "DB", "PART_O", "PART_L"}
_FLOATS = {"scale", "scale_log2", "dropout_p"}
_SIZES = {"Hq", "G", "N", "S", "P", "n_keys", "col0", "shift", "pairs", "per_chunk", "seed", "TUNE_Q",
          "TUNE_KV", "Hb", "units_h", "units_m", "units", "out_rows", "chunks", "Hkv", "n_rows", "per_split",
          "part0", "n_parts"}
_NO_DOTS = {"bwd_preprocess", "decode_merge"}


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
        if self.local_bytes or self.local_accesses:
            found.append(f"spills to local memory ({self.local_bytes} B, {self.local_accesses} LDL/STL)")
        if self.variant.has_dots and not (self.hmma or self.hgmma):
            found.append("no tensor-core instruction (HMMA/HGMMA) in a kernel with dots")
        return found


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
    }


def _constexprs(kernel: str, features: str) -> dict:
    return {**FEATURES[features], **_kernels()[kernel][1]}


def _configs(kernel: str, arch: int, block_d: int, constexprs: dict, itemsize: int = 2):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the launcher can use here: the autotune candidates the pruner
    keeps for a long sequence or for a decoding step, or the launches the fixed-launch kernels take through
    the resource gate."""
    from fastprefix.kernels import tuning

    tuned = _kernels()[kernel][3]
    features = tuning.features_of(constexprs)
    gate = dict(arch=arch, smem_bytes=SMEM_BYTES[arch], block_d=block_d, itemsize=itemsize)
    if kernel in ("bwd_preprocess", "decode_merge"):
        warps = tuning.MERGE_WARPS if kernel == "decode_merge" else DEFAULT_LAUNCH[0]
        return [(tuning.preprocess_block(block_d), 0, warps, DEFAULT_LAUNCH[1])]
    if kernel.startswith("decode_"):
        gathers = constexprs["HAS_MASK"] or constexprs["HAS_BIAS"]
        preferred = {tuning.decode_preference(kernel.removeprefix("decode_"), rows, gathers) for rows in (1, 4096)}
        launches = sorted({tuning.gated(tuning.DECODE, c, features=features, **gate) for c in preferred},
                          key=dataclasses.astuple, reverse=True)
    elif tuned is None:
        launches = [tuning.gated(tuning.DBIAS, tuning.DBIAS.preferred, features=features | {"bias"}, **gate)]
    else:
        launches = [config for config in tuned.candidates
                    if any(tuning.suits_problem(tuned, config, n_q=n_q, n_kv=4096)
                           and tuning.within_resources(tuned, config, features=features, **gate)
                           for n_q in (1, 4096))]
    return [dataclasses.astuple(c) for c in launches]


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def variants() -> list[Variant]:
    found = []
    for name, (fn, _, _, _) in _kernels().items():
        has_features = any(flag in fn.arg_names for flag in FEATURES["all"])
        for features in FEATURES if has_features else ("plain",):
            for arch in ARCHS:
                for head_dim in HEAD_DIMS:
                    for config in _configs(name, arch, _block_d(head_dim), _constexprs(name, features)):
                        for dtype in DTYPES:
                            found.append(Variant(name, features, arch, head_dim, dtype, *config))
    return found


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
            element = ("fp32" if name in _FP32_POINTERS else "u8" if name == "MASK"
                       else dk_dtype if name in ("DK", "DV") else dtype)
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
                  BLOCK_M=v.block_m, UPCAST=False, PRECISION="tf32", BLOCK_N=v.block_n)
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


def run_all(workers: int | None = None) -> list[Result]:
    todo = variants()
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
    lines.append(f"{len(results)} variants compiled for sm_{'/sm_'.join(map(str, ARCHS))}; {bad} with problems "
                 "(compile failure, local-memory spill, or dots without tensor-core instructions).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastprefix.kernels.report", description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write every result as JSON to PATH")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("report: unset TRITON_INTERPRET; the interpreter cannot compile kernels ahead of time.", file=sys.stderr)
        return 2
    results = run_all()
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(asdict(r), problems=r.problems) for r in results], f, indent=1)
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
