"""Launch configurations of the Triton kernels, and the one resource gate every launch passes through.

A kernel's `Tuning` lists its launch candidates in order of preference, each with the condition under which
the compile report (`python -m fastprefix.kernels.report`) found it spill-free, and its `Footprint`: the
fp32 accumulators and input tiles one program holds. `Gate.admits` is the gate, per GPU architecture:
accumulators within 64 registers per thread, tiles within the block's shared memory, spill-free for the
architecture, head dim, dtype and features. The autotuned kernels (forward, dQ, dK/dV) prune their candidates
with it; the fixed launches (dBias, decode) take their preferred config through it; where no candidate passes,
their unpipelined versions may. A call no launch fits is not launched: the dispatcher sends it to the torch
backend with the reason (`unlaunchable`). Under the interpreter every kernel runs 16 x 16 tiles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import triton

from .common import INTERPRETED, INTERPRETER_BLOCK

FEATURE_FLAGS = {"mask": "HAS_MASK", "bias": "HAS_BIAS", "dropout": "DROPOUT", "bank": "BANK"}
TUNE_KEY = ["TUNE_Q", "TUNE_KV", "HEAD_DIM", "CAUSAL", "HAS_MASK", "HAS_BIAS", "DROPOUT", "BANK"]
REGISTERS_PER_THREAD = 64
"""fp32 accumulator registers a thread may hold; more leaves too few for operands and spills."""


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def unpipelined(self) -> LaunchConfig:
        return dataclasses.replace(self, num_stages=1)

    def triton_config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, num_warps=self.num_warps,
                             num_stages=self.num_stages)

    @classmethod
    def of(cls, config: triton.Config) -> LaunchConfig:
        return cls(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)

    def launch_options(self) -> dict:
        """Keyword arguments of a kernel launch with this config."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)


INTERPRETER_LAUNCH = LaunchConfig(INTERPRETER_BLOCK, INTERPRETER_BLOCK, 4, 1)


@dataclass(frozen=True)
class Footprint:
    """What one program holds, in tiles: fp32 accumulators of [BLOCK_M, BLOCK_D] (acc_m), [BLOCK_N, BLOCK_D]
    (acc_n) and [BLOCK_M, BLOCK_N] (acc_mn); input tiles of BLOCK_M or BLOCK_N rows x BLOCK_D loaded once
    (resident_*) or in every step of the pipelined loop (streamed_*, one copy per pipeline stage in shared
    memory). The shared-memory estimate is within 20 % of the compiler's figure (which is up to 1.2x larger
    with a mask and bias, whose tiles are staged too); the compile report checks the figure of every variant
    the gate admits against its architecture's limit."""

    acc_m: int = 0
    acc_n: int = 0
    acc_mn: int = 0
    resident_m: int = 0
    resident_n: int = 0
    streamed_m: int = 0
    streamed_n: int = 0

    def accumulator_elements(self, c: LaunchConfig, block_d: int) -> int:
        return (self.acc_m * c.block_m + self.acc_n * c.block_n) * block_d + self.acc_mn * c.block_m * c.block_n

    def shared_bytes(self, c: LaunchConfig, block_d: int, itemsize: int) -> int:
        resident = self.resident_m * c.block_m + self.resident_n * c.block_n
        streamed = self.streamed_m * c.block_m + self.streamed_n * c.block_n
        return (resident + c.num_stages * streamed) * block_d * itemsize


ARCH_SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
"""Shared memory a block may opt into, by compute capability: A100 (sm_80); RTX 30xx, A10, A40 (sm_86); RTX
40xx, L4, L40S (sm_89); H100, H200 (sm_90). At run time the device's own figure is used."""


@dataclass(frozen=True)
class Gate:
    """What a launch must fit: the GPU (compute capability as 80 / 86 / 89 / 90, and the shared memory a block
    may opt into) and the call (BLOCK_D, bytes per operand element, features in use among "mask", "bias",
    "dropout")."""

    arch: int
    smem_bytes: int
    block_d: int
    itemsize: int
    features: frozenset

    @classmethod
    def on(cls, device: torch.device, block_d: int, itemsize: int, features: frozenset) -> Gate:
        """The gate of a CUDA device."""
        major, minor = torch.cuda.get_device_capability(device)
        smem_bytes = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
        return cls(10 * major + minor, smem_bytes, block_d, itemsize, frozenset(features))

    def admits(self, tuning: Tuning, config: LaunchConfig) -> bool:
        """The resource gate: `config` of `tuning` holds its fp32 accumulators in REGISTERS_PER_THREAD registers
        per thread, its tiles in the block's shared memory, and is spill-free here (by the compile report's
        calibration of the candidate it derives from). No float32 launch passes (see FLOAT32_ON_GPUS)."""
        footprint = tuning.footprint
        return (self.itemsize < 4
                and footprint.accumulator_elements(config, self.block_d) <= REGISTERS_PER_THREAD * 32 * config.num_warps
                and footprint.shared_bytes(config, self.block_d, self.itemsize) <= self.smem_bytes
                and tuning.spill_free(config)(self))

    def launchable(self, tuning: Tuning) -> list[LaunchConfig]:
        """Every launch of `tuning` the gate admits, in order of preference: its candidates, then their
        unpipelined versions (smallest tiles first). Empty when nothing fits."""
        unpipelined = sorted({c.unpipelined() for c in tuning.candidates} - set(tuning.candidates), key=_area)
        return [c for c in [*tuning.candidates, *unpipelined] if self.admits(tuning, c)]

    def choose(self, tuning: Tuning, preferred: LaunchConfig) -> LaunchConfig:
        """A fixed launch: `preferred` if the gate admits it, else the first launch that fits."""
        if self.admits(tuning, preferred):
            return preferred
        fits = self.launchable(tuning)
        if not fits:
            raise RuntimeError(f"no launch config of the {tuning.name} kernel fits {self}; the dispatcher routes "
                               "such calls to backend='torch'")
        return fits[0]

    def __str__(self) -> str:
        dtype = {2: "16-bit", 4: "float32"}[self.itemsize]
        return (f"sm_{self.arch} ({self.smem_bytes / 1024:.0f} KiB of shared memory per block) at BLOCK_D "
                f"{self.block_d} in {dtype}" + (f" with {', '.join(sorted(self.features))}" if self.features else ""))


SpillFree = Callable[[Gate], bool]
"""Whether the compile report found a candidate spill-free at this gate's arch, BLOCK_D, dtype and features."""


def _always(gate: Gate) -> bool:
    return True


def _area(config: LaunchConfig) -> int:
    return config.block_m * config.block_n


@dataclass(frozen=True)
class Tuning:
    """One kernel's launch candidates, in order of preference, with where each is spill-free.
    `query_tiles`: a program owns BLOCK_M query rows (forward, dQ), so 16-row tiles are for decoding."""

    name: str
    footprint: Footprint
    candidates: dict[LaunchConfig, SpillFree]
    query_tiles: bool = False

    @property
    def preferred(self) -> LaunchConfig:
        return next(iter(self.candidates))

    def spill_free(self, config: LaunchConfig) -> SpillFree:
        """The calibration of `config`, or of the candidate it is the unpipelined version of."""
        for candidate, spill_free in self.candidates.items():
            if candidate == config or candidate.unpipelined() == config:
                return spill_free
        raise KeyError(f"{config} is not a launch of the {self.name} kernel")


# Calibrated with the compile report (sm_80, sm_86, sm_89, sm_90; D = 64, 128, 256; fp16, bf16, fp32). In the
# dK/dV kernel BLOCK_N is the keys of a program, BLOCK_M the queries per step.
FWD = Tuning("fwd", Footprint(acc_m=1, resident_m=1, streamed_n=2), {
    LaunchConfig(128, 64, 8, 3): lambda g: not g.features and (g.arch >= 90 or g.block_d <= 64),
    LaunchConfig(128, 32, 8, 3): _always,
    LaunchConfig(64, 64, 8, 3): lambda g: g.block_d <= 128,
    LaunchConfig(16, 64, 4, 3): lambda g: g.block_d <= 128 or not g.features,
    LaunchConfig(16, 32, 4, 2): lambda g: g.block_d > 128,  # D = 256: with a mask, bias or dropout 16 x 64 spills
}, query_tiles=True)
DQ = Tuning("dq", Footprint(acc_m=1, resident_m=2, streamed_n=2), {
    LaunchConfig(128, 32, 8, 2): lambda g: len(g.features) < 3 or (g.arch >= 90 and g.block_d <= 64),
    LaunchConfig(64, 32, 8, 2): lambda g: g.block_d <= 128 or g.arch < 90,
    LaunchConfig(16, 32, 4, 2): _always,
}, query_tiles=True)
DKDV = Tuning("dkdv", Footprint(acc_n=2, resident_n=2, streamed_m=2), {
    LaunchConfig(32, 64, 8, 2): lambda g: not {"bias", "dropout"} <= g.features,
    LaunchConfig(16, 64, 8, 2): lambda g: not {"bias", "dropout"} <= g.features or g.arch < 90 or g.block_d <= 64,
    # A bank entry's sum over its rows spills 6 registers here on sm_80 at D = 128 (the compile report).
    LaunchConfig(16, 32, 4, 2): lambda g: "bank" not in g.features or g.arch >= 90,
    # Only where four warps cannot hold the accumulators (BLOCK_D = 256); for a bank, it spills on sm_86 (12
    # LDL/STL) and is verified on sm_80 and sm_90 only.
    LaunchConfig(16, 32, 8, 2): lambda g: g.block_d > 128 and ("bank" not in g.features or g.arch in (80, 90)),
})
DBIAS = Tuning("dbias", Footprint(acc_mn=1, streamed_m=2, streamed_n=2), {
    LaunchConfig(64, 32, 8, 2): lambda g: g.block_d <= 128,
    LaunchConfig(16, 32, 8, 2): _always,  # D = 256: 64 x 32 spills on sm_90, so do four warps of 16 x 32
})
# Decode kernels. SMALL: at most 16 stacked queries per program (one decoding step of a KV group of <= 16
# heads, or of a small batch for the prefix). STACKED: more; 64 rows over 8 warps, on sm_90 wgmma (HGMMA)
# products. GATHER: the rows kernel with a mask or bias, whose per-element loads need the registers that
# larger tiles would take (64 x 64 and 64 x 32 spill on sm_80 there, 16 x 64 on sm_90).
SMALL_LAUNCH = LaunchConfig(16, 64, 4, 3)
STACKED_LAUNCH = LaunchConfig(64, 64, 8, 3)
GATHER_LAUNCH = LaunchConfig(16, 32, 4, 3)
DECODE = Tuning("decode", Footprint(acc_m=1, resident_m=1, streamed_n=2),
                dict.fromkeys((STACKED_LAUNCH, SMALL_LAUNCH, GATHER_LAUNCH), _always))
MERGE_WARPS = 4

TUNED = {tuning.name: tuning for tuning in (FWD, DQ, DKDV)}


def features_of(flags: dict) -> frozenset:
    """The features a launch uses, from its HAS_MASK / HAS_BIAS / DROPOUT / BANK constexprs."""
    return frozenset(name for name, flag in FEATURE_FLAGS.items() if flags.get(flag))


def suits_problem(tuning: Tuning, config: LaunchConfig, *, n_q: int, n_kv: int, small_q_tiles: bool = False) -> bool:
    """Whether the tiles suit the problem: the query block fits the queries (16-row query tiles only for
    N <= 16, decoding, unless the kernel steps over queries or `small_q_tiles`), the key block the keys."""
    decode_only = tuning.query_tiles and config.block_m == 16 and not small_q_tiles
    return (config.block_m <= max(16, n_q) and (not decode_only or n_q <= 16)
            and config.block_n <= max(16, n_kv))


def select(tuning: Tuning, gate: Gate, *, n_q: int, n_kv: int) -> list[LaunchConfig]:
    """The launches the autotuner times for a problem of `n_q` queries and `n_kv` keys (powers of two): the
    first non-empty of the candidates the gate admits that suit the problem, the same with 16-row query tiles
    for a long sequence, the unpipelined versions likewise; else the smallest tiles that fit."""
    fits = gate.launchable(tuning)
    if not fits:
        raise RuntimeError(f"no launch config of the {tuning.name} kernel fits {gate}; the dispatcher routes such "
                           "calls to backend='torch'")
    for group in ([c for c in fits if c in tuning.candidates], [c for c in fits if c not in tuning.candidates]):
        for small_q_tiles in (False, True):
            suited = [c for c in group if suits_problem(tuning, c, n_q=n_q, n_kv=n_kv, small_q_tiles=small_q_tiles)]
            if suited:
                return suited
    return [min(fits, key=_area)]


def pruner(tuning: Tuning):
    """early_config_prune for Triton's autotuner (`select` on the device of the call)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        gate = Gate.on(args["Q"].device, args["BLOCK_D"], args["Q"].element_size(), features_of(args))
        return [c.triton_config() for c in select(tuning, gate, n_q=args["TUNE_Q"], n_kv=args["TUNE_KV"])]

    return prune


def autotuned(kernel, tuning: Tuning):
    """`kernel` under Triton's autotuner over the candidates of `tuning`; a single 16 x 16 config in the
    interpreter (no timing there, and every extra config would be a slow extra run)."""
    if INTERPRETED:
        configs = [triton.Config({"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK})]
    else:
        configs = [config.triton_config() for config in tuning.candidates]
    return triton.autotune(configs, key=TUNE_KEY, prune_configs_by={"early_config_prune": pruner(tuning)})(kernel)


def fixed_launch(tuning: Tuning, preferred: LaunchConfig, q: torch.Tensor, *, block_d: int,
                 features: frozenset) -> LaunchConfig:
    """The launch of an untuned kernel on q's device (`Gate.choose`); the interpreter's 16 x 16 tiles there."""
    if INTERPRETED:
        return INTERPRETER_LAUNCH
    return Gate.on(q.device, block_d, q.element_size(), features).choose(tuning, preferred)


FLOAT32_ON_GPUS = ("float32 runs on the torch backend on GPUs: the Triton kernels' float32 (IEEE) dots spill "
                   "registers at most tile sizes (the compile report: 107 of 289 float32 variants on sm_80 to "
                   "sm_90); they take float32 under the interpreter only")


def unlaunchable(tunings, gate: Gate) -> list[str]:
    """Why a call cannot run the kernels `tunings` on the gate's GPU: one reason per kernel no launch fits."""
    if gate.itemsize == 4:
        return [FLOAT32_ON_GPUS]
    return [f"no launch config of the Triton {tuning.name} kernel fits {gate}"
            for tuning in tunings if not gate.launchable(tuning)]


def decode_preference(kernel: str, rows: int, gathers: bool) -> LaunchConfig:
    """The launch the "prefix" or "rows" decode kernel prefers for a tile that stacks `rows` queries;
    `gathers`: the call has a mask or a bias."""
    if kernel == "rows" and gathers:
        return GATHER_LAUNCH
    return SMALL_LAUNCH if rows <= 16 else STACKED_LAUNCH


def preprocess_block(block_d: int) -> int:
    """Query rows per program of the backward preprocess and the decode merge (memory-bound row passes)."""
    return max(16, 4096 // block_d)
