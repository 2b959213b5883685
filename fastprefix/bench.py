"""`fastprefix bench`: prefix tuning (LLaMA, T5) through fastprefix, PEFT and no prefix, generation over a
shared prompt (LLaMA family), and an op-level sweep, in one run.

Every workload runs its variants on the same inputs, in one process, and reports the median wall time and its
spread (interquartile range, min and max over the timed runs), tokens per second, peak memory allocated
during one call, the time ratio to the workload's baseline variant
(PEFT's; for the shared prompt, the prompt's cache copied to every row), and whether the outputs matched
the workload's oracle (prefix tuning: PEFT's loss and prefix gradients, and the greedy tokens PEFT's forward
implies, since PEFT's own `generate` drops the prefix on some transformers versions; shared prompt: plain
transformers on each row's [prompt ; suffix]). The attention sweep runs one attention layer shaped as the
(first) model's. How many runs are timed is budgeted by time (`timing.plan_repeats`) unless fixed.
"""

from __future__ import annotations

import copy
import pathlib
from dataclasses import dataclass, field
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
from .timing import BUDGET_SECONDS, Load, Timing, plan_repeats, time_runs

NEW_TOKENS = 16
SHARED_PROMPT_LEN, SUFFIX_LEN = 512, 16
SWEEP_PREFIX_LENS = (16, 64, 256)
SWEEP_BATCHES = (1, 4, 16)


@dataclass
class Settings:
    """What the bench was asked for. `repeats` None: as many timed runs per variant as fit `budget_seconds`."""

    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 4
    prefix_len: int = 20
    seq_len: int = 128
    repeats: int | None = None
    budget_seconds: float = float(BUDGET_SECONDS)


@dataclass(frozen=True)
class AttentionShape:
    """The attention sweep's layer: query heads, key/value heads, head dim."""

    q_heads: int
    kv_heads: int
    head_dim: int

    def __str__(self) -> str:
        return f"Hq={self.q_heads} Hkv={self.kv_heads} D={self.head_dim}"


@dataclass
class Row:
    """One variant of one workload: `times` of its timed runs, `seconds` their median. `matched` is None where
    there is nothing to compare (no prefix)."""

    workload: str
    variant: str
    times: list[float]
    tokens: int
    peak_bytes: int
    matched: bool | None
    baseline: str = "peft"
    ratio_to_baseline: float | None = None

    @property
    def timing(self) -> Timing:
        return Timing(self.times)

    @property
    def seconds(self) -> float:
        return self.timing.median

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


def _synchronizer(device: torch.device):
    """What makes a timer wait for `device`'s queued work: a GPU's synchronize; nothing on a CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


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


def model_name(model, s: Settings) -> str:
    """What the table's workloads call `model`: its model_type for the tiny presets (which hold one model of each
    type), else the preset's name or the model directory's name."""
    return model.config.model_type if s.model.startswith("tiny") else pathlib.Path(s.model).name


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
    name = model_name(base, s)
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
        return lambda: model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                      max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

    generation = Workload(f"{name} generate ({NEW_TOKENS} new tokens)", s.batch * NEW_TOKENS,
                          {v: generate(m) for v, m in models.items()})
    with torch.no_grad():
        oracle = greedy_by_forward(peft_model, prompts, NEW_TOKENS,
                                   base.config.decoder_start_token_id if seq2seq else None)
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
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
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
    workload = Workload(f"{model_name(model, s)} generate, shared {SHARED_PROMPT_LEN}-token prompt",
                        s.batch * NEW_TOKENS, {v: (lambda run=run: run()[0]) for v, run in providers.items()},
                        baseline="copied cache")
    oracle = workload.variants["concat rows"]()
    workload.matched = {v: torch.equal(workload.variants[v](), oracle) for v in ("fastprefix", "copied cache")}
    workload.matched["concat rows"] = True  # the oracle: plain transformers on each row's [prompt ; suffix]
    return workload


def attention_shape(model) -> AttentionShape:
    """The shape of `model`'s (first kind of) attention: query heads, key/value heads and head dim."""
    from .models import family_of

    geometry = next(iter(family_of(model).geometry(model).values()))
    return AttentionShape(model.config.num_attention_heads, geometry.num_kv_heads, geometry.head_dim)


def op_workload(batch: int, prefix_len: int, s: Settings, shape: AttentionShape) -> Workload:
    """Forward + backward of one attention layer of `shape` (causal sequence part): prefix_attention vs the
    prefix copied per row and concatenated, key/value heads repeated to the query heads (as transformers does
    before SDPA), then SDPA."""
    device, dtype = torch.device(s.device), getattr(torch, s.dtype)
    gen = torch.Generator().manual_seed(batch * 1000 + prefix_len)
    B, N, Hkv, D = batch, s.seq_len, shape.kv_heads, shape.head_dim
    shapes = [(B, shape.q_heads, N, D), (B, Hkv, N, D), (B, Hkv, N, D), (Hkv, prefix_len, D), (Hkv, prefix_len, D)]
    tensors = [torch.randn(size, generator=gen).to(device, dtype).requires_grad_() for size in shapes]
    dout = torch.randn(shapes[0], generator=gen).to(device, dtype)
    mask = torch.ones(s.seq_len, prefix_len + s.seq_len, dtype=torch.bool, device=device).tril(prefix_len)
    group = shape.q_heads // shape.kv_heads

    def fused():
        return prefix_attention(*tensors, causal=True)

    def concat():
        q, k, v, pk, pv = tensors
        rows = (batch, -1, -1, -1)
        keys, values = (torch.cat([p.expand(rows), x], 2).repeat_interleave(group, 1) for p, x in ((pk, k), (pv, v)))
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

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


def _warm_up(calls: dict, synchronize, progress) -> dict:
    """(workload, variant) -> the seconds of one untimed-for-the-table run of each call."""
    progress.reset(total=len(calls))
    one_run = {}
    for key, fn in calls.items():
        progress.set_description("warm-up, one run each: " + ": ".join(key))
        one_run[key] = time_runs(fn, 1, synchronize).times[0]
        progress.update(1)
    return one_run


def measure(workloads: list[Workload], s: Settings, progress, load: Load) -> list[Row]:
    """Time and peak memory of every variant, and time ratios to each workload's baseline variant.

    One warm-up run of every variant first; then each variant's timed runs (`s.repeats`, or as many as
    `plan_repeats` fits in `s.budget_seconds` from the warm-up's times) and one profiled run for its peak
    memory. `progress` counts variants during the warm-up, then the plan's estimated seconds, so that its
    remaining time is the plan's, scaled by the pace so far. `load` is sampled after every workload."""
    device = torch.device(s.device)
    synchronize = _synchronizer(device)
    calls = {(w.name, variant): fn for w in workloads for variant, fn in w.variants.items()}
    one_run = _warm_up(calls, synchronize, progress)
    plan = {key: s.repeats for key in calls} if s.repeats else plan_repeats(one_run, s.budget_seconds)
    progress.reset(total=sum((plan[key] + 1) * one_run[key] for key in calls))
    rows = []
    for w in workloads:
        for variant, fn in w.variants.items():
            key = (w.name, variant)
            progress.set_description(f"{w.name}: {variant}, {plan[key]} timed runs")
            timing = time_runs(fn, plan[key], synchronize)
            rows.append(Row(w.name, variant, timing.times, w.tokens, _peak_bytes(fn, device), w.matched.get(variant),
                            w.baseline))
            progress.update((plan[key] + 1) * one_run[key])
        load.sample()
    for w in workloads:
        base = next(r for r in rows if r.workload == w.name and r.variant == w.baseline)
        for r in rows:
            if r.workload == w.name:
                r.ratio_to_baseline = r.seconds / base.seconds
    return rows
