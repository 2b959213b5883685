"""`patch` on T5 with prefixes in all three attention kinds (encoder, decoder self-attention, cross-attention):
the concatenating reference, T5's relative position bias for prefix columns, caches, dropout, checkpointing,
a decoder deeper than the encoder, and `TrainablePrefix`."""

import copy
import gc

import pytest
import torch
from transformers import T5EncoderModel

import fastprefix
from fastprefix import prefix_attention
from fastprefix.compat import cache_argument, cache_of
from fastprefix.models import t5
from fastprefix.testing import relative_error
from helpers.llama import quiet
from helpers.t5 import VOCAB, batch, concatenating_oracle, lazy_cache, random_prefix, tiny_t5

KINDS = ("encoder", "decoder", "cross")
DEPTHS = {"same-depth": dict(), "deeper-decoder": dict(num_layers=2, num_decoder_layers=3)}


def all_kinds(model, requires_grad=False):
    """A prefix in every attention kind, of different lengths (5, 4, 3)."""
    return {kind: random_prefix(model, kind, P, requires_grad) for kind, P in zip(KINDS, (5, 4, 3))}


def prefix_tensors(prefixes):
    return [t for p in prefixes.values() for t in p.keys + p.values]


def loss_and_gradients(model, prefixes, inputs, attending=fastprefix.patched):
    """Forward + backward with `prefixes` (through fastprefix.patched, or `attending=concatenating_oracle`):
    logits, loss and the gradients of every prefix tensor and model parameter."""
    leaves = prefix_tensors(prefixes) + [p for p in model.parameters() if p.requires_grad]
    for t in leaves:
        t.grad = None
    with attending(model, prefixes):  # backward too: checkpointed layers recompute in it
        out = model(**inputs)
        out.loss.backward()
    return out.logits, out.loss, [t.grad for t in leaves]


@pytest.mark.parametrize("trainable", ["prefix", "everything"],
                         ids=["frozen-model", "trainable-model"])
@pytest.mark.parametrize("depth", list(DEPTHS))
def test_all_three_kinds_match_the_concatenating_oracle(depth, trainable):
    """Forward and backward against T5 run with every prefix concatenated to its keys (helpers.t5's oracle,
    none of fastprefix's T5 code): logits and loss < 1e-5, every gradient < 1e-4, with padded inputs and
    targets. A trainable model also differentiates T5's relative position bias through the prefix columns."""
    model = tiny_t5(**DEPTHS[depth])
    model.requires_grad_(trainable == "everything")
    prefixes = all_kinds(model, requires_grad=True)
    inputs = batch(torch.Generator().manual_seed(1))
    state = copy.deepcopy(model.state_dict())
    logits, loss, grads = loss_and_gradients(model, prefixes, inputs)
    ref_logits, ref_loss, ref_grads = loss_and_gradients(model, prefixes, inputs, concatenating_oracle)
    assert relative_error(logits, ref_logits) < 1e-5
    assert relative_error(loss, ref_loss) < 1e-5
    assert all(g is not None for g in grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert relative_error(g, r) < 1e-4, i
    with torch.no_grad():
        assert relative_error(model(**inputs).logits, logits) > 1e-2, "the prefixes must change the output"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "unpatched model changed"


def test_per_row_prefixes_match_the_concatenating_oracle():
    """[B, H, P, d_kv] prefixes, one per row, in all three kinds: forward and backward against the oracle."""
    model = tiny_t5()
    model.requires_grad_(False)
    inputs = batch(torch.Generator().manual_seed(6))
    shared = all_kinds(model)
    prefixes = {kind: fastprefix.Prefix(*([torch.randn(3, *t.shape, requires_grad=True) for t in tensors]
                                          for tensors in (p.keys, p.values))) for kind, p in shared.items()}
    logits, loss, grads = loss_and_gradients(model, prefixes, inputs)
    ref_logits, ref_loss, ref_grads = loss_and_gradients(model, prefixes, inputs, concatenating_oracle)
    assert relative_error(logits, ref_logits) < 1e-5 and relative_error(loss, ref_loss) < 1e-5
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert relative_error(g, r) < 1e-4, i


def test_prefix_columns_get_the_bias_of_the_positions_just_before_the_sequence():
    """Encoder prefix (bidirectional buckets) against the concatenating oracle, with a long enough padded input
    that prefix columns fall in several logarithmic buckets. The decoder's (causal buckets, offset by the cache
    while decoding) is checked against PEFT's cache in test_t5_peft_parity.py."""
    model = tiny_t5()
    prefixes = {"encoder": random_prefix(model, "encoder", P=6)}
    ids = torch.randint(1, VOCAB, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        with fastprefix.patched(model, prefixes):
            out = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        with concatenating_oracle(model, prefixes):
            expected = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    assert relative_error(out, expected) < 1e-5


def generate(model, ids, mask, new_tokens=12, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decoding_with_a_cache_matches_the_full_forward(cache):
    """Step-by-step logits of `generate` equal one forward over the finished sequence: the decoder's prefix
    columns get the bias of query position past + i, `past` read from the cache (a static cache's keys span
    its capacity, so it cannot be read off them). The cache holds the sequence only."""
    model = tiny_t5(num_layers=3, num_decoder_layers=2)
    ids = torch.randint(1, VOCAB, (3, 8))
    mask = torch.ones_like(ids)
    mask[1, :3], mask[2, :6] = 0, 0
    with fastprefix.patched(model, all_kinds(model)), torch.no_grad():
        out = generate(model, ids, mask, cache_implementation=cache)
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences).logits
    assert relative_error(torch.stack(out.logits, dim=1), full[:, :-1]) < 1e-5
    if cache == "dynamic":
        for layer in cache_of(out).self_attention_cache.layers[:2]:
            assert layer.keys.shape[-2] == out.sequences.shape[1] - 1, "the decoder cache must hold the sequence only"
        for layer in cache_of(out).cross_attention_cache.layers[:2]:
            assert layer.keys.shape[-2] == ids.shape[1], "the cross-attention cache must hold the encoder's keys only"


def test_a_decoder_deeper_than_the_encoder_generates():
    """transformers' `generate` sizes its cache by config.num_layers (the encoder's 2 layers here) and fails on
    the third decoder layer, with or without fastprefix; given a cache that grows per layer, it runs, and
    fastprefix keeps the prefix out of it."""
    model = tiny_t5(**DEPTHS["deeper-decoder"])
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    with fastprefix.patched(model, all_kinds(model)), torch.no_grad():
        with pytest.raises(IndexError):
            generate(model, ids, mask)
        out = generate(model, ids, mask, **{cache_argument(model): lazy_cache()})
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences).logits
    assert relative_error(torch.stack(out.logits, dim=1), full[:, :-1]) < 1e-5
    assert [layer.keys.shape[-2] for layer in cache_of(out).self_attention_cache.layers] == [12] * 3


def attention_dropout_only(model):
    """Training mode with every nn.Dropout off, so only the attention modules' dropout_rate can vary outputs."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_attention_dropout_is_applied_in_training_only(monkeypatch):
    """T5 hands dropout_rate to the attention function in training mode: two training forwards differ, two
    eval forwards are equal, and every kind's prefix_attention call got dropout_p = dropout_rate (0 in eval)."""
    model = attention_dropout_only(tiny_t5(dropout_rate=0.2))
    inputs = batch(torch.Generator().manual_seed(2))
    seen = []

    def recording(*args, dropout_p, **kwargs):
        seen.append(dropout_p)
        return prefix_attention(*args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(t5, "prefix_attention", recording)
    with fastprefix.patched(model, all_kinds(model)), torch.no_grad():
        first, second = model(**inputs).logits, model(**inputs).logits
        assert relative_error(first, second) > 1e-3
        assert set(seen) == {0.2} and len(seen) == 2 * (2 + 2 + 2)
        model.eval()
        seen.clear()
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)
        assert set(seen) == {0.0}


def test_fused_dropout_keeps_t5_shaped_probabilities_at_the_right_rate():
    """The fused path with T5's inputs (shared prefix, bias [1, H, N, P + S], padding mask [B, 1, 1, S]): with
    one-hot values, out[..., j] is column j's probability after dropout, either 0 or p_j / (1 - p), kept at
    rate 1 - p in prefix and sequence columns alike."""
    B, H, N, S, P, p = 4, 4, 16, 24, 24, 0.1
    q, k = torch.randn(B, H, N, P + S), torch.randn(B, H, S, P + S)
    prefix_k = torch.randn(H, P, P + S)
    eye = torch.eye(P + S)
    prefix_v, v = eye[:P].expand(H, -1, -1), eye[P:].expand(B, H, -1, -1)
    bias = torch.randn(1, H, N, P + S)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., :5] = False
    options = dict(scale=1.0, attn_mask=mask, attn_bias=bias, backend="torch")
    probs = prefix_attention(q, k, v, prefix_k, prefix_v, **options)
    dropped = prefix_attention(q, k, v, prefix_k, prefix_v, dropout_p=p, **options)
    visible = torch.cat([torch.ones(B, 1, 1, P, dtype=torch.bool), mask], dim=-1).expand_as(probs)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - p), rtol=1e-5, atol=1e-7)
    for cols in (slice(0, P), slice(P, None)):
        rate = kept[..., cols][visible[..., cols]].float().mean().item()
        assert abs(rate - (1 - p)) < 0.02, rate  # ~5 standard deviations for ~6000 draws per segment


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_t5(dropout_rate=0.0).train()
    model.requires_grad_(False)
    prefixes = all_kinds(model, requires_grad=True)
    inputs = batch(torch.Generator().manual_seed(3))
    _, _, expected = loss_and_gradients(model, prefixes, inputs)
    quiet(model.gradient_checkpointing_enable)
    calls = []
    for block in list(model.encoder.block) + list(model.decoder.block):
        func = block._gradient_checkpointing_func
        block._gradient_checkpointing_func = lambda *a, _func=func, **kw: calls.append(1) or _func(*a, **kw)
    _, _, got = loss_and_gradients(model, prefixes, inputs)
    assert len(calls) == 4, "every block must have run under checkpointing"
    for g, e in zip(got, expected):
        assert relative_error(g, e) < 1e-6


def test_prefixes_that_do_not_fit_are_refused():
    model = tiny_t5(**DEPTHS["deeper-decoder"])
    with pytest.raises(ValueError, match=r"decoder self-attention has 2 layers but T5ForConditionalGeneration has 3"):
        fastprefix.patch(model, random_prefix(tiny_t5(), "decoder"))
    with pytest.raises(ValueError, match=r"'encoder' \(encoder self-attention\).*got unknown kinds \['self'\]"):
        fastprefix.patch(model, {"self": random_prefix(model, "decoder")})
    with pytest.raises(ValueError, match="empty dict"):
        fastprefix.patch(model, {})
    with pytest.raises(TypeError, match=r"expected a fastprefix.Prefix for decoder cross-attention, got list"):
        fastprefix.patch(model, {"cross": list(random_prefix(model, "cross").keys)})
    encoder_only = T5EncoderModel(model.config)
    with pytest.raises(ValueError, match="a bare Prefix goes to decoder self-attention, which T5EncoderModel does not"):
        fastprefix.patch(encoder_only, random_prefix(model, "encoder"))
    assert model.config._attn_implementation == "sdpa"


def test_float_4d_mask_is_refused():
    model = tiny_t5()
    ids = torch.randint(1, VOCAB, (2, 6))
    with fastprefix.patched(model, all_kinds(model)), pytest.raises(TypeError, match="2-D padding mask"):
        model(input_ids=ids, attention_mask=torch.zeros(2, 1, 6, 6), decoder_input_ids=ids)


def test_an_encoder_only_model_takes_an_encoder_prefix_and_outlives_its_dropped_handle():
    """T5EncoderModel: {"encoder": Prefix} matches the concatenating oracle; the model alone keeps the patch
    alive (regression: the handle was once kept only by decoder hooks, so an encoder-only model lost it)."""
    model = tiny_t5()
    encoder_only = T5EncoderModel(model.config).eval()
    ids = torch.randint(1, VOCAB, (2, 7))
    prefixes = {"encoder": random_prefix(model, "encoder")}
    with torch.no_grad(), concatenating_oracle(encoder_only, prefixes):
        expected = encoder_only(input_ids=ids).last_hidden_state
    handle = fastprefix.patch(encoder_only, prefixes)
    del handle
    gc.collect()
    with torch.no_grad():
        out = encoder_only(input_ids=ids).last_hidden_state
    assert relative_error(out, expected) < 1e-5


def test_from_prompt_refuses_an_encoder_decoder_model():
    model = tiny_t5()
    with pytest.raises(TypeError, match="T5ForConditionalGeneration is an encoder-decoder model.*TrainablePrefix"):
        fastprefix.Prefix.from_prompt(model, torch.randint(1, VOCAB, (6,)))


def test_a_bare_prefix_goes_to_decoder_self_attention():
    model = tiny_t5()
    prefix = random_prefix(model, "decoder")
    inputs = batch(torch.Generator().manual_seed(4))
    with torch.no_grad():
        with fastprefix.patched(model, prefix) as handle:
            assert handle.prefixes == {"decoder": prefix} and handle.prefix is prefix
            bare = model(**inputs).logits
        with fastprefix.patched(model, {"decoder": prefix}):
            assert torch.equal(model(**inputs).logits, bare)


def test_trainable_prefix_learns_in_every_kind():
    """TrainablePrefix: parameters of the model's geometry per kind, gradients in all three kinds, and a fixed
    batch fitted by a few steps of the prefix alone."""
    model = tiny_t5(**DEPTHS["deeper-decoder"], dropout_rate=0.0)
    model.requires_grad_(False)
    trainable = fastprefix.TrainablePrefix(model, length=4)
    assert [name for name, _ in trainable.named_parameters()][:2] == ["prefix_keys.decoder.0", "prefix_keys.decoder.1"]
    assert {kind: p.num_layers for kind, p in trainable.prefix().items()} == {"decoder": 3, "encoder": 2, "cross": 3}
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=5e-2)
    inputs = batch(torch.Generator().manual_seed(5))
    losses = []
    with fastprefix.patched(model, trainable.prefix()):
        for _ in range(15):
            loss = model(**inputs).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters())
    assert losses[-1] < 0.8 * losses[0], losses
    only_decoder = fastprefix.TrainablePrefix(model, length=2, kinds=["decoder"])
    assert list(only_decoder.prefix()) == ["decoder"]
    for bad, match in ((dict(length=4, kinds=["self"]), r"among \['decoder', 'encoder', 'cross'\]; got \['self'\]"),
                       (dict(length=0), "positive int")):
        with pytest.raises(ValueError, match=match):
            fastprefix.TrainablePrefix(model, **bad)
