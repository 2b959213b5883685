"""Prefix tuning of a small random T5 on CPU: fastprefix.from_peft vs PEFT vs the model without a prefix, and
fastprefix with a prefix in all three attention kinds (which PEFT cannot place).

Run: pytest bench/test_t5_bench.py --benchmark-only [--benchmark-json=out.json]

* train: one prefix-tuning step, forward + backward of the LM loss. T5ForConditionalGeneration with 4 encoder
  and 4 decoder layers, d_model 512, 8 heads of d_kv 64, d_ff 1024, vocabulary 2048; B = 8, 256 input and
  128 target tokens, P = 64, float32, in training mode (dropout_rate 0.1 on attention probabilities and
  hidden states), PEFT's default num_transformer_submodules=2 (prefix in decoder self-attention).
  "fastprefix_3_kinds" trains a `TrainablePrefix` of P = 64 in encoder, decoder and cross-attention.
  Floors without a prefix: "no_prefix" back-propagates to the decoder's input embeddings (the activation
  gradients a decoder prefix needs: none through the encoder), "no_prefix_encoder_too" to the encoder's as
  well (what a prefix in the encoder needs).
* generate: greedy, B = 8 inputs of 64 tokens, 32 new tokens, eval mode, same model.

The random model's token embeddings are scaled by 0.1 (T5 draws them from N(0, 1), which makes a random T5
repeat its last token whatever the prefix), so that the prefix changes the generated tokens.

Timing: one thread, CPU time of the process (`time.process_time`), so that other jobs on a shared
machine cannot stretch the figures. Peak memory (MiB allocated during one call, on top of what existed before
it; see fastprefix.profiling) goes into each benchmark's extra_info, next to the transformers version. PEFT's
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
from transformers import T5Config, T5ForConditionalGeneration

import fastprefix
from fastprefix.profiling import peak_cpu_memory

CONFIG = dict(vocab_size=2048, d_model=512, d_kv=64, num_heads=8, d_ff=1024, num_layers=4, dropout_rate=0.1,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)
B, N_IN, N_OUT, P = 8, 256, 128, 64
PROMPT, NEW_TOKENS = 64, 32
TRAIN_PROVIDERS = ("fastprefix", "peft", "no_prefix", "no_prefix_encoder_too", "fastprefix_3_kinds")
GENERATE_PROVIDERS = ("fastprefix", "peft", "no_prefix", "fastprefix_3_kinds")
pytestmark = pytest.mark.benchmark(timer=time.process_time)


@pytest.fixture(scope="module")
def models():
    """provider -> a model called like a PEFT model, with a `generate`. One random model under all of them."""
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(**CONFIG)).eval()
    with torch.no_grad():
        base.shared.weight.mul_(0.1)
    peft_config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, token_dim=512)
    peft_model = get_peft_model(copy.deepcopy(base), peft_config)
    fast = fastprefix.from_peft(get_peft_model(copy.deepcopy(base), peft_config))
    fast.peft_model.load_state_dict(peft_model.state_dict())
    native = copy.deepcopy(base)
    native.requires_grad_(False)
    trainable = fastprefix.TrainablePrefix(native, length=P)
    fastprefix.patch(native, trainable.prefix())
    base.requires_grad_(False)
    return {"fastprefix": fast, "peft": peft_model, "no_prefix": base, "no_prefix_encoder_too": base,
            "fastprefix_3_kinds": native}


def modules(model):
    return model.peft_model if isinstance(model, fastprefix.PeftPrefixModel) else model


def greedy(model, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
def test_train_step(benchmark, models, provider):
    model = models[provider]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, CONFIG["vocab_size"], (B, N_IN), generator=generator)
    labels = torch.randint(1, CONFIG["vocab_size"], (B, N_OUT), generator=generator)
    inputs = dict(input_ids=ids, labels=labels)
    if provider.startswith("no_prefix"):  # gradients reach the activations through leaves at the embeddings
        embed = model.get_input_embeddings()
        inputs["decoder_inputs_embeds"] = embed(model._shift_right(labels)).detach().requires_grad_()
        if provider == "no_prefix_encoder_too":
            inputs["inputs_embeds"] = embed(inputs.pop("input_ids")).detach().requires_grad_()

    def step():
        model(**inputs).loss.backward()

    modules(model).train()
    benchmark.extra_info.update(B=B, N_in=N_IN, N_out=N_OUT, P=P, dtype="float32", dropout=CONFIG["dropout_rate"],
                                transformers=transformers.__version__)
    benchmark.extra_info["peak_mib"] = round(peak_cpu_memory(step) / 2**20, 1)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    modules(model).eval()


@pytest.mark.parametrize("provider", GENERATE_PROVIDERS)
def test_generate(benchmark, models, provider):
    model = models[provider]
    ids = torch.randint(1, CONFIG["vocab_size"], (B, PROMPT), generator=torch.Generator().manual_seed(2))
    benchmark.extra_info.update(B=B, prompt=PROMPT, new_tokens=NEW_TOKENS, P=P, dtype="float32",
                                transformers=transformers.__version__)
    if provider == "peft":
        tokens = greedy(model, ids)
        fast, base = greedy(models["fastprefix"], ids), greedy(models["no_prefix"], ids)
        assert not torch.equal(fast, base), "the prefix must change the tokens, or the label below says nothing"
        benchmark.extra_info["tokens"] = ("fastprefix's" if torch.equal(tokens, fast) else
                                          "the base model's (prefix ignored)" if torch.equal(tokens, base) else "neither")
    benchmark.extra_info["peak_mib"] = round(peak_cpu_memory(lambda: greedy(model, ids)) / 2**20, 1)
    benchmark.pedantic(greedy, args=(model, ids), rounds=3, warmup_rounds=1)
