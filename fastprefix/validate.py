"""`validate(peft_config, model)`: does a PEFT prefix-tuning config fit the model? If not, say what to write.

Each model kind states what it expects of the config as a list of `Expectation`s (field, value, where the
value comes from); `validate` compares them all and reports every mismatch at once. Decoder-only models
are covered here; an encoder-decoder kind adds its own list to `expectations_for`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .patching import family_of


class PrefixConfigError(ValueError):
    """A PEFT prefix-tuning config that does not fit its model. `mismatches` holds (field, given, expected)."""

    def __init__(self, message: str, mismatches: list[tuple[str, object, object]]):
        super().__init__(message)
        self.mismatches = mismatches


@dataclass(frozen=True)
class Expectation:
    """The model needs `field` == `value`; `why` says where that value comes from. With `derived`, None also
    passes: PEFT fills the field in from the model config, correctly for this model kind."""

    field: str
    value: object
    why: str
    derived: bool = True


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


def expectations_for(model) -> list[Expectation]:
    return causal_lm_expectations(model)


def _value(v):
    """Enum members (PEFT's TaskType) compare and print by their value."""
    return getattr(v, "value", v)


def validate(peft_config, model) -> None:
    """Raise `PrefixConfigError` unless `peft_config` (a PEFT PrefixTuningConfig) fits `model`.

    `model` is the base transformers model (a PeftModel is unwrapped). Fields left None, which PEFT fills
    in from the model, pass. The error names every mismatching field with the value given, the model's
    value and where it comes from, and ends with the config to write.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    peft_type = _value(getattr(peft_config, "peft_type", None))
    if peft_type != "PREFIX_TUNING":
        raise TypeError(
            f"fastprefix: expected a peft PrefixTuningConfig, got {type(peft_config).__name__} "
            f"(peft_type {peft_type!r}). fastprefix implements prefix tuning only."
        )
    mismatches, lines = [], []
    for e in expectations_for(model):
        given = _value(getattr(peft_config, e.field))
        if given != e.value and not (given is None and e.derived):
            mismatches.append((e.field, given, e.value))
            lines.append(f"  - {e.field} = {given!r}, but {e.why}. Write {e.field}={e.value!r}")
    if mismatches:
        fix = ", ".join(f"{field}={value!r}" for field, _, value in mismatches)
        raise PrefixConfigError(
            f"PrefixTuningConfig does not fit {type(model).__name__}:\n" + "\n".join(lines)
            + f"\nWrite: PrefixTuningConfig({fix}, num_virtual_tokens={peft_config.num_virtual_tokens}, ...)",
            mismatches,
        )
