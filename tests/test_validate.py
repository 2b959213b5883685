"""`validate`: every field of a PrefixTuningConfig that can disagree with the model, and the fix it prints."""

import pytest
from peft import LoraConfig, PrefixTuningConfig

import fastprefix
from fastprefix import PrefixConfigError
from llama_helpers import peft_twins, tiny_model

# A GQA model: 2 layers, 4 query heads, 2 KV heads, head dim 16, hidden 64.
RIGHT = dict(task_type="CAUSAL_LM", num_virtual_tokens=5, num_layers=2, token_dim=32, num_attention_heads=2,
             num_transformer_submodules=1)


@pytest.fixture(scope="module")
def gqa():
    return tiny_model(heads=4, kv_heads=2)


def config(**changes):
    return PrefixTuningConfig(**{**RIGHT, **changes})


def test_a_fitting_config_passes(gqa):
    fastprefix.validate(config(), gqa)
    fastprefix.validate(config(num_layers=None, token_dim=None, num_attention_heads=None,
                               num_transformer_submodules=None), gqa)
    peft_model, _ = peft_twins(gqa)
    fastprefix.validate(peft_model.active_peft_config, peft_model)


@pytest.mark.parametrize("changes, expected", [
    (dict(num_layers=3), ["num_layers = 3", "config.num_hidden_layers = 2", "Write num_layers=2"]),
    (dict(num_layers=1), ["num_layers = 1", "Write num_layers=2"]),
    (dict(token_dim=64), ["token_dim = 64", "num_key_value_heads * head_dim = 2 * 16 = 32",
                          "config.hidden_size = 64", "Write token_dim=32"]),
    (dict(num_attention_heads=4), ["num_attention_heads = 4", "config.num_key_value_heads = 2",
                                   "config.num_attention_heads = 4 counts query heads",
                                   "Write num_attention_heads=2"]),
    (dict(num_transformer_submodules=2), ["num_transformer_submodules = 2", "one attention stack",
                                          "Write num_transformer_submodules=1"]),
    (dict(task_type="SEQ_2_SEQ_LM"), ["task_type = 'SEQ_2_SEQ_LM'", "causal language model",
                                      "Write task_type='CAUSAL_LM'"]),
], ids=["layers-off-by-one-up", "layers-off-by-one-down", "token_dim-is-hidden_size", "query-heads-not-kv-heads",
        "submodules", "task_type"])
def test_each_mismatch_names_the_field_the_model_value_and_the_fix(gqa, changes, expected):
    with pytest.raises(PrefixConfigError) as error:
        fastprefix.validate(config(**changes), gqa)
    message = str(error.value)
    for part in expected:
        assert part in message, f"{part!r} missing from:\n{message}"
    field = next(iter(changes))
    assert [m[0] for m in error.value.mismatches] == [field]


def test_the_classic_gqa_mistake_reports_both_fields_and_one_config_to_write(gqa):
    """Copying hidden_size and num_attention_heads from the model config: both are wrong under GQA."""
    with pytest.raises(PrefixConfigError) as error:
        fastprefix.validate(config(token_dim=64, num_attention_heads=4), gqa)
    assert [m[0] for m in error.value.mismatches] == ["num_attention_heads", "token_dim"]
    assert "Write: PrefixTuningConfig(num_attention_heads=2, token_dim=32, num_virtual_tokens=5, ...)" in str(
        error.value)


def test_other_adapters_are_refused(gqa):
    with pytest.raises(TypeError, match="expected a peft PrefixTuningConfig, got LoraConfig"):
        fastprefix.validate(LoraConfig(task_type="CAUSAL_LM"), gqa)


def test_from_peft_validates_before_patching(gqa):
    peft_model, _ = peft_twins(gqa)
    peft_model.active_peft_config.num_layers = 3
    with pytest.raises(PrefixConfigError, match="Write num_layers=2"):
        fastprefix.from_peft(peft_model)
    assert peft_model.get_base_model().config._attn_implementation == "sdpa"
