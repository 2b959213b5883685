"""A prefix bank read by row index, as the Triton kernels read it: the host-side table of the entries
(`BankTable`, `prefix_args`) and the jit helpers that address a row's entry (`prefix_tiles`, `entry_tiles`,
`entry_segment`, `entry_gradients`). The entries are addressed in place: never copied per row, nor packed into
one buffer (docs/design.md, "A prefix bank read by row index").
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import kv_tiles, prefix_strides

ENTRY_FIELDS: tl.constexpr = tl.constexpr(8)
"""Columns of a bank's entry table (`BankTable.entries`)."""


@triton.jit
def entry_tiles(PK, PV, entry, hkv, stride_pkd, stride_pvd, offs_n, offs_d, ALIGN: tl.constexpr):
    """(keys base, values base, key tile offsets, value tile offsets, keys' row stride, values' row stride, P)
    of KV head hkv of the bank entry whose row of the entry table starts at `entry` (`BankTable`)."""
    stride_kh = tl.multiple_of(tl.load(entry + 3), ALIGN)
    stride_kn = tl.multiple_of(tl.load(entry + 4), ALIGN)
    stride_vh = tl.multiple_of(tl.load(entry + 5), ALIGN)
    stride_vn = tl.multiple_of(tl.load(entry + 6), ALIGN)
    k_base = PK + tl.multiple_of(tl.load(entry), ALIGN) + hkv * stride_kh
    v_base = PV + tl.multiple_of(tl.load(entry + 1), ALIGN) + hkv * stride_vh
    return (k_base, v_base, offs_n[:, None] * stride_kn + offs_d[None, :] * stride_pkd,
            offs_n[:, None] * stride_vn + offs_d[None, :] * stride_pvd, stride_kn, stride_vn,
            tl.load(entry + 2).to(tl.int32))


@triton.jit
def prefix_tiles(PK, PV, ENTRIES, INDEX, b, hkv, stride_pkb, stride_pkh, stride_pkn, stride_pkd, stride_pvb,
                 stride_pvh, stride_pvn, stride_pvd, P, offs_n, offs_d, BANK: tl.constexpr, ALIGN: tl.constexpr):
    """`entry_tiles` of row b's prefix: the prefix tensors' own (P keys), or with BANK, those of bank entry
    INDEX[b]."""
    if BANK:
        tiles = entry_tiles(PK, PV, ENTRIES + tl.load(INDEX + b) * ENTRY_FIELDS, hkv, stride_pkd, stride_pvd,
                            offs_n, offs_d, ALIGN=ALIGN)
    else:
        k_base, v_base, k_tile, v_tile = kv_tiles(PK, PV, b, hkv, stride_pkb, stride_pkh, stride_pkn, stride_pkd,
                                                  stride_pvb, stride_pvh, stride_pvn, stride_pvd, offs_n, offs_d)
        tiles = k_base, v_base, k_tile, v_tile, stride_pkn, stride_pvn, P
    return tiles


@triton.jit
def entry_segment(K, V, ENTRIES, STARTS, entry, hkv, n0, G, stride_kd, stride_vd, offs_n, offs_d, ALIGN: tl.constexpr):
    """The dK/dV segment of bank entry `entry` at KV head hkv for the key block starting at n0: (keys base,
    values base, key tile offsets, value tile offsets, P of the entry, first and last + 1 (row, query head)
    pair t = j * G + g of the rows j of the entry's group (none for a key block past P))."""
    row = ENTRIES + entry * ENTRY_FIELDS
    k_base, v_base, k_tile, v_tile, _, _, n_keys = entry_tiles(K, V, row, hkv, stride_kd, stride_vd, offs_n, offs_d,
                                                               ALIGN=ALIGN)
    t_lo = tl.load(STARTS + entry).to(tl.int32) * G
    t_hi = tl.where(n0 < n_keys, tl.load(STARTS + entry + 1).to(tl.int32) * G, t_lo)
    return k_base, v_base, k_tile, v_tile, n_keys, t_lo, t_hi


@triton.jit
def entry_gradients(ENTRIES, DK, DV, entry, hkv, n_keys, stride_dkn, stride_dvn):
    """(dK base, dV base) of KV head hkv of bank entry `entry` in the packed gradient buffers."""
    packed = tl.load(ENTRIES + entry * ENTRY_FIELDS + 7)
    return DK + packed + hkv * n_keys * stride_dkn, DV + packed + hkv * n_keys * stride_dvn


@dataclass
class BankTable:
    """What the kernels read of a prefix bank: T entries (keys and values [Hkv, P_t, D] each, P differing
    between entries) addressed in place, and the entry each row reads.

    keys, values: the tensors of the first non-empty entry; every entry is addressed by an element offset from them
    (the entries are never copied, nor packed into one buffer). entries: [T, ENTRY_FIELDS] int64 on the
    device, row t = (keys offset, values offset, P_t, keys' head and row strides, values' head and row
    strides, offset of entry t in a packed [sum of Hkv * P_t * D] gradient buffer). index: [B] int64.
    align: a power of two (at most 16 bytes' worth of elements) dividing every offset and stride of the
    table, for the kernels' alignment hints."""

    keys: torch.Tensor
    values: torch.Tensor
    entries: torch.Tensor
    index: torch.Tensor
    lengths: tuple[int, ...]
    align: int

    @classmethod
    def of(cls, bank_k, bank_v, index: torch.Tensor) -> BankTable:
        """The table of entries bank_k[t], bank_v[t] ([Hkv, P_t, D], one dtype) read by rows of `index` [B].
        An entry whose head dim is not contiguous is read from a contiguous copy."""
        bank_k = [t if t.stride(-1) == 1 else t.contiguous() for t in bank_k]
        bank_v = [t if t.stride(-1) == 1 else t.contiguous() for t in bank_v]
        item = bank_k[0].element_size()
        first = next((t for t, k in enumerate(bank_k) if k.shape[1]), 0)  # an empty tensor's pointer may be null
        base_k, base_v = bank_k[first].data_ptr(), bank_v[first].data_ptr()
        rows, packed = [], 0
        for k, v in zip(bank_k, bank_v):
            addressing = ((k.data_ptr() - base_k) // item, (v.data_ptr() - base_v) // item, k.shape[1], k.stride(0),
                          k.stride(1), v.stride(0), v.stride(1)) if k.shape[1] else (0,) * 7  # empty: never read
            rows.append((*addressing, packed))
            packed += k.numel()
        # gcd of powers of two and other integers: a power of two, the largest dividing them all
        align = math.gcd(16 // item, *(x for row in rows for x in row[:2] + row[3:7]))
        return cls(bank_k[first], bank_v[first], _entry_table(tuple(rows), index.device), index.long(),
                   tuple(k.shape[1] for k in bank_k), align)

    @property
    def max_p(self) -> int:
        return max(self.lengths)

    def groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order [B]: the rows sorted by entry, stably; starts [T + 1]: rows order[starts[t]:starts[t + 1]]
        read entry t), on the device, without a host synchronization."""
        entries, order = torch.sort(self.index, stable=True)
        starts = torch.searchsorted(entries, torch.arange(len(self.lengths) + 1, device=entries.device))
        return order, starts

    def split(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """Per-entry [Hkv, P_t, D] views of a packed gradient buffer (see `entries`)."""
        Hkv, D = self.keys.shape[0], self.keys.shape[2]
        views, start = [], 0
        for P in self.lengths:
            views.append(packed[start:start + Hkv * P * D].view(Hkv, P, D))
            start += Hkv * P * D
        return views


@functools.lru_cache(maxsize=256)
def _entry_table(rows: tuple, device: torch.device) -> torch.Tensor:
    """The entry table on `device`, made once per distinct content (a decoding step reads the same bank in
    every layer, token after token, without copying it to the device again)."""
    return torch.tensor(rows, dtype=torch.int64, device=device)


def prefix_args(prefix_k, prefix_v, bank: BankTable | None, dummy: torch.Tensor) -> dict:
    """Keyword arguments of a kernel's prefix (PK, PV, ENTRIES, INDEX, their strides, P, BANK, ALIGN): a
    prefix [Hkv, P, D] or [B, Hkv, P, D], or with `bank`, its entries (P: the longest entry's, which numbers
    the sequence's dropout columns from there on)."""
    if bank is None:
        return dict(PK=prefix_k, PV=prefix_v, ENTRIES=dummy, INDEX=dummy, **prefix_strides("pk", prefix_k),
                    **prefix_strides("pv", prefix_v), P=prefix_k.shape[-2], BANK=False, ALIGN=1)
    zero = dict.fromkeys(("stride_pkb", "stride_pkh", "stride_pkn", "stride_pvb", "stride_pvh", "stride_pvn"), 0)
    return dict(PK=bank.keys, PV=bank.values, ENTRIES=bank.entries, INDEX=bank.index, **zero, stride_pkd=1,
                stride_pvd=1, P=bank.max_p, BANK=True, ALIGN=bank.align)
