"""A whole prefix-tuning step (forward + backward) through `from_peft` never concatenates the prefix with
the sequence keys/values and never copies the shared prefix per batch row; PEFT's own step does both."""

import torch

import fastprefix
from fastprefix.testing import AllocationRecorder, materialization_violations
from llama_helpers import padded_batch, peft_twins, tiny_model

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
