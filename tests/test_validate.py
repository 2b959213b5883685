"""`validate`: every field of a PrefixTuningConfig that can disagree with the model (LLaMA-family and T5), and the
fix it prints."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, get_peft_model

import fastprefix
from fastprefix import PrefixConfigError, PrefixConfigWarning
from helpers.llama import peft_twins, tiny_model
from helpers.t5 import tiny_t5

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


# T5: 2 encoder layers, 3 decoder layers, 4 heads of d_kv 12 (48) over d_model 40.
T5_RIGHT = dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=5, num_layers=3, token_dim=48, num_attention_heads=4,
                num_transformer_submodules=2)


@pytest.fixture(scope="module")
def t5():
    return tiny_t5(num_layers=2, num_decoder_layers=3)


def t5_config(**changes):
    return PrefixTuningConfig(**{**T5_RIGHT, **changes})


def test_a_fitting_t5_config_passes(t5):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastprefix.validate(t5_config(), t5)
        fastprefix.validate(t5_config(num_attention_heads=None, num_transformer_submodules=None), t5)
        square = tiny_t5(d_model=48)  # num_layers == num_decoder_layers, d_model == num_heads * d_kv
        fastprefix.validate(t5_config(num_layers=None, token_dim=None), square)


@pytest.mark.parametrize("changes, expected", [
    (dict(task_type="CAUSAL_LM"), ["task_type = 'CAUSAL_LM'", "encoder-decoder (sequence-to-sequence) model",
                                   "Write task_type='SEQ_2_SEQ_LM'"]),
    (dict(num_layers=2), ["num_layers = 2", "config.num_decoder_layers = 3 decoder layers",
                          "config.num_layers = 2 counts the encoder's layers", "Write num_layers=3"]),
    (dict(num_layers=None), ["num_layers = None", "Write num_layers=3"]),
    (dict(token_dim=40), ["token_dim = 40", "num_heads * d_kv = 4 * 12 = 48", "config.d_model = 40",
                          "Write token_dim=48"]),
    (dict(token_dim=None), ["token_dim = None", "Write token_dim=48"]),
    (dict(num_attention_heads=2), ["num_attention_heads = 2", "config.num_heads = 4", "Write num_attention_heads=4"]),
], ids=["task_type", "encoder-layers", "layers-left-to-peft", "token_dim-is-d_model", "token_dim-left-to-peft",
        "heads"])
def test_each_t5_mismatch_names_the_field_the_model_value_and_the_fix(t5, changes, expected):
    with pytest.raises(PrefixConfigError) as error:
        fastprefix.validate(t5_config(**changes), t5)
    message = str(error.value)
    for part in expected:
        assert part in message, f"{part!r} missing from:\n{message}"
    assert [m[0] for m in error.value.mismatches] == [next(iter(changes))]


def test_one_transformer_submodule_on_t5_is_a_warning_saying_what_it_does(t5):
    """It runs (and fastprefix matches PEFT on it), but is not "the decoder only" as its name suggests."""
    with pytest.warns(PrefixConfigWarning) as caught:
        fastprefix.validate(t5_config(num_transformer_submodules=1), t5)
    message = str(caught[0].message)
    for part in ("num_transformer_submodules = 1", "cross-attention attends to the prefix and to every decoder "
                 "position, later ones included", "a padded encoder batch fails", "with 2 the prefix reaches decoder "
                 "self-attention only", "Neither value gives the encoder a prefix",
                 "Write num_transformer_submodules=2"):
        assert part in message, f"{part!r} missing from:\n{message}"


def test_from_peft_explains_what_peft_would_fail_on_deep_inside_a_forward(t5):
    """PEFT's defaults for this T5 (num_layers from the encoder, token_dim from d_model) make PEFT's own forward
    fail; from_peft names both fields instead, before patching anything."""
    peft_model = get_peft_model(copy.deepcopy(t5), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=5))
    ids = torch.randint(1, 90, (2, 6))
    with pytest.raises((IndexError, RuntimeError)):
        peft_model(input_ids=ids, decoder_input_ids=ids)
    with pytest.raises(PrefixConfigError) as error:
        fastprefix.from_peft(peft_model)
    assert [m[0] for m in error.value.mismatches] == ["num_layers", "token_dim"]
    assert "Write: PrefixTuningConfig(num_layers=3, token_dim=48, num_virtual_tokens=5, ...)" in str(error.value)
    assert peft_model.get_base_model().decoder.config._attn_implementation == "sdpa"
    causal = get_peft_model(copy.deepcopy(t5), t5_config(task_type="CAUSAL_LM"))
    with pytest.raises(PrefixConfigError, match="Write task_type='SEQ_2_SEQ_LM'"):
        fastprefix.from_peft(causal)
