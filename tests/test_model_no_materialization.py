"""A whole prefix-tuning step (forward + backward) through `from_peft` (LLaMA, T5) or a patched T5 with
prefixes in all three attention kinds never concatenates the prefix with the sequence keys/values, never
copies the shared prefix per batch row, and (T5) never turns the position bias into one copy per row; PEFT's
own step does all of these."""

import torch

import fastprefix
from fastprefix.testing import AllocationRecorder, materialization_violations
from helpers.llama import padded_batch, peft_twins, tiny_model
from helpers.t5 import batch as t5_batch
from helpers.t5 import random_prefix as t5_random_prefix
from helpers.t5 import t5_twins, tiny_t5

# P + S = 18, P = 7 and D = 12 (hidden 48 / 4 heads) coincide with no other dimension of the model
# (intermediate 40, vocabulary 100). B = 5 rows: one per-row copy of a layer's prefix (5 * 2 * 7 * 12
# elements) outweighs the prompt encoder's output for all layers at once (7 * 2 * 2 * 2 * 12).
SIZES = dict(B=5, Hq=4, Hkv=2, N=11, S=11, P=7, D=12)


def recorded_step(model_call):
    ids, mask = padded_batch((11, 9, 11, 6, 8), 11, torch.Generator().manual_seed(0), vocab=100)
    with AllocationRecorder() as recorder:
        loss = model_call(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
    return materialization_violations(recorder.produced, **SIZES, itemsize=4, shared=True)


def models():
    model = tiny_model(heads=4, kv_heads=2, hidden=48, intermediate=40, vocab=100)
    return peft_twins(model, P=SIZES["P"], prefix_projection=True, encoder_hidden_size=40)


def test_from_peft_step_does_not_materialize_the_prefix():
    peft_model, _ = models()
    assert recorded_step(fastprefix.from_peft(peft_model)) == []


def test_detector_catches_peft_materializing_the_prefix():
    """The check above can fail: PEFT's step copies the prefix per row and concatenates it in every layer."""
    _, peft_model = models()
    bad = recorded_step(peft_model)
    assert any("key columns" in b for b in bad), bad
    assert any("copied per row" in b for b in bad), bad


# T5: P + S = 20 (encoder, cross-attention) and 16 (decoder), P = 7 and D = d_kv = 11 coincide with no other
# dimension of the model (d_model 40, d_ff 30, num_heads * d_kv 44, vocabulary 97, 8 buckets, B = 5 rows).
T5_SIZES = dict(B=5, H=4, D=11, P=7, S_enc=13, S_dec=9)


def t5_models():
    model = tiny_t5(d_kv=11, d_ff=30, vocab_size=97)
    return t5_twins(model, P=T5_SIZES["P"], prefix_projection=True, encoder_hidden_size=30)


def recorded_t5_step(model_call):
    """Violations of a training step: prefix rows concatenated or copied per row (for each attention kind's
    query and key lengths), and the sequence position bias [1, H, N, S] made into a per-row [B, H, N, S]."""
    B, H, D, P, S_enc, S_dec = (T5_SIZES[k] for k in ("B", "H", "D", "P", "S_enc", "S_dec"))
    inputs = t5_batch(torch.Generator().manual_seed(0), lengths=(13, 9, 13, 6, 8), width=S_enc,
                      target_lengths=(9, 5, 7, 9, 3), target_width=S_dec)
    with AllocationRecorder() as recorder:
        model_call(**inputs).loss.backward()
    bad = []
    for N, S in ((S_enc, S_enc), (S_dec, S_dec), (S_dec, S_enc)):
        bad += materialization_violations(recorder.produced, B=B, Hq=H, Hkv=H, N=N, P=P, S=S, D=D, itemsize=4,
                                          shared=True)
        bad += [f"{op} produced {list(shape)}: a per-row position bias" for op, shape, _ in recorder.produced
                if shape == (B, H, N, S)]
    return sorted(set(bad))


def test_t5_from_peft_step_does_not_materialize_the_prefix_or_a_per_row_bias():
    peft_model, _ = t5_models()
    assert recorded_t5_step(fastprefix.from_peft(peft_model)) == []


def test_t5_native_step_with_three_prefixes_does_not_materialize():
    model = t5_models()[0].get_base_model()
    prefixes = {kind: t5_random_prefix(model, kind, P=T5_SIZES["P"], requires_grad=True)
                for kind in ("encoder", "decoder", "cross")}
    with fastprefix.patched(model, prefixes):
        assert recorded_t5_step(model) == []


def test_detector_catches_peft_materializing_the_t5_prefix_and_bias():
    """The checks above can fail: PEFT's T5 step concatenates the prefix in decoder self-attention, copies it
    per row, and transformers' SDPA path folds the position bias and padding mask into [B, H, N, S]."""
    _, peft_model = t5_models()
    bad = recorded_t5_step(peft_model)
    for rule in ("key columns", "copied per row", "per-row position bias"):
        assert any(rule in b for b in bad), (rule, bad)
