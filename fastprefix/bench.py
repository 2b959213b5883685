"""`fastprefix bench`: prefix tuning (LLaMA, T5) through fastprefix, PEFT and no prefix, generation over a
shared prompt (LLaMA family), and an op-level sweep, in one run.

Every workload runs its variants on the same inputs, in one process, and reports the median wall time,
tokens per second, peak memory allocated during one call, the time ratio to the workload's baseline variant
(PEFT's; for the shared prompt, the prompt's cache copied to every row), and whether the outputs matched
the workload's oracle (prefix tuning: PEFT's loss and prefix gradients, and the greedy tokens PEFT's forward
implies, since PEFT's own `generate` drops the prefix on some transformers versions; shared prompt: plain
transformers on each row's [prompt ; suffix]).
"""

from __future__ import annotations

import copy
import datetime
import json
import statistics
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .compat import cache_argument, cache_of
from .ops import prefix_attention
from .patching import patched
from .peft_interop import from_peft
from .prefix import Prefix
from .profiling import peak_cpu_memory
from .testing import greedy_by_forward, relative_error

NEW_TOKENS = 16
SHARED_PROMPT_LEN, SUFFIX_LEN = 512, 16
OP_HEADS, OP_HEAD_DIM = 8, 64
SWEEP_PREFIX_LENS = (16, 64, 256)
SWEEP_BATCHES = (1, 4, 16)


@dataclass
class Settings:
    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 4
    prefix_len: int = 20
    seq_len: int = 128
    repeats: int = 11


@dataclass
class Row:
    """One variant of one workload. `matched` is None where there is nothing to compare (no prefix)."""

    workload: str
    variant: str
    seconds: float
    tokens: int
    peak_bytes: int
    matched: bool | None
    baseline: str = "peft"
    ratio_to_baseline: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Workload:
    """`baseline`: the variant the others' times are divided by. `notes`: what a reader of the table needs to
    know about a mismatch that is not fastprefix's."""

    name: str
    tokens: int
    variants: dict[str, Callable[[], object]]
    matched: dict[str, bool | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    baseline: str = "peft"


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def _peak_bytes(fn, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return peak_cpu_memory(fn)


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _loss_and_grads(model, peft_model, inputs: dict) -> list[torch.Tensor]:
    """[loss, the gradient of every trainable parameter of `peft_model`] after one forward + backward of `model`."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return [loss.detach(), *(p.grad.clone() for p in peft_model.parameters() if p.requires_grad)]


def _same_training_step(fast, peft_model, inputs: dict, tol: float) -> bool:
    """Whether fastprefix's loss and prompt-encoder gradients equal PEFT's: within `tol` relative, or, when
    not, no farther from a float64 run of PEFT than twice PEFT's own rounding error (deep models: PEFT's
    float32 gradients can be 1e-4 away from the exact ones while fastprefix's are closer)."""
    ours, theirs = _loss_and_grads(fast, fast.peft_model, inputs), _loss_and_grads(peft_model, peft_model, inputs)
    if all(relative_error(a, b) < tol for a, b in zip(ours, theirs)):
        return True
    exact_model = copy.deepcopy(peft_model).double()
    exact = _loss_and_grads(exact_model, exact_model, inputs)
    return all(relative_error(a.double(), x) <= max(tol, 2 * relative_error(b.double(), x))
               for a, b, x in zip(ours, theirs, exact))


def model_workloads(base: torch.nn.Module, s: Settings) -> list[Workload]:
    """Prefix-tuning train step and greedy generation of a causal LM (LLaMA family) or a seq2seq LM (T5):
    fastprefix (`from_peft`) vs PEFT vs the model without a prefix, on the same weights and inputs; for a
    causal LM, generation over a shared prompt too."""
    from peft import PrefixTuningConfig, get_peft_model

    device, dtype = torch.device(s.device), getattr(torch, s.dtype)
    base = base.to(device, dtype)
    seq2seq = base.config.is_encoder_decoder
    config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM", num_virtual_tokens=s.prefix_len)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    fast = from_peft(get_peft_model(copy.deepcopy(base), config))
    fast.peft_model.load_state_dict(peft_model.state_dict())
    base.requires_grad_(False)
    models = {"fastprefix": fast, "peft": peft_model, "no prefix": base}
    name = base.config.model_type
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size

    ids = torch.randint(1, vocab, (s.batch, s.seq_len), generator=gen).to(device)
    # A seq2seq model reads ids and is trained on targets of the same length; a causal LM on ids themselves.
    labels = torch.randint(1, vocab, (s.batch, s.seq_len), generator=gen).to(device) if seq2seq else ids
    inputs = {v: dict(input_ids=ids, labels=labels) for v in models}
    # The floor back-propagates to the activations a prefix needs, from a leaf at the embeddings: the decoder's
    # alone for seq2seq (PEFT's prefix is in decoder self-attention), every layer's for a causal LM.
    embed = base.get_input_embeddings()
    if seq2seq:
        inputs["no prefix"]["decoder_inputs_embeds"] = embed(base._shift_right(labels)).detach().requires_grad_()
    else:
        inputs["no prefix"] = dict(inputs_embeds=embed(ids).detach().requires_grad_(), labels=labels)

    def train_step(variant):
        def step():
            models[variant].zero_grad(set_to_none=True)
            models[variant](**inputs[variant]).loss.backward()
        return step

    train_tokens = s.batch * s.seq_len * (2 if seq2seq else 1)
    train = Workload(f"{name} train step", train_tokens, {v: train_step(v) for v in models})
    same = _same_training_step(fast, peft_model, inputs["peft"], _tolerance(dtype))
    train.matched = {"fastprefix": same, "peft": True, "no prefix": None}

    prompts = torch.randint(1, vocab, (s.batch, s.seq_len), generator=gen).to(device)
    # generate returns the prompt then the new tokens (causal LM), or the decoder start token then them (seq2seq)
    first_new = 1 if seq2seq else s.seq_len

    def generate(model):
        return lambda: _quiet(model.generate, input_ids=prompts, attention_mask=torch.ones_like(prompts),
                              max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

    generation = Workload(f"{name} generate ({NEW_TOKENS} new tokens)", s.batch * NEW_TOKENS,
                          {v: generate(m) for v, m in models.items()})
    oracle = greedy_by_forward(peft_model, prompts, NEW_TOKENS, base.config.decoder_start_token_id if seq2seq else None)
    tokens = {v: generation.variants[v]()[:, first_new:] for v in models}
    generation.matched = {v: torch.equal(tokens[v], oracle) for v in ("fastprefix", "peft")}
    generation.matched["no prefix"] = None
    if not generation.matched["peft"] and torch.equal(tokens["peft"], tokens["no prefix"]):
        generation.notes.append(f"{generation.name}: PEFT's generate returned the model's tokens without prefix (it "
                                f"ignores the prefix on this transformers version); the oracle is greedy decoding "
                                f"by PEFT's forward")
    return [train, generation] if seq2seq else [train, generation, shared_prompt_workload(base, s)]


def _generate_tokens(model, ids: torch.Tensor, new_tokens: int, **kwargs):
    """(the new tokens [B, new_tokens] of greedy generation, the cache generate returns)."""
    out = _quiet(model.generate, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                 do_sample=False, pad_token_id=0, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, -new_tokens:], cache_of(out)


def _prompt_kv_bytes(cache, prompt_len: int) -> int:
    return sum(t[:, :, :prompt_len].numel() * t.element_size() for layer in cache.layers
               for t in (layer.keys, layer.values))


def shared_prompt_providers(model, prompt: torch.Tensor, suffixes: torch.Tensor,
                            new_tokens: int) -> dict[str, Callable]:
    """Batch generation over one shared prompt [P] for the suffixes [B, n], three ways; each run() -> (new
    tokens [B, new_tokens], bytes of the prompt's keys and values held during generation):

    * "fastprefix": `Prefix.from_prompt`, then `generate` on the suffixes under `patched`; the prompt's keys
      and values are stored once, and the rows' caches hold no prompt rows (asserted);
    * "concat rows": plain `generate` on the B rows [prompt ; suffix] (the prompt computed B times);
    * "copied cache": the prompt run once, its cache repeated to B rows, then `generate` on [prompt ; suffix]
      continuing from it.
    """
    B, P = suffixes.shape[0], prompt.shape[0]
    rows = torch.cat([prompt.expand(B, -1), suffixes], dim=1)

    def fastprefix_run():
        prefix = Prefix.from_prompt(model, prompt)
        with patched(model, prefix):
            tokens, cache = _generate_tokens(model, suffixes, new_tokens)
        assert all(layer.keys.shape[-2] == suffixes.shape[1] + new_tokens - 1 for layer in cache.layers)
        return tokens, sum(t.numel() * t.element_size() for t in prefix.keys + prefix.values)

    def concat_rows():
        tokens, cache = _generate_tokens(model, rows, new_tokens)
        return tokens, _prompt_kv_bytes(cache, P)

    def copied_cache():
        with torch.no_grad():
            cache = cache_of(model.base_model(input_ids=prompt[None], use_cache=True))
        cache.batch_repeat_interleave(B)
        tokens, cache = _generate_tokens(model, rows, new_tokens, **{cache_argument(model): cache})
        return tokens, _prompt_kv_bytes(cache, P)

    return {"fastprefix": fastprefix_run, "copied cache": copied_cache, "concat rows": concat_rows}


def shared_prompt_workload(model: torch.nn.Module, s: Settings) -> Workload:
    """Greedy generation for `s.batch` suffixes of SUFFIX_LEN tokens sharing a SHARED_PROMPT_LEN-token prompt:
    fastprefix vs the prompt's cache copied to every row (the baseline) vs the prompt recomputed per row."""
    device = torch.device(s.device)
    model = model.to(device, getattr(torch, s.dtype))
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (SHARED_PROMPT_LEN,), generator=gen).to(device)
    suffixes = torch.randint(3, vocab, (s.batch, SUFFIX_LEN), generator=gen).to(device)
    providers = shared_prompt_providers(model, prompt, suffixes, NEW_TOKENS)
    workload = Workload(f"{model.config.model_type} generate, shared {SHARED_PROMPT_LEN}-token prompt",
                        s.batch * NEW_TOKENS, {v: (lambda run=run: run()[0]) for v, run in providers.items()},
                        baseline="copied cache")
    oracle = workload.variants["concat rows"]()
    workload.matched = {v: torch.equal(workload.variants[v](), oracle) for v in ("fastprefix", "copied cache")}
    workload.matched["concat rows"] = True  # the oracle: plain transformers on each row's [prompt ; suffix]
    return workload


def op_workload(batch: int, prefix_len: int, s: Settings) -> Workload:
    """Forward + backward of one attention layer (causal sequence part, H = 8, D = 64): prefix_attention vs
    concatenation + SDPA."""
    device, dtype = torch.device(s.device), getattr(torch, s.dtype)
    gen = torch.Generator().manual_seed(batch * 1000 + prefix_len)
    shapes = [(batch, OP_HEADS, s.seq_len, OP_HEAD_DIM)] * 3 + [(OP_HEADS, prefix_len, OP_HEAD_DIM)] * 2
    tensors = [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for shape in shapes]
    dout = torch.randn(shapes[0], generator=gen).to(device, dtype)
    mask = torch.ones(s.seq_len, prefix_len + s.seq_len, dtype=torch.bool, device=device).tril(prefix_len)

    def fused():
        return prefix_attention(*tensors, causal=True)

    def concat():
        q, k, v, pk, pv = tensors
        rows = (batch, -1, -1, -1)
        return F.scaled_dot_product_attention(q, torch.cat([pk.expand(rows), k], 2), torch.cat([pv.expand(rows), v], 2),
                                              attn_mask=mask)

    def step(attention):
        return lambda: torch.autograd.grad(attention(), tensors, dout)

    workload = Workload(f"attention fwd+bwd B={batch} P={prefix_len}", batch * s.seq_len,
                        {"fastprefix": step(fused), "peft": step(concat)})
    with torch.no_grad():
        ok = relative_error(fused(), concat()) < _tolerance(dtype)
    workload.matched = {"fastprefix": ok, "peft": True}
    return workload


def sweep_points(s: Settings) -> list[tuple[int, int]]:
    """(batch, prefix_len) pairs: prefix lengths at the chosen batch, then batches at the chosen prefix."""
    points = [(s.batch, p) for p in SWEEP_PREFIX_LENS] + [(b, s.prefix_len) for b in SWEEP_BATCHES]
    return list(dict.fromkeys(points))


def measure(workloads: list[Workload], s: Settings, progress) -> list[Row]:
    """Time and peak memory of every variant; time ratios to each workload's baseline variant."""
    device = torch.device(s.device)
    rows = []
    for w in workloads:
        for variant, fn in w.variants.items():
            progress.set_description(f"{w.name}: {variant}")
            seconds = _median_seconds(fn, s.repeats, device)
            rows.append(Row(w.name, variant, seconds, w.tokens, _peak_bytes(fn, device), w.matched.get(variant),
                            w.baseline))
            progress.update(1)
        base = next(r for r in rows if r.workload == w.name and r.variant == w.baseline)
        for r in rows:
            if r.workload == w.name:
                r.ratio_to_baseline = r.seconds / base.seconds
    return rows


def format_table(rows: list[Row], notes: list[str] = ()) -> str:
    header = (f"{'workload':<42}{'variant':<14}{'time (ms)':>11}{'tokens/s':>11}{'peak MiB':>10}{'vs base':>9}"
              "  matched")
    lines = [header, "-" * len(header)]
    for r in rows:
        matched = "-" if r.matched is None else ("yes" if r.matched else "NO")
        lines.append(f"{r.workload:<42}{r.variant:<14}{r.seconds * 1e3:>11.1f}{r.tokens_per_second:>11.0f}"
                     f"{r.peak_bytes / 2**20:>10.1f}{r.ratio_to_baseline:>8.2f}x  {matched}")
    legend = ("vs base: time over the workload's baseline: PEFT (\"peft\"; in the attention sweep, the prefix copied\n"
              "per row and concatenated), or for the shared prompt, the prompt's cache copied to every row")
    return "\n".join(lines + [legend] + [f"note: {note}" for note in notes])


def environment(s: Settings) -> dict:
    import importlib.metadata as md

    versions = {}
    for package in ("fastprefix", "torch", "triton", "transformers", "peft"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=__file__.rsplit("/", 2)[0], check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    device = torch.device(s.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": name, "commit": commit,
            "versions": versions}


def write_json(path: str, rows: list[Row], s: Settings, notes: list[str] = ()) -> None:
    with open(path, "w") as f:
        json.dump({"environment": environment(s), "settings": asdict(s), "notes": list(notes),
                   "rows": [asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in rows]}, f, indent=2)


def plot(path: str, rows: list[Row], s: Settings) -> None:
    """Time and peak memory of the attention sweep vs prefix length and vs batch size, fastprefix vs PEFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in rows if r.workload.startswith("attention")]

    def point(r):
        batch, prefix = (int(part.split("=")[1]) for part in r.workload.split()[-2:])
        return batch, prefix

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (label, fixed, varying) in enumerate((("prefix length P", lambda b, p: b == s.batch, 1),
                                                  ("batch size B", lambda b, p: p == s.prefix_len, 0))):
        for variant, style in (("fastprefix", "o-"), ("peft", "s--")):
            pts = sorted((point(r)[varying], r) for r in sweep if r.variant == variant and fixed(*point(r)))
            xs = [x for x, _ in pts]
            axes[0][col].plot(xs, [r.seconds * 1e3 for _, r in pts], style, label=variant)
            axes[1][col].plot(xs, [r.peak_bytes / 2**20 for _, r in pts], style, label=variant)
        for row, ylabel in ((0, "time (ms, median)"), (1, "peak memory (MiB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"attention forward+backward, causal, N=S={s.seq_len}, H={OP_HEADS}, D={OP_HEAD_DIM}, {s.dtype}, "
                 f"{s.device} (left: B={s.batch}; right: P={s.prefix_len})\n"
                 "peft = the prefix copied per row, concatenated, then scaled_dot_product_attention")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
