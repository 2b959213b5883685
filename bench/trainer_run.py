"""A transformers `Trainer` run of prefix tuning on SmolLM2-135M-Instruct (CPU): fastprefix.from_peft vs PEFT.

Run: python bench/trainer_run.py [--steps 10] [--repeats 3] [--prefix 20]

Both runs start from the same prefix and train on the same data with the same arguments: the demo's 24
chat-formatted training questions, each followed by itself as the reply (a stand-in of the same length for
the demo's answers; only the shapes matter here), right-padded to the batch's longest row, 4 rows per device
batch, 2 accumulation steps, AdamW. Reported per variant:

* time: CPU time of the process over `trainer.train()` (one thread, `time.process_time`, so other jobs on a
  shared machine cannot stretch it), median over the repeats, which alternate fastprefix and PEFT;
* peak memory: CPU memory allocated during a 2-step `trainer.train()` and not yet freed (fastprefix.profiling,
  in a separate run, so the profiler costs no time above);
* the last step's loss, which must agree (the tests check the whole curve).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
import transformers
from peft import PrefixTuningConfig, get_peft_model
from transformers import PrinterCallback, Trainer, TrainingArguments

import fastprefix
from fastprefix.demo import TRAIN_QUESTIONS, training_batch
from fastprefix.presets import smollm2
from fastprefix.profiling import peak_cpu_memory


def dataset(tokenizer):
    ids, mask, labels = training_batch(tokenizer, TRAIN_QUESTIONS, TRAIN_QUESTIONS)
    return [dict(input_ids=i, attention_mask=m, labels=l) for i, m, l in zip(ids, mask, labels)]


def train(model, data, steps) -> tuple[float, float]:
    """(CPU seconds of trainer.train(), the last step's loss)."""
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                 max_steps=steps, learning_rate=3e-2, logging_steps=1, save_strategy="no",
                                 report_to=[], seed=0, use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.remove_callback(PrinterCallback)
        start = time.process_time()
        trainer.train()
        seconds = time.process_time() - start
    return seconds, [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefix", type=int, default=20, help="P, the number of virtual tokens")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    base, tokenizer = smollm2()
    data = dataset(tokenizer)
    torch.manual_seed(0)
    start = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                   num_virtual_tokens=args.prefix))
    variants = {"fastprefix": lambda: fastprefix.from_peft(copy.deepcopy(start)), "peft": lambda: copy.deepcopy(start)}
    times = {name: [] for name in variants}
    last = {}
    for _ in range(args.repeats):
        for name, make in variants.items():
            seconds, last[name] = train(make(), data, args.steps)
            times[name].append(seconds)
    peak = {name: peak_cpu_memory(lambda make=make: train(make(), data, 2)) for name, make in variants.items()}
    print(f"SmolLM2-135M-Instruct, P = {args.prefix}, {args.steps} optimizer steps of 2 x 4 rows, "
          f"{args.repeats} repeats, torch {torch.__version__}, transformers {transformers.__version__}\n")
    print("| variant | CPU s per run (median) | runs | s per step | peak MiB (2 steps) | last loss |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        median = statistics.median(times[name])
        print(f"| {name} | {median:.1f} | {', '.join(f'{t:.1f}' for t in times[name])} | "
              f"{median / args.steps:.2f} | {peak[name] / 2**20:.0f} | {last[name]:.4f} |")
    print(f"\nfastprefix / PEFT time: {statistics.median(times['fastprefix']) / statistics.median(times['peft']):.2f}")


if __name__ == "__main__":
    main()
