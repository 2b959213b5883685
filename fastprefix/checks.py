"""Argument checking for `prefix_attention`: every bad input fails here, before any compute.

Messages follow one pattern: which argument, what was expected, what was given, how to fix it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Dims:
    """Sizes of one `prefix_attention` call. `shared` is True for a [Hkv, P, D] prefix."""

    B: int
    Hq: int
    Hkv: int
    N: int
    S: int
    P: int
    D: int
    shared: bool

    @property
    def G(self) -> int:
        """Query heads per KV head (1 for MHA, Hq for MQA)."""
        return self.Hq // self.Hkv


def shape_text(t: torch.Tensor) -> str:
    """A tensor's shape as messages print it: [2, 4, 16]."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _require_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"prefix_attention: `{name}` must be a torch.Tensor, got {type(t).__name__}.")


def _require_rank(name: str, t: torch.Tensor, ranks: tuple[int, ...], layout: str) -> None:
    if t.dim() not in ranks:
        raise ValueError(
            f"prefix_attention: `{name}` must be {layout}, got a {t.dim()}-D tensor of shape {shape_text(t)}."
        )


def _require_size(name: str, t: torch.Tensor, dim: int, expected: int, what: str, fix: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"prefix_attention: `{name}` has {what} = {t.shape[dim]} (shape {shape_text(t)}), expected {expected}. "
            f"{fix}"
        )


def _require_broadcastable(name: str, t: torch.Tensor, target: tuple[int, ...], layout: str) -> None:
    ok = t.dim() <= len(target) and all(
        s == 1 or s == e for s, e in zip(reversed(t.shape), reversed(target))
    )
    if not ok:
        raise ValueError(
            f"prefix_attention: `{name}` of shape {shape_text(t)} does not broadcast to {layout} = "
            f"[{', '.join(map(str, target))}]. Each dimension must be 1 or equal to the target size."
        )


_PASSED: dict = {}
"""Signature of a call that passed the checks -> what they returned. A model calls with the same signature in every
layer and step, so the checks run once per signature; the signature holds all they read."""
_MAX_PASSED = 1024


def _signature(tensors, dropout_p, scale):
    """Every property of a call's arguments the checks read, or None when some argument is not a tensor (or None
    where that is allowed), which the full checks refuse."""
    found = []
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor):
            found.append((t.shape, t.dtype, t.device))
        elif t is None and i >= 5:  # attn_mask, attn_bias
            found.append(None)
        else:
            return None
    return tuple(found), type(dropout_p), dropout_p, type(scale), scale


def check_inputs(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, dropout_p, scale) -> tuple[Dims, float]:
    """Validate a `prefix_attention` call. Returns its `Dims` and the resolved softmax scale. A call with the
    signature of one that passed before is not checked again."""
    key = _signature((q, k, v, prefix_k, prefix_v, attn_mask, attn_bias), dropout_p, scale)
    found = None if key is None else _PASSED.get(key)
    if found is None:
        found = _check_all(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, dropout_p, scale)
        if key is not None:
            if len(_PASSED) >= _MAX_PASSED:
                _PASSED.clear()
            _PASSED[key] = found
    return found


def _check_all(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, dropout_p, scale) -> tuple[Dims, float]:
    _check_tensors(q, k, v, prefix_k, prefix_v)
    dims = _check_sizes(q, k, v, prefix_k, prefix_v)
    _check_mask_and_bias(q, attn_mask, attn_bias, dims)
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"prefix_attention: `dropout_p` must be a number in [0, 1), got {dropout_p!r}.")
    if scale is None:
        scale = dims.D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"prefix_attention: `scale` must be a finite number or None (D ** -0.5), got {scale!r}.")
    return dims, float(scale)


def _check_tensors(q, k, v, prefix_k, prefix_v) -> None:
    """Types, ranks, dtypes and devices of the five tensors."""
    for name, t in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _require_tensor(name, t)
    _require_rank("q", q, (4,), "[B, Hq, N, D]")
    _require_rank("k", k, (4,), "[B, Hkv, S, D]")
    _require_rank("v", v, (4,), "[B, Hkv, S, D]")
    layout = "[Hkv, P, D] (shared by every row) or [B, Hkv, P, D] (one per row)"
    _require_rank("prefix_k", prefix_k, (3, 4), layout)
    _require_rank("prefix_v", prefix_v, (3, 4), layout)
    if prefix_k.dim() != prefix_v.dim():
        raise ValueError(
            f"prefix_attention: `prefix_k` {shape_text(prefix_k)} and `prefix_v` {shape_text(prefix_v)} must both be "
            "shared [Hkv, P, D] or both per-row [B, Hkv, P, D]."
        )
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"prefix_attention: `q` must be float16, bfloat16, float32 or float64, got {q.dtype}."
        )
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise TypeError(
                f"prefix_attention: `{name}` has dtype {t.dtype} but `q` has {q.dtype}; all of q, k, v, "
                f"prefix_k, prefix_v must share one dtype. Cast with `{name}.to({q.dtype})`."
            )
        if t.device != q.device:
            raise ValueError(
                f"prefix_attention: `{name}` is on {t.device} but `q` is on {q.device}. "
                f"Move it with `{name}.to({str(q.device)!r})`."
            )


def _check_sizes(q, k, v, prefix_k, prefix_v) -> Dims:
    """Sizes that agree across the five tensors."""
    B, Hq, N, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if B == 0 or Hq == 0 or N == 0 or D == 0:
        raise ValueError(f"prefix_attention: `q` must be non-empty in every dimension, got shape {shape_text(q)}.")
    if Hkv == 0:
        raise ValueError(f"prefix_attention: `k` must have at least one head, got shape {shape_text(k)}.")
    for name, t in (("k", k), ("v", v)):
        _require_size(name, t, 0, B, "batch size", "k and v need one row per row of q.")
        _require_size(name, t, 3, D, "head dim", "q, k and v must share the head dim D.")
    _require_size("v", v, 1, Hkv, "head count", "k and v must have the same number of KV heads.")
    _require_size("v", v, 2, S, "sequence length", "k and v must have the same sequence length S.")
    if Hq % Hkv != 0:
        raise ValueError(
            f"prefix_attention: `q` has {Hq} heads, which is not a multiple of the {Hkv} KV heads of `k`. "
            "Grouped-query attention needs Hq % Hkv == 0."
        )
    shared = prefix_k.dim() == 3
    head = 0 if shared else 1
    if not shared:
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            _require_size(name, t, 0, B, "batch size", "A per-row prefix needs one row per row of q; "
                          "pass a [Hkv, P, D] tensor to share one prefix across the batch.")
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _require_size(name, t, head, Hkv, "head count", "The prefix must have as many heads as k (the KV heads).")
        _require_size(name, t, head + 2, D, "head dim", "The prefix must have the head dim D of q and k.")
    P = prefix_k.shape[head + 1]
    _require_size("prefix_v", prefix_v, head + 1, P, "prefix length", "prefix_k and prefix_v must have the same P.")
    return Dims(B, Hq, Hkv, N, S, P, D, shared)


def _check_mask_and_bias(q, attn_mask, attn_bias, dims: Dims) -> None:
    if attn_mask is not None:
        _require_tensor("attn_mask", attn_mask)
        if attn_mask.dtype != torch.bool:
            raise TypeError(
                f"prefix_attention: `attn_mask` must be a bool tensor (True = may attend), got {attn_mask.dtype}. "
                "For an additive float mask use `attn_bias`."
            )
        if attn_mask.device != q.device:
            raise ValueError(f"prefix_attention: `attn_mask` is on {attn_mask.device} but `q` is on {q.device}.")
        _require_broadcastable("attn_mask", attn_mask, (dims.B, dims.Hq, dims.N, dims.S), "[B, Hq, N, S]")
    if attn_bias is not None:
        _require_tensor("attn_bias", attn_bias)
        if attn_bias.dtype != q.dtype:
            raise TypeError(
                f"prefix_attention: `attn_bias` must have the dtype of `q` ({q.dtype}), got {attn_bias.dtype}. "
                f"Cast with `attn_bias.to({q.dtype})`."
            )
        if attn_bias.device != q.device:
            raise ValueError(f"prefix_attention: `attn_bias` is on {attn_bias.device} but `q` is on {q.device}.")
        _require_broadcastable("attn_bias", attn_bias, (dims.B, dims.Hq, dims.N, dims.P + dims.S),
                               "[B, Hq, N, P + S]")


def check_bank_index(index, num_entries: int, rows: int | None, where: str) -> None:
    """Raise unless `index` is a 1-D int32/int64 tensor of entries in [0, num_entries) with `rows` values (any
    number when None): which entry of a bank each row of a batch reads. `where`: the caller, for messages."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{where}: `index` must be a 1-D integer tensor (int32 or int64) with one entry per row, got "
                        f"{type(index).__name__}; write torch.tensor([...]).")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{where}: `index` must be an int32 or int64 tensor of entries, got {index.dtype}; convert "
                        "it with index.long().")
    if index.dim() != 1 or index.shape[0] == 0:
        raise ValueError(f"{where}: `index` must be a non-empty 1-D tensor [B] (the entry of each row), got shape "
                         f"{shape_text(index)}.")
    if rows is not None and index.shape[0] != rows:
        raise ValueError(f"{where}: `index` has {index.shape[0]} entries but the batch has {rows} rows; give one "
                         "entry per row.")
    low, high = index.min().item(), index.max().item()
    if low < 0 or high >= num_entries:
        bad = low if low < 0 else high
        raise ValueError(f"{where}: `index` holds {bad}, but the bank has T = {num_entries} entries; every value "
                         f"must be in [0, {num_entries}).")


def check_bank_inputs(q, k, v, bank_k, bank_v, index, attn_mask, dropout_p, scale) -> tuple[Dims, float]:
    """Validate a `bank_prefix_attention` call: `check_inputs` for every entry as a shared prefix, and the
    index. Returns the `Dims` of entry 0 and the resolved scale."""
    where = "bank_prefix_attention"
    for name, seq in (("bank_k", bank_k), ("bank_v", bank_v)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)) or not seq:
            raise TypeError(f"{where}: `{name}` must be a non-empty list of [Hkv, P_t, D] tensors, one per bank "
                            f"entry, got {type(seq).__name__}{' (empty)' if isinstance(seq, (list, tuple)) else ''}.")
    if len(bank_k) != len(bank_v):
        raise ValueError(f"{where}: `bank_k` has {len(bank_k)} entries and `bank_v` {len(bank_v)}; give one key "
                         "and one value tensor per entry.")
    found = None
    for t, (entry_k, entry_v) in enumerate(zip(bank_k, bank_v)):
        for name, entry in (("bank_k", entry_k), ("bank_v", entry_v)):
            if isinstance(entry, torch.Tensor) and entry.dim() != 3:
                raise ValueError(f"{where}: `{name}[{t}]` must be one entry's [Hkv, P_t, D] tensor, got shape "
                                 f"{shape_text(entry)}.")
        try:
            dims, scale_t = check_inputs(q, k, v, entry_k, entry_v, attn_mask, None, dropout_p, scale)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: entry {t} of the bank (as prefix_k, prefix_v): {error}") from None
        found = found or (dims, scale_t)
    check_bank_index(index, len(bank_k), found[0].B, where)
    if index.device != q.device:
        raise ValueError(f"{where}: `index` is on {index.device} but `q` is on {q.device}; move it with "
                         f"index.to({str(q.device)!r}).")
    return found


def check_levels_inputs(q, k, v, levels, attn_mask, dropout_p, scale) -> tuple[Dims, float]:
    """Validate a `levels_prefix_attention` call: each level, a (prefix_k, prefix_v) pair of shared [Hkv, P, D]
    tensors or a (bank_k, bank_v, index) triple, checked as `check_inputs` or `check_bank_inputs` check it.
    Returns the `Dims` of level 0 and the resolved scale."""
    where = "levels_prefix_attention"
    if not isinstance(levels, (list, tuple)) or not levels:
        raise TypeError(f"{where}: `levels` must be a non-empty list of levels, each a (prefix_k, prefix_v) pair "
                        f"or a (bank_k, bank_v, index) triple; got {_described(levels)}.")
    found = None
    for i, level in enumerate(levels):
        if not isinstance(level, (list, tuple)) or len(level) not in (2, 3):
            raise TypeError(f"{where}: `levels[{i}]` must be a (prefix_k, prefix_v) pair of shared [Hkv, P, D] "
                            f"tensors or a (bank_k, bank_v, index) triple; got {_described(level)}.")
        try:
            if len(level) == 2:
                for name, t in zip(("prefix_k", "prefix_v"), level):
                    if isinstance(t, torch.Tensor) and t.dim() != 3:
                        raise ValueError(f"`{name}` must be a shared [Hkv, P, D] tensor, got shape {shape_text(t)}; "
                                         "give per-row prompts as a bank level (bank_k, bank_v, index).")
                checked = check_inputs(q, k, v, *level, attn_mask, None, dropout_p, scale)
            else:
                checked = check_bank_inputs(q, k, v, *level, attn_mask, dropout_p, scale)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: level {i}: {error}") from None
        found = found or checked
    return found


def _described(value) -> str:
    """A value's type, and its length when it is a list or tuple (for messages)."""
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__
