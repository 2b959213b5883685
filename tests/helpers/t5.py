"""Tiny randomly initialised T5 / mT5 models, PEFT prefix-tuning twins, prefixes, and an oracle that runs T5
with prefixes concatenated to its keys."""

from __future__ import annotations

import contextlib
import copy

import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import (AttentionInterface, DynamicCache, EncoderDecoderCache, MT5Config, MT5ForConditionalGeneration,
                          PreTrainedModel, T5Config, T5ForConditionalGeneration)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import fastprefix
from helpers.llama import padded_batch

VOCAB = 96
# d_model 40 != num_heads * d_kv = 4 * 12 = 48, as in t5-v1_1 / mT5 checkpoints (PEFT's token_dim default
# is wrong for them). Few buckets and a short max distance, so the short test sequences reach the
# logarithmic buckets.
CONFIG = dict(vocab_size=VOCAB, d_model=40, d_kv=12, d_ff=56, num_heads=4, num_layers=2,
              relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.1,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=None, tie_word_embeddings=False)
MODELS = {"t5": (T5Config, T5ForConditionalGeneration), "mt5": (MT5Config, MT5ForConditionalGeneration)}


def tiny_t5(model_type="t5", **changes):
    """A random fp32 model in eval mode. eos_token_id=None, so generation always runs its full length. The input
    embeddings (untied from the output layer) are scaled by 0.1: T5 draws them from N(0, 1), so large next to
    what attention adds that a tiny random T5 greedily repeats its last token whatever the input or prefix."""
    config_class, model_class = MODELS[model_type]
    model = model_class(config_class(**{**CONFIG, **changes})).eval()
    with torch.no_grad():
        model.shared.weight.mul_(0.1)
    return model


def peft_config(model, P=5, submodules=2, **changes):
    """A PrefixTuningConfig that fits `model` (as fastprefix.validate wants it)."""
    c = model.config
    return PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, num_transformer_submodules=submodules,
                              num_layers=c.num_decoder_layers, token_dim=c.num_heads * c.d_kv,
                              num_attention_heads=c.num_heads, **changes)


def t5_twins(model, P=5, submodules=2, **changes):
    """Two identical PEFT prefix-tuning models over copies of `model`: one for fastprefix, one as oracle."""
    peft_model = get_peft_model(copy.deepcopy(model), peft_config(model, P, submodules, **changes))
    return peft_model, copy.deepcopy(peft_model)


def random_prefix(model, kind, P=5, requires_grad=False):
    """Gaussian prefix keys/values for one attention kind of a T5 model, [H, P, d_kv] per layer."""
    c = model.config
    layers = c.num_layers if kind == "encoder" else c.num_decoder_layers
    make = lambda: [torch.randn(c.num_heads, P, c.d_kv, requires_grad=requires_grad) for _ in range(layers)]
    return fastprefix.Prefix(make(), make())


def batch(generator, lengths=(9, 6, 3), width=9, target_lengths=(7, 4, 6), target_width=7):
    """A seq2seq training batch: left-padded inputs, right-padded labels (-100 past each row's end) and the
    matching decoder_attention_mask."""
    ids, mask = padded_batch(lengths, width, generator, vocab=VOCAB)
    labels = torch.randint(1, VOCAB, (len(target_lengths), target_width), generator=generator)
    decoder_mask = torch.zeros_like(labels)
    for r, n in enumerate(target_lengths):
        decoder_mask[r, :n] = 1
    return dict(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(decoder_mask == 0, -100),
                decoder_attention_mask=decoder_mask)


def lazy_cache():
    """An empty cache that grows a layer per decoder layer it meets. transformers' `generate` sizes the
    cache it makes by config.num_layers (the encoder's layers), too few when num_decoder_layers is larger."""
    return EncoderDecoderCache(DynamicCache(), DynamicCache())



def _attention_modules(model):
    """{module: (kind, layer)} of every T5 attention module, found independently of fastprefix's T5 code."""
    base = model.base_model
    found = {block.layer[0].SelfAttention: ("encoder", i) for i, block in enumerate(base.encoder.block)}
    decoder = getattr(base, "decoder", None)
    for i, block in enumerate(decoder.block if decoder is not None else ()):
        found[block.layer[0].SelfAttention] = ("decoder", i)
        found[block.layer[1].EncDecAttention] = ("cross", i)
    return found


@contextlib.contextmanager
def concatenating_oracle(model, prefixes):
    """Run `model` (its full forward, no cache) with every attention over [prefix ; sequence] keys, the prefix
    concatenated as PEFT's cache would hold it: at positions 0 .. P - 1, the sequence at P, P + 1, ..., so one
    `compute_bias` of the stack's first layer over all P + S columns gives the prefix columns their bias; cross-
    attention has none. `prefixes`: {kind: fastprefix.Prefix}, kinds among "encoder", "decoder", "cross". An
    oracle for fastprefix's T5 patching that shares none of its code."""
    where = _attention_modules(model)
    first = {kind: module for module, (kind, layer) in where.items() if layer == 0 and kind != "cross"}

    def attention(module, query, key, value, attention_mask, *, position_bias, scaling, dropout=0.0, **kwargs):
        assert dropout == 0.0, "the oracle runs without attention dropout"
        kind, layer = where[module]
        B, N, S = query.shape[0], query.shape[2], key.shape[2]
        prefix_k, prefix_v = (prefixes[kind].layer(layer) if kind in prefixes
                              else (key.new_zeros(key.shape[1], 0, key.shape[3]),) * 2)
        if prefix_k.dim() == 3:
            prefix_k, prefix_v = prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1)
        P = prefix_k.shape[2]
        scores = query @ torch.cat([prefix_k, key], dim=2).transpose(-1, -2) * scaling
        if kind != "cross":
            bias = first[kind].compute_bias(N, P + S, past_seen_tokens=P)
            assert torch.equal(bias[..., P:], position_bias), "relative positions within the sequence must not move"
            scores = scores + bias
        visible = torch.ones(B, 1, N, P + S, dtype=torch.bool)
        if attention_mask is not None:
            visible[..., P:] = attention_mask
        elif kind == "decoder":
            visible[..., P:] = torch.ones(N, S, dtype=torch.bool).tril()
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        return (probs @ torch.cat([prefix_v, value], dim=2)).transpose(1, 2), None

    AttentionInterface.register("t5_concat_oracle", attention)
    AttentionMaskInterface.register("t5_concat_oracle", sdpa_mask)
    configs = {id(m.config): m.config for m in model.modules() if isinstance(m, PreTrainedModel)}.values()
    saved = [(config, config._attn_implementation) for config in configs]
    for config, _ in saved:
        config._attn_implementation = "t5_concat_oracle"
    try:
        yield
    finally:
        for config, implementation in saved:
            config._attn_implementation = implementation
