"""Batch generation over a shared prompt: fastprefix vs recomputing the prompt per row vs copying its cache.

Run: pytest bench/test_shared_prompt_bench.py --benchmark-only [--benchmark-json=out.json]

B = 16 suffixes of 16 tokens share a 1024-token prompt; each gets 32 greedy new tokens. Providers (from
`fastprefix.bench.shared_prompt_providers`, which `fastprefix bench` runs at a smaller size):
* fastprefix: `Prefix.from_prompt` (the prompt run once), then `generate` on the suffixes under `patched`;
  the prompt's keys/values are stored once, never in a row's cache.
* concat_rows: plain `generate` on the B concatenated rows [prompt ; suffix] (the prompt recomputed B times).
* copied_cache: the careful user's version: the prompt run once, its cache repeated to B rows
  (`batch_repeat_interleave`), then `generate` on [prompt ; suffix] continuing from that cache.
Each timed call includes the prompt's own work. Models: the tiny random LLaMA preset and SmolLM2-135M-Instruct
(skipped when its weights package is not installed). float32.

Timing: one thread, the process's CPU time (`time.process_time`) of one call (which also gives the tokens),
after an untimed call that measures peak memory (MiB allocated during the call; fastprefix.profiling).
`extra_info` records the new tokens per second, whether the tokens equal concat_rows', and the bytes of the
prompt's keys and values the provider holds during generation (B x P rows in the cache for concat_rows and
copied_cache, P for fastprefix, whose rows' caches hold no prompt rows).
"""

import time

import pytest
import torch
from generation_models import GENERATION_MODELS, generation_model

from fastprefix.bench import shared_prompt_providers

B, SUFFIX, PROMPT, NEW_TOKENS = 16, 16, 1024, 32
pytestmark = pytest.mark.benchmark(timer=time.process_time)


@pytest.fixture(scope="module", params=GENERATION_MODELS)
def case(request):
    model = generation_model(request.param)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (PROMPT,), generator=gen)
    suffixes = torch.randint(3, vocab, (B, SUFFIX), generator=gen)
    return request.param, model, prompt, suffixes, {}


PROVIDERS = {"concat_rows": "concat rows", "copied_cache": "copied cache", "fastprefix": "fastprefix"}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_shared_prompt_generation(benchmark, timed_once, case, provider):
    name, model, prompt, suffixes, tokens = case
    run = shared_prompt_providers(model, prompt, suffixes, NEW_TOKENS)[PROVIDERS[provider]]
    (out, prompt_kv), peak, seconds = timed_once(run)
    tokens[provider] = out
    benchmark.extra_info.update(model=name, B=B, suffix=SUFFIX, prompt=PROMPT, new_tokens=NEW_TOKENS,
                                peak_mib=round(peak / 2**20, 1), prompt_kv_mib=round(prompt_kv / 2**20, 2),
                                new_tokens_per_s=round(B * NEW_TOKENS / seconds, 1))
    if "concat_rows" in tokens:
        benchmark.extra_info["same_tokens_as_concat_rows"] = bool(torch.equal(out, tokens["concat_rows"]))
