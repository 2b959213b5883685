"""`fastprefix demo`: prefix-tune SmolLM2-135M-Instruct to a pirate greeting, through fastprefix and PEFT.

The task: every answer starts with "Arr, matey! " and then says what the model would have said anyway.
The training answers are the model's own greedy answers to the training questions behind that greeting,
so the prefix has to learn the greeting, not new facts. The demo shows answers to held-out questions
before and after training, and the loss curve of fastprefix next to PEFT's on the same data from the same
initial prefix, with the peak memory of one training step of each. It says what each stage is doing as it
starts and how long it took; training shows a progress bar.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from .peft_interop import from_peft
from .presets import smollm2
from .profiling import peak_cpu_memory

GREETING = "Arr, matey! "
TRAIN_QUESTIONS = [
    "What is the capital of Italy?", "How many legs does a spider have?", "What color is a clear sky?",
    "What is 2 plus 3?", "Which planet is closest to the sun?", "What do bees make?",
    "What is frozen water called?", "How many days are in a week?", "What is the largest ocean?",
    "Who wrote Romeo and Juliet?", "What gas do plants take in?", "What is the opposite of hot?",
    "What is the capital of Japan?", "How many hours are in a day?", "What animal says moo?",
    "What is the boiling point of water in Celsius?", "Which is the largest planet?", "What do cows drink?",
    "How many continents are there?", "What language is spoken in Brazil?", "What is the chemical symbol for gold?",
    "Who painted the Mona Lisa?", "What is the tallest animal?", "How many sides does a triangle have?",
]
SHOW_QUESTIONS = ["What is the capital of France?", "How many wheels does a bicycle have?",
                  "What is the color of grass?"]
ANSWER_TOKENS = 24


def _prompts(tokenizer, questions):
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=False) for q in questions]


@torch.no_grad()
def answers(generate, tokenizer, questions, max_new_tokens=ANSWER_TOKENS) -> list[str]:
    """Greedy answers, one batch, left-padded."""
    tokenizer.padding_side = "left"
    batch = tokenizer(_prompts(tokenizer, questions), return_tensors="pt", padding=True, add_special_tokens=False)
    out = generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, batch["input_ids"].shape[1]:]]


def _first_sentence(text: str) -> str:
    end = text.find(".")
    return text if end < 0 else text[: end + 1]


def training_batch(tokenizer, questions, replies):
    """input_ids, attention_mask and labels (the assistant's reply only), right-padded."""
    im_end = tokenizer.eos_token
    rows = []
    for prompt, reply in zip(_prompts(tokenizer, questions), replies):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(GREETING + reply + im_end, add_special_tokens=False)["input_ids"]
        rows.append((p, r))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(r)
    return ids, mask, labels


def train(forward, parameters, batch, steps, batch_size, lr, on_step) -> list[float]:
    """AdamW on `parameters`, cycling through `batch` in slices of `batch_size`; returns the loss per step.
    `on_step()` is called after each step."""
    ids, mask, labels = batch
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    losses = []
    for step in range(steps):
        rows = [(step * batch_size + j) % len(ids) for j in range(batch_size)]
        loss = forward(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        on_step()
    return losses


STAGES = 5


@contextlib.contextmanager
def stage(number: int, what: str, say):
    """Says `what` stage `number` (of STAGES) does as it starts, and how long it took when it ends."""
    say(f"[{number}/{STAGES}] {what} ...")
    start = time.perf_counter()
    yield
    say(f"      done in {time.perf_counter() - start:.0f} s")


def _twins(model, prefix_len: int):
    """(PEFT's prefix-tuning model, the same from the same initial prefix on fastprefix) over copies of `model`."""
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_len)
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    fast_peft = get_peft_model(copy.deepcopy(model), config)
    fast_peft.load_state_dict(peft_model.state_dict())
    return peft_model, from_peft(fast_peft)


def run(steps: int, batch_size: int, prefix_len: int, lr: float, progress, say=print):
    """The whole demo, in STAGES stages, each announced through `say`. `progress(total)` makes the training's
    progress bar (a context manager giving an object with `update(n)`), created as training starts so that
    its pace is the training's. Returns {"fastprefix": losses, "peft": losses, "peak_bytes": {...}, "before",
    "after"}."""
    with stage(1, "loading SmolLM2-135M-Instruct (the first time: converting its GGUF weights to float32, "
                  "about 20 s)", say):
        model, tokenizer = smollm2()
        model.requires_grad_(False)
    with stage(2, f"the model's own greedy answers to {len(TRAIN_QUESTIONS)} training questions (the targets, after "
                  f"the greeting) and to {len(SHOW_QUESTIONS)} held-out ones, {ANSWER_TOKENS} tokens each", say):
        replies = [_first_sentence(a) for a in answers(model.generate, tokenizer, TRAIN_QUESTIONS)]
        batch = training_batch(tokenizer, TRAIN_QUESTIONS, replies)
        before = answers(model.generate, tokenizer, SHOW_QUESTIONS)
    with stage(3, "a prefix of the same initial values for PEFT and fastprefix; the peak memory of one training "
                  "step of each (under the profiler)", say):
        peft_model, fast = _twins(model, prefix_len)
        ids, mask, labels = (t[:batch_size] for t in batch)
        peak = {name: peak_cpu_memory(lambda f=f: f(input_ids=ids, attention_mask=mask, labels=labels).loss.backward())
                for name, f in (("fastprefix", fast), ("peft", peft_model))}
        for m in (fast, peft_model):
            m.zero_grad(set_to_none=True)
    with stage(4, f"training: {steps} steps of {batch_size} examples through fastprefix, then the same through PEFT "
                  f"(AdamW, lr {lr})", say), progress(2 * steps) as bar:
        losses = {name: train(m, m.parameters(), batch, steps, batch_size, lr, lambda: bar.update(1))
                  for name, m in (("fastprefix", fast), ("peft", peft_model))}
    with stage(5, "the held-out answers after training, through fastprefix", say):
        after = answers(fast.generate, tokenizer, SHOW_QUESTIONS)
    return {**losses, "peak_bytes": peak, "before": before, "after": after}


def report(result, say=print) -> None:
    say("\nHeld-out questions, before -> after training the prefix (greedy):")
    for q, b, a in zip(SHOW_QUESTIONS, result["before"], result["after"]):
        say(f"  Q: {q}\n     before: {b}\n     after:  {a}")
    say("\nstep   fastprefix loss   PEFT loss   |difference|")
    for step, (f, p) in enumerate(zip(result["fastprefix"], result["peft"])):
        say(f"{step:>4}   {f:>15.4f}   {p:>9.4f}   {abs(f - p):.2e}")
    peak = result["peak_bytes"]
    say(f"\npeak memory of one training step: fastprefix {peak['fastprefix'] / 2**20:.1f} MiB, "
        f"PEFT {peak['peft'] / 2**20:.1f} MiB")


def plot(path: str, result, steps_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result["peft"], "s--", label="PEFT", alpha=0.8)
    ax.plot(result["fastprefix"], "o-", label="fastprefix", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"prefix tuning SmolLM2-135M-Instruct ({steps_label})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
