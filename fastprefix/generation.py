"""`SeesPrompt`: logits processors that read the context see a prompt's prefix as plain transformers would.

A model patched with `Prefix.from_prompt(model, prompt)` generates each row as [prompt ; row], but the prompt's
tokens are not in the `input_ids` that `generate` hands its logits processors. Processors that read the
context (`repetition_penalty`, `no_repeat_ngram_size`, `sequence_bias`, `bad_words_ids`) would then miss the
prompt. Wrapped in `SeesPrompt`, a processor reads [prompt ; row] per row, which is what it reads in plain
transformers on the concatenation: under left padding the padding moves before the prompt, as it sits in a
left-padded batch of [prompt ; row].
"""

from __future__ import annotations

import torch


class SeesPrompt:
    """A logits processor that calls `processor(context, scores)` with context = [prompt ; input_ids] per row.

    `prefix`: a `Prefix` from `Prefix.from_prompt` (its `prompt_ids`). `pad_token_id`: the padding token of
    left-padded batches; each row's leading padding is placed before the prompt. Use it in place of the
    `generate` argument that builds the processor::

        from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor
        processors = LogitsProcessorList([
            fastprefix.SeesPrompt(RepetitionPenaltyLogitsProcessor(1.3), prefix, pad_token_id=tok.pad_token_id),
            fastprefix.SeesPrompt(NoRepeatNGramLogitsProcessor(3), prefix, pad_token_id=tok.pad_token_id)])
        model.generate(**batch, logits_processor=processors)   # not repetition_penalty=1.3, no_repeat_ngram_size=3
    """

    def __init__(self, processor, prefix, *, pad_token_id: int | None = None):
        if getattr(prefix, "prompt_ids", None) is None:
            raise ValueError("SeesPrompt: `prefix` holds no prompt ids; give the Prefix that Prefix.from_prompt "
                             "returned (a learned prefix has no tokens for a processor to see).")
        self.processor, self.prompt_ids, self.pad_token_id = processor, prefix.prompt_ids, pad_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.processor(self.context(input_ids), scores)

    def context(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """[B, P + T]: each row's leading padding, the prompt, then the rest of the row."""
        B, T = input_ids.shape
        P = self.prompt_ids.shape[0]
        prompt = self.prompt_ids.to(input_ids.device)
        if self.pad_token_id is None:
            return torch.cat([prompt.expand(B, P), input_ids], dim=1)
        leading = (input_ids == self.pad_token_id).long().cumprod(dim=1).sum(dim=1, keepdim=True)  # [B, 1]
        column = torch.arange(P + T, device=input_ids.device).expand(B, P + T)
        in_prompt = (column >= leading) & (column < leading + P)
        from_row = torch.where(column < leading, column, column - P).clamp(0, T - 1)
        prompt_token = prompt[(column - leading).clamp(0, P - 1)]
        return torch.where(in_prompt, prompt_token, input_ids.gather(1, from_row))
