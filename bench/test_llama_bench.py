"""Prefix tuning of a tiny random LLaMA on CPU: fastprefix.from_peft vs PEFT vs the model without a prefix.

Run: pytest bench/test_llama_bench.py --benchmark-only [--benchmark-json=out.json]

* train: one prefix-tuning step, forward + backward of the LM loss. 4 layers, hidden 512, 8 heads (D = 64),
  vocabulary 2048, B = 8, N = 512, P = 64, float32. The no-prefix floor back-propagates to the input
  embeddings instead (the same activation gradients through every layer, nothing to train).
* generate: greedy, B = 8 prompts of 64 tokens, 32 new tokens, same model.

Timing: one thread, CPU time of the process (`time.process_time`), so that other jobs on a shared
machine cannot stretch the figures (with two threads, a busy core stalls every OpenMP barrier of an op by
milliseconds). Peak memory (MiB allocated during one call, on top of what existed before it; see
fastprefix.profiling) goes into each benchmark's extra_info, next to the transformers version. PEFT's
`generate` ignores the prefix on some transformers versions (5.24): `extra_info["tokens"]` records whether
its tokens equal fastprefix's (verified against PEFT's forward by the tests) or the base model's.
"""

import copy
import time
import warnings

import pytest
import torch
import transformers
from peft import PrefixTuningConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import fastprefix
from fastprefix.profiling import peak_cpu_memory

CONFIG = dict(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=1024, pad_token_id=0)
B, N, P = 8, 512, 64
PROMPT, NEW_TOKENS = 64, 32
PROVIDERS = ("fastprefix", "peft", "no_prefix")
pytestmark = pytest.mark.benchmark(timer=time.process_time)


@pytest.fixture(scope="module")
def models():
    """provider -> (callable like a PEFT model, its generate). One random model under all three."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    peft_model = get_peft_model(copy.deepcopy(base), peft_config)
    fast = fastprefix.from_peft(get_peft_model(copy.deepcopy(base), peft_config))
    fast.peft_model.load_state_dict(peft_model.state_dict())
    base.requires_grad_(False)
    base.enable_input_require_grads()
    return {"fastprefix": fast, "peft": peft_model, "no_prefix": base}


def greedy(model, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, models, provider):
    model = models[provider]
    ids = torch.randint(1, CONFIG["vocab_size"], (B, N), generator=torch.Generator().manual_seed(1))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    benchmark.extra_info.update(B=B, N=N, P=P, dtype="float32", transformers=transformers.__version__)
    benchmark.extra_info["peak_mib"] = round(peak_cpu_memory(step) / 2**20, 1)
    benchmark.pedantic(step, rounds=7, warmup_rounds=1)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_generate(benchmark, models, provider):
    model = models[provider]
    ids = torch.randint(1, CONFIG["vocab_size"], (B, PROMPT), generator=torch.Generator().manual_seed(2))
    benchmark.extra_info.update(B=B, prompt=PROMPT, new_tokens=NEW_TOKENS, P=P, dtype="float32",
                                transformers=transformers.__version__)
    if provider == "peft":
        tokens = greedy(model, ids)
        same = {name: torch.equal(tokens, greedy(models[name], ids)) for name in ("fastprefix", "no_prefix")}
        benchmark.extra_info["tokens"] = ("fastprefix's" if same["fastprefix"] else
                                          "the base model's (prefix ignored)" if same["no_prefix"] else "neither")
    benchmark.extra_info["peak_mib"] = round(peak_cpu_memory(lambda: greedy(model, ids)) / 2**20, 1)
    benchmark.pedantic(greedy, args=(model, ids), rounds=3, warmup_rounds=1)
