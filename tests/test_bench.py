"""How `fastprefix bench` decides that fastprefix's training step matched PEFT's."""

import copy

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model

import fastprefix
from fastprefix.bench import _same_training_step
from fastprefix.presets import tiny_llama


@pytest.fixture(scope="module")
def twins():
    base = tiny_llama()
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    fast = fastprefix.from_peft(get_peft_model(copy.deepcopy(base), config))
    fast.peft_model.load_state_dict(peft_model.state_dict())
    ids = torch.randint(1, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    return fast, peft_model, dict(input_ids=ids, labels=ids)


@pytest.mark.parametrize("tol", [1e-4, 1e-12], ids=["within-tolerance", "float64-fallback"])
def test_the_same_step_matches(twins, tol):
    """With a tolerance no float32 run meets, the float64 comparison decides, and a right step passes it."""
    fast, peft_model, inputs = twins
    assert _same_training_step(fast, peft_model, inputs, tol)


def test_a_wrong_step_does_not_match(twins):
    fast, peft_model, inputs = twins
    embedding = fast.peft_model.prompt_encoder["default"].embedding.weight
    original = embedding.detach().clone()
    with torch.no_grad():
        embedding.mul_(1.001)
    try:
        assert not _same_training_step(fast, peft_model, inputs, 1e-4)
    finally:
        with torch.no_grad():
            embedding.copy_(original)
