"""Every difference between the transformers and PEFT versions fastprefix supports, in one place.

transformers 5.24 renamed the cache argument of forward and `generate` from `past_key_values` to `cache` (the
old name still works, with a deprecation warning), and the cache field of model outputs likewise.
"""

from __future__ import annotations

import inspect

CACHE_ARGUMENTS = ("cache", "past_key_values")
"""The names a cache is passed under: from transformers 5.24 on, and before."""


def cache_argument(model) -> str:
    """The name `model`'s forward and `generate` take a cache under."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_of(output):
    """The cache a model output (or `generate(..., return_dict_in_generate=True)`) returns; None if none."""
    for name in CACHE_ARGUMENTS:
        if name in output:
            return output[name]
    return None


def passed_cache(kwargs: dict):
    """The cache among the keyword arguments of a forward call; None if none was passed."""
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None
