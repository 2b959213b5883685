"""Two-level prompts: questions about several documents under one system prompt, fastprefix's levels vs
recomputing every prompt per row vs copying each prompt's cache to its rows.

Run: pytest bench/test_cascade_bench.py --benchmark-only [--benchmark-json=out.json]

A 300-token system prompt, 4 documents of 400 tokens, 8 questions about each document (B = 32 rows, questions of
8 to 23 tokens, left-padded); each row gets 32 greedy new tokens and must read [system ; its document ;
its question]. Providers:
* fastprefix: the system prompt as level 0 (`Prefix.from_prompt`), each document as its continuation
  (`from_prompt(..., after=level0)`) in a `PrefixBank`, then `generate` on the questions under
  `patched(model, [level0, bank.rows(index)])`: every prompt's keys and values stored once, none in a row's cache.
* concat_rows: plain `generate` on the 32 rows [system ; document ; question] (every prompt recomputed per row).
* copied_cache: the careful user's version: the system prompt run once, each document once after it, each
  document's cache copied to its 8 rows (`batch_select_indices`), then `generate` continuing from it.
Each timed call includes the prompts' own work. Models: the tiny random LLaMA preset and SmolLM2-135M-Instruct
(skipped when its weights package is not installed). float32.

Timing: one thread, the process's CPU time of one call, after an untimed call that measures peak memory (MiB
allocated during the call). `extra_info` records new tokens per second, whether the tokens equal concat_rows',
and the bytes of prompt keys and values held during generation: 32 x 700 cache rows for concat_rows and
copied_cache, 300 + 4 x 400 for fastprefix.
"""

import time

import pytest
import torch
from generation_models import GENERATION_MODELS, generation_model

from fastprefix import Prefix, PrefixBank, patched
from fastprefix.compat import cache_argument, cache_of

SYSTEM, DOCUMENT, DOCUMENTS, QUESTIONS_PER_DOCUMENT, NEW_TOKENS = 300, 400, 4, 8, 32
pytestmark = pytest.mark.benchmark(timer=time.process_time)


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, n], attention mask [B, n]) of the rows, left-padded with token 0 to the longest, n."""
    n = max(row.shape[0] for row in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, n - row.shape[0]:], mask[b, n - row.shape[0]:] = row, 1
    return ids, mask


def _generate(model, ids, mask, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, -NEW_TOKENS:], cache_of(out)


def _kv_bytes_per_position(cache) -> int:
    """Bytes of keys and values one row's position takes in `cache`, over every layer."""
    return sum(t[0, :, 0].numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def cascade_providers(model, system, documents, questions, index):
    """The three ways; each run() -> (new tokens [B, NEW_TOKENS], bytes of prompt keys and values held while
    generating). `system` [S], `documents` [T, n], `questions` B token tensors, `index` [B] each row's document."""
    prompt_len = system.shape[0] + documents.shape[1]

    def fastprefix_run():
        level0 = Prefix.from_prompt(model, system)
        bank = PrefixBank([Prefix.from_prompt(model, document, after=level0) for document in documents])
        ids, mask = left_padded(questions)
        with patched(model, [level0, bank.rows(index)]):
            tokens, cache = _generate(model, ids, mask)
        assert all(layer.keys.shape[-2] == ids.shape[1] + NEW_TOKENS - 1 for layer in cache.layers)
        stored = [level0, *bank.entries]
        return tokens, sum(t.numel() * t.element_size() for p in stored for t in p.keys + p.values)

    def concat_rows():
        ids, mask = left_padded([torch.cat([system, documents[t], q]) for t, q in zip(index.tolist(), questions)])
        tokens, cache = _generate(model, ids, mask)
        return tokens, len(questions) * prompt_len * _kv_bytes_per_position(cache)

    def copied_cache():
        with torch.no_grad():
            cache = cache_of(model(input_ids=system[None], use_cache=True))
            cache.batch_repeat_interleave(documents.shape[0])
            model(input_ids=documents, past_key_values=cache, use_cache=True)
        cache.batch_select_indices(index)
        ids, mask = left_padded(questions)
        prompts = torch.cat([system.expand(len(questions), -1), documents[index]], dim=1)
        ids, mask = torch.cat([prompts, ids], dim=1), torch.cat([torch.ones_like(prompts), mask], dim=1)
        tokens, cache = _generate(model, ids, mask, **{cache_argument(model): cache})
        return tokens, len(questions) * prompt_len * _kv_bytes_per_position(cache)

    return {"concat_rows": concat_rows, "copied_cache": copied_cache, "fastprefix": fastprefix_run}


@pytest.fixture(scope="module", params=GENERATION_MODELS)
def case(request):
    model = generation_model(request.param)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    system = torch.randint(3, vocab, (SYSTEM,), generator=gen)
    documents = torch.randint(3, vocab, (DOCUMENTS, DOCUMENT), generator=gen)
    B = DOCUMENTS * QUESTIONS_PER_DOCUMENT
    questions = [torch.randint(3, vocab, (8 + b % 16,), generator=gen) for b in range(B)]
    index = torch.arange(DOCUMENTS).repeat_interleave(QUESTIONS_PER_DOCUMENT)
    return request.param, cascade_providers(model, system, documents, questions, index), {}


@pytest.mark.parametrize("provider", ["concat_rows", "copied_cache", "fastprefix"])
def test_cascade_generation(benchmark, timed_once, case, provider):
    name, providers, tokens = case
    run = providers[provider]
    (out, prompt_kv), peak, seconds = timed_once(run)
    tokens[provider] = out
    B = out.shape[0]
    benchmark.extra_info.update(model=name, B=B, system=SYSTEM, document=DOCUMENT, documents=DOCUMENTS,
                                new_tokens=NEW_TOKENS, peak_mib=round(peak / 2**20, 1),
                                prompt_kv_mib=round(prompt_kv / 2**20, 2),
                                new_tokens_per_s=round(B * NEW_TOKENS / seconds, 1))
    if "concat_rows" in tokens:
        benchmark.extra_info["same_tokens_as_concat_rows"] = bool(torch.equal(out, tokens["concat_rows"]))
