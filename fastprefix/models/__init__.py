"""The model families fastprefix can patch, and the registry `model_type -> Family`.

A new family is a module here that builds a `base.Family` (see `llama.py`, `t5.py`) and one entry in
FAMILIES; `tests/test_patching.py` patches, runs and unpatches every registered model type.
"""

from __future__ import annotations

import hashlib
import json

from . import llama, t5
from .base import Family

ATTN_IMPLEMENTATION = "fastprefix"
"""The name patched models' configs give transformers' AttentionInterface."""

FAMILIES: tuple[Family, ...] = (llama.FAMILY, t5.FAMILY)
REGISTRY: dict[str, Family] = {model_type: family for family in FAMILIES for model_type in family.model_types}


def supported_families() -> str:
    return "; ".join(f"{f.name} (model_type {', '.join(f.model_types)})" for f in FAMILIES)


def family_of(model) -> Family:
    """The registered family of a transformers model, or a TypeError listing the supported ones."""
    # transformers is imported on first use, so that `import fastprefix` costs no more than torch.
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        hint = (" For a PEFT model use fastprefix.from_peft(peft_model)."
                if hasattr(model, "get_base_model") else "")
        raise TypeError(
            f"fastprefix: expected a transformers PreTrainedModel, got {type(model).__name__}.{hint} "
            f"Supported families: {supported_families()}."
        )
    model_type = getattr(model.config, "model_type", None)
    if model_type not in REGISTRY:
        raise TypeError(
            f"fastprefix: {type(model).__name__} (model_type {model_type!r}) is not supported. "
            f"Supported families: {supported_families()}."
        )
    return REGISTRY[model_type]


_UNSIGNED = {"architectures", "transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions",
             "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type"}
"""Config entries that do not change what a model computes from its weights (run-time switches, labels,
provenance); entries starting with "_" are left out too."""


def signature(model) -> str:
    """"<model_type>:<16 hex digits>" of a model's config, without run-time switches: two models with equal
    signatures compute keys and values the same way from the same weights (patching changes no signature)."""
    config = {key: value for key, value in model.config.to_dict().items()
              if not key.startswith("_") and key not in _UNSIGNED}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return f"{model.config.model_type}:{digest[:16]}"
