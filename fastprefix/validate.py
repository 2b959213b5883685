"""`validate(peft_config, model)`: does a PEFT prefix-tuning config fit the model? If not, say what to write.

Each model kind states what it expects of the config as a list of `Expectation`s (field, value, where the
value comes from); `validate` compares them all and reports every mismatch at once. Decoder-only models
and encoder-decoder models (T5) have their own lists (`expectations_for`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from .models import family_of


class PrefixConfigError(ValueError):
    """A PEFT prefix-tuning config that does not fit its model. `mismatches` holds (field, given, expected)."""

    def __init__(self, message: str, mismatches: list[tuple[str, object, object]]):
        super().__init__(message)
        self.mismatches = mismatches


class PrefixConfigWarning(UserWarning):
    """A PEFT prefix-tuning config that runs, but does something else than its name suggests (say
    `warnings.simplefilter("error", PrefixConfigWarning)` to make it an error)."""


@dataclass(frozen=True)
class Expectation:
    """The model needs `field` == `value`; `why` says where that value comes from. With `derived`, None also
    passes: PEFT fills the field in from the model config, correctly for this model. Without `fatal`, a
    mismatch is a `PrefixConfigWarning`: the config runs, and fastprefix matches what PEFT does with it."""

    field: str
    value: object
    why: str
    derived: bool = True
    fatal: bool = True


def causal_lm_expectations(model) -> list[Expectation]:
    """What a decoder-only model of a registered family needs from a PrefixTuningConfig."""
    g = family_of(model).geometry(model)["decoder"]
    config = model.config
    return [
        Expectation("task_type", "CAUSAL_LM", f"{type(model).__name__} is a causal language model", derived=False),
        Expectation("num_layers", g.num_layers, f"config.num_hidden_layers = {g.num_layers} decoder layers"),
        Expectation("num_attention_heads", g.num_kv_heads,
                    f"the prefix holds key/value heads: config.num_key_value_heads = {g.num_kv_heads} "
                    f"(config.num_attention_heads = {config.num_attention_heads} counts query heads)"),
        Expectation("token_dim", g.num_kv_heads * g.head_dim,
                    f"one prefix position per layer holds num_key_value_heads * head_dim = {g.num_kv_heads} * "
                    f"{g.head_dim} = {g.num_kv_heads * g.head_dim} values (config.hidden_size = "
                    f"{config.hidden_size} is the width of the residual stream)"),
        Expectation("num_transformer_submodules", 1, "a decoder-only model has one attention stack"),
    ]


def seq2seq_lm_expectations(model) -> list[Expectation]:
    """What an encoder-decoder model (T5, mT5) needs from a PrefixTuningConfig. PEFT fills num_layers in from
    config.num_layers (the encoder's layers) and token_dim from config.d_model; both are wrong when they
    differ from the decoder's layers and from num_heads * d_kv."""
    config = model.config
    name = type(model).__name__
    layers, heads, d_kv = config.num_decoder_layers, config.num_heads, config.d_kv
    layer_note = ("" if layers == config.num_layers else
                  f"; config.num_layers = {config.num_layers} counts the encoder's layers, PEFT's default")
    width_note = ("" if heads * d_kv == config.d_model else
                  f"; config.d_model = {config.d_model}, PEFT's default, is the width of the residual stream")
    return [
        Expectation("task_type", "SEQ_2_SEQ_LM", f"{name} is an encoder-decoder (sequence-to-sequence) model",
                    derived=False),
        Expectation("num_layers", layers,
                    f"PEFT's prefix goes to the decoder: config.num_decoder_layers = {layers} decoder layers{layer_note}",
                    derived=layers == config.num_layers),
        Expectation("num_attention_heads", heads, f"config.num_heads = {heads} heads per attention layer"),
        Expectation("token_dim", heads * d_kv,
                    f"one prefix position per layer holds num_heads * d_kv = {heads} * {d_kv} = {heads * d_kv} "
                    f"values{width_note}", derived=heads * d_kv == config.d_model),
        Expectation("num_transformer_submodules", 2,
                    f"with 1, PEFT hands {name} a plain cache that each decoder layer's self- and cross-attention "
                    "share, so cross-attention attends to the prefix and to every decoder position, later ones "
                    "included (in training it sees the labels it predicts), and a padded encoder batch fails with "
                    "a shape error; with 2 the prefix reaches decoder self-attention only. Neither value gives the "
                    "encoder a prefix (for that, see fastprefix.TrainablePrefix)", fatal=False),
    ]


def expectations_for(model) -> list[Expectation]:
    if getattr(model.config, "is_encoder_decoder", False):
        return seq2seq_lm_expectations(model)
    return causal_lm_expectations(model)


def enum_value(v):
    """Enum members (PEFT's TaskType) compare and print by their value."""
    return getattr(v, "value", v)


def validate(peft_config, model) -> None:
    """Raise `PrefixConfigError` unless `peft_config` (a PEFT PrefixTuningConfig) fits `model`.

    `model` is the base transformers model (a PeftModel is unwrapped). Fields left None, which PEFT fills
    in from the model, pass where PEFT fills them in right. The error names every mismatching field with the
    value given, the model's value and where it comes from, and ends with the config to write. A config that
    runs but misleads (`num_transformer_submodules=1` on T5) gets a `PrefixConfigWarning` of the same form.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    peft_type = enum_value(getattr(peft_config, "peft_type", None))
    if peft_type != "PREFIX_TUNING":
        raise TypeError(
            f"fastprefix: expected a peft PrefixTuningConfig, got {type(peft_config).__name__} "
            f"(peft_type {peft_type!r}). fastprefix implements prefix tuning only."
        )
    found = {False: ([], []), True: ([], [])}  # warnings first: an error ends the call
    for e in expectations_for(model):
        given = enum_value(getattr(peft_config, e.field))
        if given != e.value and not (given is None and e.derived):
            mismatches, lines = found[e.fatal]
            mismatches.append((e.field, given, e.value))
            lines.append(f"  - {e.field} = {given!r}, but {e.why}. Write {e.field}={e.value!r}")
    for fatal, (mismatches, lines) in found.items():
        if not mismatches:
            continue
        fix = ", ".join(f"{field}={value!r}" for field, _, value in mismatches)
        message = (f"PrefixTuningConfig {'does not fit' if fatal else 'misleads on'} {type(model).__name__}:\n"
                   + "\n".join(lines)
                   + f"\nWrite: PrefixTuningConfig({fix}, num_virtual_tokens={peft_config.num_virtual_tokens}, ...)")
        if fatal:
            raise PrefixConfigError(message, mismatches)
        warnings.warn(message, PrefixConfigWarning, stacklevel=2)
