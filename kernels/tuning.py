"""Launch configurations of the Triton kernels, and the one resource gate every launch passes through.

A kernel's `Tuning` lists its launch candidates in order of preference, each with the condition under which
the compile report (`python -m fastprefix.kernels.report`) found it spill-free, and its `Footprint`: the
fp32 accumulators and input tiles one program holds. `within_resources` is the gate: accumulators within 64
registers per thread, tiles within the device's shared memory, spill-free for the architecture, head dim and
features. The autotuned kernels (forward, dQ, dK/dV) prune their candidates with it; the fixed launches
(dBias, decode) take their preferred config through it. Where nothing passes, a launch takes the smallest
tiles of its kernel with one pipeline stage. Under the interpreter every kernel runs 16 x 16 tiles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import triton

from .common import INTERPRETED, INTERPRETER_BLOCK

FEATURE_FLAGS = {"mask": "HAS_MASK", "bias": "HAS_BIAS", "dropout": "DROPOUT"}
TUNE_KEY = ["TUNE_Q", "TUNE_KV", "HEAD_DIM", "CAUSAL", "HAS_MASK", "HAS_BIAS", "DROPOUT"]
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
    memory). The shared-memory estimate matches the compiler's figure for the forward on sm_90 and exceeds
    it on sm_80."""

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


SpillFree = Callable[[int, int, frozenset], bool]
"""(compute capability as 80/90, BLOCK_D, features in use among {"mask", "bias", "dropout"}) -> whether the
compile report found the config spill-free there."""


def _always(arch: int, block_d: int, features: frozenset) -> bool:
    return True


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

    @property
    def smallest(self) -> LaunchConfig:
        return min(self.candidates, key=lambda c: c.block_m * c.block_n)


# Calibrated with the compile report (sm_80 and sm_90, D = 64 and 128, fp16 and bf16; the BLOCK_D = 256
# conditions from a one-off run of the same report at D = 256). In the dK/dV kernel BLOCK_N is the keys of a
# program, BLOCK_M the queries per step.
FWD = Tuning("fwd", Footprint(acc_m=1, resident_m=1, streamed_n=2), {
    LaunchConfig(128, 64, 8, 3): lambda arch, block_d, features: not features and (arch >= 90 or block_d <= 64),
    LaunchConfig(128, 32, 8, 3): _always,
    LaunchConfig(64, 64, 8, 3): lambda arch, block_d, features: block_d <= 128,
    LaunchConfig(16, 64, 4, 3): _always,
}, query_tiles=True)
DQ = Tuning("dq", Footprint(acc_m=1, resident_m=2, streamed_n=2), {
    LaunchConfig(128, 32, 8, 2): lambda arch, block_d, features: len(features) < 3 or (arch >= 90 and block_d <= 64),
    LaunchConfig(64, 32, 8, 2): lambda arch, block_d, features: block_d <= 128 or arch < 90,
    LaunchConfig(16, 32, 4, 2): _always,
}, query_tiles=True)
DKDV = Tuning("dkdv", Footprint(acc_n=2, resident_n=2, streamed_m=2), {
    LaunchConfig(32, 64, 8, 2): lambda arch, block_d, features: not {"bias", "dropout"} <= features,
    LaunchConfig(16, 64, 8, 2): lambda arch, block_d, features: (not {"bias", "dropout"} <= features or arch < 90
                                                                 or block_d <= 64),
    LaunchConfig(16, 32, 4, 2): _always,
    # Only where four warps cannot hold the accumulators (BLOCK_D = 256); not covered by the report.
    LaunchConfig(16, 32, 8, 2): lambda arch, block_d, features: block_d > 128,
})
DBIAS = Tuning("dbias", Footprint(acc_mn=1, streamed_m=2, streamed_n=2), {LaunchConfig(64, 32, 8, 2): _always})
# Decode kernels. SMALL: at most 16 stacked queries per program (one decoding step of a KV group of <= 16
# heads, or of a small batch for the prefix). STACKED: more; 64 rows over 8 warps, on sm_90 wgmma (HGMMA)
# products. GATHER: the rows kernel with a mask or bias, whose per-element loads need the registers that
# larger tiles would take (64 x 64 and 64 x 32 spill on sm_80 there, 16 x 64 on sm_90). Spill-free at D = 64
# and 128 on sm_80 and sm_90.
SMALL_LAUNCH = LaunchConfig(16, 64, 4, 3)
STACKED_LAUNCH = LaunchConfig(64, 64, 8, 3)
GATHER_LAUNCH = LaunchConfig(16, 32, 4, 3)
DECODE = Tuning("decode", Footprint(acc_m=1, resident_m=1, streamed_n=2),
                dict.fromkeys((STACKED_LAUNCH, SMALL_LAUNCH, GATHER_LAUNCH), _always))
MERGE_WARPS = 4

TUNED = {tuning.name: tuning for tuning in (FWD, DQ, DKDV)}


def features_of(flags: dict) -> frozenset:
    """The features a launch uses, from its HAS_MASK / HAS_BIAS / DROPOUT constexprs."""
    return frozenset(name for name, flag in FEATURE_FLAGS.items() if flags.get(flag))


def within_resources(tuning: Tuning, config: LaunchConfig, *, arch: int, block_d: int, features: frozenset,
                     itemsize: int, smem_bytes: int | None) -> bool:
    """The resource gate: `config` of `tuning` holds its fp32 accumulators in REGISTERS_PER_THREAD registers
    per thread, its tiles of `itemsize` bytes in `smem_bytes` of shared memory (when given), and is spill-free
    for this arch, BLOCK_D and feature set."""
    footprint = tuning.footprint
    return (footprint.accumulator_elements(config, block_d) <= REGISTERS_PER_THREAD * 32 * config.num_warps
            and (smem_bytes is None or footprint.shared_bytes(config, block_d, itemsize) <= smem_bytes)
            and tuning.candidates[config](arch, block_d, features))


def suits_problem(tuning: Tuning, config: LaunchConfig, *, n_q: int, n_kv: int, small_q_tiles: bool = False) -> bool:
    """Whether the tiles suit the problem: the query block fits the queries (16-row query tiles only for
    N <= 16, decoding, unless the kernel steps over queries or `small_q_tiles`), the key block the keys."""
    decode_only = tuning.query_tiles and config.block_m == 16 and not small_q_tiles
    return (config.block_m <= max(16, n_q) and (not decode_only or n_q <= 16)
            and config.block_n <= max(16, n_kv))


def device_limits(device: torch.device) -> tuple[int, int]:
    """(compute capability as 80/90, shared memory a block may opt into) of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor, torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def pruner(tuning: Tuning):
    """early_config_prune for Triton's autotuner: the candidates that suit the problem and pass the gate."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        arch, smem_bytes = device_limits(args["Q"].device)
        gate = dict(arch=arch, block_d=args["BLOCK_D"], features=features_of(args),
                    itemsize=args["Q"].element_size(), smem_bytes=smem_bytes)
        for small_q_tiles in (False, True):  # 16-row query tiles for long sequences only if nothing else fits
            fits = [c for c in configs
                    if suits_problem(tuning, LaunchConfig.of(c), n_q=args["TUNE_Q"], n_kv=args["TUNE_KV"],
                                     small_q_tiles=small_q_tiles)
                    and within_resources(tuning, LaunchConfig.of(c), **gate)]
            if fits:
                return fits
        return [tuning.smallest.unpipelined().triton_config()]

    return prune


def autotuned(kernel, tuning: Tuning):
    """`kernel` under Triton's autotuner over the candidates of `tuning`; a single 16 x 16 config in the
    interpreter (no timing there, and every extra config would be a slow extra run)."""
    if INTERPRETED:
        configs = [triton.Config({"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK})]
    else:
        configs = [config.triton_config() for config in tuning.candidates]
    return triton.autotune(configs, key=TUNE_KEY, prune_configs_by={"early_config_prune": pruner(tuning)})(kernel)


def gated(tuning: Tuning, preferred: LaunchConfig, *, arch: int, smem_bytes: int, block_d: int,
          features: frozenset, itemsize: int) -> LaunchConfig:
    """A fixed launch: `preferred` if it passes the gate, else the smallest tiles of `tuning`, unpipelined."""
    if within_resources(tuning, preferred, arch=arch, block_d=block_d, features=features, itemsize=itemsize,
                        smem_bytes=smem_bytes):
        return preferred
    return tuning.smallest.unpipelined()


def fixed_launch(tuning: Tuning, preferred: LaunchConfig, q: torch.Tensor, *, block_d: int,
                 features: frozenset) -> LaunchConfig:
    """`gated` for a launch on q's device; the interpreter's 16 x 16 tiles there."""
    if INTERPRETED:
        return INTERPRETER_LAUNCH
    arch, smem_bytes = device_limits(q.device)
    return gated(tuning, preferred, arch=arch, smem_bytes=smem_bytes, block_d=block_d, features=features,
                 itemsize=q.element_size())


def decode_preference(kernel: str, rows: int, gathers: bool) -> LaunchConfig:
    """The launch the "prefix" or "rows" decode kernel prefers for a tile that stacks `rows` queries;
    `gathers`: the call has a mask or a bias."""
    if kernel == "rows" and gathers:
        return GATHER_LAUNCH
    return SMALL_LAUNCH if rows <= 16 else STACKED_LAUNCH


def preprocess_block(block_d: int) -> int:
    """Query rows per program of the backward preprocess and the decode merge (memory-bound row passes)."""
    return max(16, 4096 // block_d)
