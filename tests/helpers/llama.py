"""Tiny randomly initialised LLaMA-family models and PEFT prefix-tuning twins."""

from __future__ import annotations

import copy
import warnings

import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

VOCAB = 128
CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def tiny_config(model_type="llama", *, kv_heads=2, heads=4, hidden=64, layers=2, vocab=VOCAB, intermediate=128,
                **extra):
    return CONFIGS[model_type](vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                               max_position_embeddings=256, pad_token_id=0, **extra)


def tiny_model(model_type="llama", **config):
    """A random fp32 model in eval mode (dropout-free either way: these configs have none)."""
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **config)).eval()


def peft_twins(model, P=5, **peft_config):
    """Two identical PEFT prefix-tuning models over copies of `model`: one for fastprefix, one as oracle."""
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **peft_config)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    return peft_model, copy.deepcopy(peft_model)


def padded_batch(lengths, width, generator=None, vocab=VOCAB):
    """input_ids [B, width] and attention_mask with rows of the given lengths, left-padded with token 0."""
    ids = torch.randint(1, vocab, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def checkpointed_layers(model):
    """Count the layer calls that go through the gradient-checkpointing function."""
    calls = []
    for layer in model.model.layers:
        func = layer._gradient_checkpointing_func

        def counting(*args, _func=func, **kwargs):
            calls.append(1)
            return _func(*args, **kwargs)

        layer._gradient_checkpointing_func = counting
    return calls


def quiet(fn, *args, **kwargs):
    """Call `fn`, hiding transformers' deprecation warnings (e.g. `gradient_checkpointing_enable` on 5.24)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return fn(*args, **kwargs)
