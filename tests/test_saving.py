"""Saving and loading: `Prefix.save` / `Prefix.load` (a shared prompt computed once, reused by another process),
`TrainablePrefix.save_pretrained` / `from_pretrained` (a PEFT adapter where PEFT can express the prefix, which
plain PEFT loads with the same logits; fastprefix's own format otherwise), and the refusals: another model, a
directory that holds no prefix."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

import fastprefix
from fastprefix import PrefixConfigError
from fastprefix.testing import relative_error
from helpers.llama import VOCAB, padded_batch, tiny_model
from helpers.t5 import batch as t5_batch
from helpers.t5 import tiny_t5


def logits(model, prefix=None, **inputs):
    with torch.no_grad():
        if prefix is None:
            return model(**inputs).logits
        with fastprefix.patched(model, prefix):
            return model(**inputs).logits


@pytest.mark.parametrize("layout", ["shared", "per_row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefix_round_trip(layout, dtype, tmp_path):
    shape = (2, 5, 16) if layout == "shared" else (3, 2, 5, 16)
    keys, values = ([torch.randn(shape).to(dtype) for _ in range(4)] for _ in range(2))
    prefix = fastprefix.Prefix(keys, values, source="llama:0123456789abcdef")
    prefix.save(tmp_path / "prefix.safetensors")
    loaded = fastprefix.Prefix.load(tmp_path / "prefix.safetensors", device="cpu")
    assert loaded.source == prefix.source and loaded.dtype == dtype and loaded.shared == (layout == "shared")
    assert all(torch.equal(a, b) for a, b in zip(loaded.keys + loaded.values, keys + values))


def test_a_prompt_computed_once_is_reused_by_another_process(tmp_path):
    """from_prompt in this process, save; load in a fresh interpreter and generate: the same tokens as here."""
    torch.manual_seed(0)
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    prompt = torch.randint(1, VOCAB, (9,), generator=torch.Generator().manual_seed(1))
    fastprefix.Prefix.from_prompt(model, prompt).save(tmp_path / "prompt.safetensors")
    ids, mask = padded_batch((5, 3), 5, torch.Generator().manual_seed(2))
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")

    def generate(m, prefix):
        with fastprefix.patched(m, prefix):
            return m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)

    here = generate(model, fastprefix.Prefix.load(tmp_path / "prompt.safetensors"))
    script = textwrap.dedent(f"""
        import torch, fastprefix
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}).eval()
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        prefix = fastprefix.Prefix.load({str(tmp_path / "prompt.safetensors")!r})
        with fastprefix.patched(model, prefix):
            out = model.generate(input_ids=inputs["ids"], attention_mask=inputs["mask"], max_new_tokens=6,
                                 do_sample=False, pad_token_id=0)
        print(out.tolist())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == here.tolist()


def test_a_prefix_for_another_model_is_refused_and_the_model_left_as_it_was(tmp_path):
    model = tiny_model()
    prompt = torch.randint(1, VOCAB, (6,))
    fastprefix.Prefix.from_prompt(model, prompt).save(tmp_path / "prompt.safetensors")
    prefix = fastprefix.Prefix.load(tmp_path / "prompt.safetensors")
    others = {"layer count": tiny_model(layers=3), "KV heads": tiny_model(kv_heads=1),
              "head dim": tiny_model(hidden=32), "dtype": tiny_model().to(torch.bfloat16),
              "config": tiny_model(vocab=VOCAB + 1)}
    for what, other in others.items():
        with pytest.raises(ValueError) as info:
            fastprefix.patch(other, prefix)
        assert other.config._attn_implementation == "sdpa", what
        message = str(info.value)
        assert ("signature" in message) if what == "config" else ("fastprefix: the prefix" in message), message
    with fastprefix.patched(model, prefix):  # the model it came from takes it
        model(input_ids=prompt[None])


def test_load_refuses_a_file_that_is_not_a_prefix(tmp_path):
    peft_model = get_peft_model(tiny_model(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a prefix written by Prefix.save.*PEFT adapter"):
        fastprefix.Prefix.load(tmp_path / "adapter_model.safetensors")


def test_trainable_prefix_of_a_causal_lm_saves_as_a_peft_adapter(tmp_path):
    model = tiny_model()
    trainable = fastprefix.TrainablePrefix(model, length=4)
    trainable.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    ids, mask = padded_batch((6, 4), 6, torch.Generator().manual_seed(0))
    expected = logits(model, trainable.prefix(), input_ids=ids, attention_mask=mask)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert relative_error(logits(peft_model, input_ids=ids, attention_mask=mask), expected) < 1e-5
    loaded = fastprefix.TrainablePrefix.from_pretrained(tmp_path, model)
    assert torch.equal(logits(model, loaded.prefix(), input_ids=ids, attention_mask=mask), expected)


@pytest.mark.parametrize("kinds, layers, peft_format", [
    (("decoder", "encoder", "cross"), 2, False),  # PEFT has no encoder or cross-attention prefix
    (("decoder",), 3, True),                      # decoder layer l reads PEFT's slots of layer 2l mod 3: all distinct
    (("decoder",), 2, False),                     # 2l mod 2: both layers would read layer 0's slots
])
def test_trainable_prefix_of_t5(kinds, layers, peft_format, tmp_path):
    model = tiny_t5(num_layers=layers, dropout_rate=0.0)
    trainable = fastprefix.TrainablePrefix(model, length=3, kinds=kinds)
    trainable.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() == peft_format
    inputs = t5_batch(torch.Generator().manual_seed(5))
    expected = logits(model, trainable.prefix(), **inputs)
    loaded = fastprefix.TrainablePrefix.from_pretrained(tmp_path, model)
    assert set(loaded.prefix()) == set(kinds)
    assert torch.equal(logits(model, loaded.prefix(), **inputs), expected)
    if peft_format:
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
        assert relative_error(logits(peft_model, **inputs), expected) < 1e-5


def test_from_pretrained_refusals(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="holds neither a PEFT prefix-tuning adapter"):
        fastprefix.TrainablePrefix.from_pretrained(tmp_path, model)
    fastprefix.TrainablePrefix(model, length=4).save_pretrained(tmp_path / "llama")
    with pytest.raises(PrefixConfigError, match="num_layers"):
        fastprefix.TrainablePrefix.from_pretrained(tmp_path / "llama", tiny_model(layers=3))
    t5 = tiny_t5()
    fastprefix.TrainablePrefix(t5, length=3).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="trained on a model of signature t5:"):
        fastprefix.TrainablePrefix.from_pretrained(tmp_path / "t5", tiny_t5(d_kv=8))
    projected = get_peft_model(tiny_model(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                prefix_projection=True, encoder_hidden_size=8))
    projected.save_pretrained(tmp_path / "projected")
    with pytest.raises(ValueError, match="projects its prefix through an MLP.*from_peft"):
        fastprefix.TrainablePrefix.from_pretrained(tmp_path / "projected", tiny_model())
