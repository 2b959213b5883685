"""Tiny randomly initialised LLaMA-family models, PEFT prefix-tuning twins and the generation oracle."""

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


@torch.no_grad()
def greedy_by_forward(forward, ids, new_tokens):
    """Greedy decoding of one unpadded row [1, n] by re-running `forward` on the whole growing sequence
    (no cache): the oracle for generation, as PEFT's forward is right where its `generate` is not."""
    seq = ids
    for _ in range(new_tokens):
        logits = forward(input_ids=seq).logits
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    return seq[:, ids.shape[1]:]


def generated_cache(output):
    """The cache returned by `generate(..., return_dict_in_generate=True)` (`cache` from 5.24 on)."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


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
