"""`Levels`: prefixes attended one after another before each row's sequence (cascade prompts), as
`patch(model, [level0, level1, ...])` takes them.

Level 0 is an ordinary shared prefix (a system prompt, say); level i + 1 was computed as the continuation of
levels 0 .. i (`Prefix.from_prompt(model, ids, after=[...])`), so it records where it starts: the total length of
the levels before it. The last level may be bank rows (`PrefixBank.rows(index)`: a document per row, say), whose
entries all start there; row b's sequence then starts after its own entry.
"""

from __future__ import annotations

import torch

from .models.base import BankRowsPrefix, LayerPrefix

_WHAT_A_LEVEL_IS = ("a shared fastprefix.Prefix (Prefix.from_prompt(model, ids, after=[the levels before it])) or "
                    "bank rows (PrefixBank([...]).rows(index)) as the last level")


class Levels:
    """Levels of prefixes, attended in order before each row's sequence: `levels`, a list of shared `Prefix`es
    and, last only, bank rows (`BankRowsPrefix`). Level i must start where levels 0 .. i - 1 end (its `start`);
    checked here, before any compute, with what to do otherwise. The levels are kept as given: nothing is
    copied, per row or otherwise."""

    prompt_ids = None  # several prompts: no single prompt for a sliding window or `SeesPrompt`

    def __init__(self, levels, where: str):
        if not levels:
            raise ValueError(f"fastprefix: {where}: the list of levels is empty; give [level0, level1, ...], each "
                             f"{_WHAT_A_LEVEL_IS}.")
        expected = 0
        for i, level in enumerate(levels):
            if not isinstance(level, LayerPrefix):
                tensors = " (for keys and values as tensors, build Prefix(keys, values))" * isinstance(
                    level, torch.Tensor)
                raise TypeError(f"fastprefix: {where}: level {i} is a {type(level).__name__}; expected a "
                                f"fastprefix.Prefix: each level must be {_WHAT_A_LEVEL_IS}{tensors}.")
            rows = getattr(level, "batch_size", None)
            if rows is not None:
                raise ValueError(f"fastprefix: {where}: level {i} is a per-row prefix (B={rows}); a level is read by "
                                 "every row (a shared Prefix) or by row index: put the rows' prompts in a PrefixBank "
                                 "and give bank.rows(index) as the last level.")
            start = getattr(level, "start", 0)
            if start != expected and i == 0:
                raise ValueError(f"fastprefix: {where}: level 0 starts at position {start} (it was computed after "
                                 f"levels of {start} positions) but it is the first level; put the levels it was "
                                 "computed after before it, in order.")
            if start != expected:
                raise ValueError(f"fastprefix: {where}: level {i} starts at position {start} but levels 0 .. {i - 1} "
                                 f"hold {expected} positions, so it must start at {expected}; give the levels in the "
                                 f"order they were computed, or compute level {i} with Prefix.from_prompt(model, ids, "
                                 f"after=[levels 0 .. {i - 1}]).")
            if isinstance(level, BankRowsPrefix):
                if i != len(levels) - 1:
                    raise ValueError(f"fastprefix: {where}: level {i} is bank rows but level {i + 1} follows it; bank "
                                     "rows can only be the last level (a level after them would continue a different "
                                     "entry in each row).")
            else:
                expected += level.length
        self.levels: tuple[LayerPrefix, ...] = tuple(levels)

    def op_levels(self, layer: int, rows: int) -> list[tuple]:
        """What `levels_prefix_attention` takes for layer `layer` of a batch of `rows` rows: (keys, values) of each
        shared level, (entry keys, entry values, index) of bank rows."""
        found = []
        for level in self.levels:
            keys, values = level.layer(layer)
            found.append((keys, values, level.index_for(rows)) if isinstance(level, BankRowsPrefix) else (keys, values))
        return found

    def position_shift(self, rows: int) -> int | torch.Tensor:
        """Where each row's sequence starts: the total length of the levels, a [rows, 1] tensor when the last
        level is bank rows (each row after its own entry)."""
        *shared, last = self.levels
        total = sum(level.length for level in shared)
        if isinstance(last, BankRowsPrefix):
            return total + last.lengths_for(rows)[:, None]
        return total + last.length

    def __repr__(self) -> str:
        return f"Levels({list(self.levels)!r})"
