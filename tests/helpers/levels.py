"""What the levels tests share: the op's sizes and random levels, and a tiny LLaMA with a system prompt (level 0),
three documents computed after it (a bank, level 1) and twelve left-padded questions, four per document."""

import warnings

import torch

import fastprefix
from fastprefix.presets import tiny_llama
from helpers.llama import padded_batch

B, HQ, HKV, D = 6, 4, 2, 8
BANK_LENGTHS = (5, 0, 9, 3, 6)  # entry 1 is empty; entry 4 is read by no row
BANK_INDEX = (2, 0, 2, 3, 1, 2)
LEVELS = {  # name -> each level: P of a shared level, or "bank"
    "shared, shared": (5, 3),
    "shared, bank": (4, "bank"),
    "shared, empty shared, shared, bank": (3, 0, 7, "bank"),
}


def level_inputs(levels, N, S, dtype, generator):
    """q, k, v and the op's levels (shared: (k, v); bank: (entry keys, entry values, index)), leaves in `dtype`."""
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    q, k, v = randn(B, HQ, N, D), randn(B, HKV, S, D), randn(B, HKV, S, D)
    found = []
    for level in levels:
        if level == "bank":
            found.append(([randn(HKV, P, D) for P in BANK_LENGTHS], [randn(HKV, P, D) for P in BANK_LENGTHS],
                          torch.tensor(BANK_INDEX)))
        else:
            found.append((randn(HKV, level, D), randn(HKV, level, D)))
    return q, k, v, found




SYSTEM = 11
DOCUMENTS = (6, 13, 4)
QUESTIONS = ((5, 2, 7, 3), (1, 6, 4, 7), (3, 7, 2, 5))  # per document; the batch: document 0's four, then 1's ...
INDEX = tuple(doc for doc, questions in enumerate(QUESTIONS) for _ in questions)


def cascade_setting():
    """A tiny LLaMA (GQA 8/4 heads, D = 32, 4 layers); a system prompt (level 0); three documents computed after
    it, in a bank (level 1); twelve questions, four per document, left-padded; the rows' bank rows."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    system = torch.randint(1, vocab, (SYSTEM,), generator=gen)
    documents = [torch.randint(1, vocab, (n,), generator=gen) for n in DOCUMENTS]
    level0 = fastprefix.Prefix.from_prompt(model, system)
    bank = fastprefix.PrefixBank([fastprefix.Prefix.from_prompt(model, doc, after=level0) for doc in documents])
    lengths = [n for questions in QUESTIONS for n in questions]
    ids, mask = padded_batch(lengths, max(lengths), gen, vocab=vocab)
    return dict(model=model, system=system, documents=documents, level0=level0, bank=bank, ids=ids, mask=mask,
                lengths=lengths)


def generate(model, ids, mask=None, new_tokens=5, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0, **options)


def row_alone(s, row, index=INDEX):
    """[system ; document index[row] ; question row]: what row `row` must equal."""
    return torch.cat([s["system"], s["documents"][index[row]], s["ids"][row, s["ids"].shape[1] - s["lengths"][row]:]])


