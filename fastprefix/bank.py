"""`PrefixBank`: several shared prefixes of one model, each stored once; `bank.rows(index)` lets row b of a
batch attend to entry index[b] without gathering the entries per row."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import check_bank_index, shape_text
from .prefix import Prefix


class PrefixBank:
    """T shared prefixes (`Prefix` with [Hkv, P_t, D] tensors) for one model; P may differ between entries.

    The entries are kept as given (no stacking or padding copy), so each is stored once. They must agree in
    layer count, KV heads (Hkv), head dim (D), dtype, device and, where both are set, `source`; the bank's
    `source` is the first one set. `bank.rows(index)` gives what `fastprefix.patch`, `patched` and
    `handle.set_prefix` take for a batch whose row b attends to entry index[b], at positions starting at that
    entry's P (LLaMA-family models, backend 'auto', 'triton' or 'torch'). Entries computed after the same levels
    (`Prefix.from_prompt(model, ids, after=levels)`, all with the same `start`) make the last level of a cascade:
    `patch(model, [*levels, bank.rows(index)])`.
    """

    def __init__(self, prefixes: Sequence[Prefix]):
        if not isinstance(prefixes, (list, tuple)):
            raise TypeError(f"PrefixBank: expected a list of fastprefix.Prefix entries, got {type(prefixes).__name__}"
                            ". For a single prefix write PrefixBank([prefix]).")
        if not prefixes:
            raise ValueError("PrefixBank: the list of entries is empty; give at least one fastprefix.Prefix.")
        for t, entry in enumerate(prefixes):
            if not isinstance(entry, Prefix):
                raise TypeError(f"PrefixBank: entry {t} must be a fastprefix.Prefix, got {type(entry).__name__}.")
            if not entry.shared:
                raise ValueError(f"PrefixBank: entry {t} is a per-row prefix (B={entry.batch_size}, keys of shape "
                                 f"{shape_text(entry.keys[0])}); a bank holds shared prefixes with [Hkv, P, D] "
                                 "tensors, one entry per prefix, and `rows(index)` says which entry each row reads.")
        first = prefixes[0]
        for t, entry in enumerate(prefixes[1:], start=1):
            for what, got, want in (("layers", entry.num_layers, first.num_layers),
                                    ("KV heads (Hkv)", entry.num_kv_heads, first.num_kv_heads),
                                    ("head dim (D)", entry.head_dim, first.head_dim),
                                    ("dtype", entry.dtype, first.dtype), ("device", entry.device, first.device),
                                    ("start", entry.start, first.start)):
                if got != want:
                    raise ValueError(f"PrefixBank: entry {t} has {what} {got} but entry 0 has {want}; every entry "
                                     "must be a prefix of the same model, in one dtype on one device, computed after "
                                     "the same levels (Prefix.from_prompt(..., after=...)).")
        sources = [(t, entry.source) for t, entry in enumerate(prefixes) if entry.source is not None]
        for t, source in sources[1:]:
            if source != sources[0][1]:
                raise ValueError(f"PrefixBank: entry {t} was computed by a model of signature {source} but entry "
                                 f"{sources[0][0]} by {sources[0][1]}; every entry must come from the same model.")
        self.entries: tuple[Prefix, ...] = tuple(prefixes)
        self.source = sources[0][1] if sources else None
        self.start = first.start

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, t: int) -> Prefix:
        return self.entries[t]

    @property
    def lengths(self) -> tuple[int, ...]:
        """P of each entry."""
        return tuple(entry.length for entry in self.entries)

    def rows(self, index: torch.Tensor) -> BankRows:
        """The prefix of a batch whose row b reads entry index[b]: `index` [B] int32/int64, values in [0, T).
        Checked here, before any compute; the index is copied, so later changes to `index` do not reach it."""
        check_bank_index(index, len(self), None, "PrefixBank.rows")
        return BankRows(self, index.to(self.entries[0].device, torch.long, copy=True))

    def __repr__(self) -> str:
        first = self.entries[0]
        return (f"PrefixBank(T={len(self)}, P={list(self.lengths)}, layers={first.num_layers}, "
                f"Hkv={first.num_kv_heads}, D={first.head_dim}, {first.dtype}, {first.device})")


class BankRows:
    """Rows of a batch reading entries of a `PrefixBank`: row b attends to entry index[b] (a
    `models.base.BankRowsPrefix`). Build it with `bank.rows(index)`.

    `layer(i)` gives layer i of every entry (tuples, nothing gathered per row). Under `generate` with
    num_beams or num_return_sequences > 1 the batch repeats each row k times in a row, and so does the index
    (`index_for`). `length` is the longest entry's P; `lengths_for` gives each row's own.
    """

    prompt_ids = None  # the rows' prompts differ: no single prompt for a sliding window or `SeesPrompt`

    def __init__(self, bank: PrefixBank, index: torch.Tensor):
        self.bank, self.index = bank, index
        self._lengths = torch.tensor(bank.lengths, dtype=torch.long, device=index.device)

    @property
    def num_layers(self) -> int:
        return self.bank[0].num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.bank[0].num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.bank[0].head_dim

    @property
    def length(self) -> int:
        return max(self.bank.lengths)

    @property
    def dtype(self) -> torch.dtype:
        return self.bank[0].dtype

    @property
    def device(self) -> torch.device:
        return self.bank[0].device

    @property
    def source(self) -> str | None:
        return self.bank.source

    @property
    def start(self) -> int:
        """Where every entry starts (the levels they follow; 0 for prompts at positions 0 .. P - 1)."""
        return self.bank.start

    def layer(self, i: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(keys, values) of layer i: one [Hkv, P_t, D] tensor per entry."""
        return tuple(e.keys[i] for e in self.bank.entries), tuple(e.values[i] for e in self.bank.entries)

    def index_for(self, rows: int) -> torch.Tensor:
        """[rows] the entry of each row of a batch of `rows` rows: the index, or each of its values repeated
        rows / B times in a row when the batch repeats each row (generate's num_beams, num_return_sequences)."""
        given = self.index.shape[0]
        if rows == given:
            return self.index
        if rows % given == 0:
            return self.index.repeat_interleave(rows // given)
        raise ValueError(f"fastprefix: the bank rows' index has {given} entries but the batch has {rows} rows; give "
                         f"bank.rows(index) one entry per row of the batch ({rows}).")

    def lengths_for(self, rows: int) -> torch.Tensor:
        """[rows] P of the entry each row reads."""
        return self._lengths[self.index_for(rows)]

    def __repr__(self) -> str:
        return f"BankRows(B={self.index.shape[0]}, index={self.index.tolist()}, bank={self.bank!r})"
