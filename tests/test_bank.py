"""A prefix bank read by row index (`PrefixBank`, `bank.rows(index)`, `bank_prefix_attention`): the op against
the float64 oracle on each row's own [entry ; sequence], a patched tiny LLaMA against plain transformers on each
row's [prompt ; suffix] alone, each entry's training gradient against its rows run separately, no prefix copied
per row, and every bad input refused with what to do about it, leaving the model usable."""

import warnings

import pytest
import torch

import fastprefix
from fastprefix import bank_attention
from fastprefix.compat import cache_of
from fastprefix.ops import bank_prefix_attention
from fastprefix.presets import tiny_llama, tiny_t5
from fastprefix.segment_attention import Explicit, FlashCPU
from fastprefix.testing import AllocationRecorder, compare, materialization_violations, relative_error
from helpers.bank import bank_oracle
from helpers.llama import padded_batch, tiny_model
from helpers.t5 import random_prefix as t5_random_prefix

NEG_INF = float("-inf")

# ---------------------------------------------------------------------------------------------------- the op

B, HQ, HKV, D = 6, 4, 2, 8
LENGTHS = (5, 0, 9, 3, 6)  # entry 1 is empty; entry 4 is read by no row
INDEX = (2, 0, 2, 3, 1, 2)  # entry 2 three times, row 4 reads the empty entry


def bank_inputs(N, S, dtype, generator):
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    q, k, v = randn(B, HQ, N, D), randn(B, HKV, S, D), randn(B, HKV, S, D)
    bank_k = [randn(HKV, P, D) for P in LENGTHS]
    bank_v = [randn(HKV, P, D) for P in LENGTHS]
    return q, k, v, bank_k, bank_v


MASKS = {  # name -> (N, S, causal, mask [B, 1, N or 1, S] or None)
    "none": (5, 7, False, None),
    # row 4 (empty entry) fully padded: it sees nothing at all; row 1 padded by 3
    "left padding": (5, 7, False, torch.arange(7) >= torch.tensor([0, 3, 0, 0, 7, 1])[:, None]),
    "causal square, padded": (6, 6, True, torch.arange(6) >= torch.tensor([0, 2, 0, 5, 6, 0])[:, None]),
    "causal N < S": (3, 8, True, None),
    "no sequence keys": (2, 0, False, None),
}


@pytest.fixture(params=[FlashCPU, Explicit], ids=["flash", "explicit"])
def engine(request, monkeypatch):
    monkeypatch.setattr(bank_attention, "bank_engine", lambda device, dropout_p: request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masks", MASKS)
def test_op_matches_each_row_alone(masks, dtype, engine):
    """out, lse and the gradients of q, k, v and every entry against the float64 oracle, element by element
    (an entry's oracle gradient is the sum over the rows that read it; zero for an entry no row reads)."""
    N, S, causal, mask = MASKS[masks]
    mask = None if mask is None else mask[:, None, None, :]
    gen = torch.Generator().manual_seed(0)
    inputs = bank_inputs(N, S, dtype, gen)
    index = torch.tensor(INDEX)
    out, lse = bank_prefix_attention(*inputs, index, causal=causal, attn_mask=mask, return_lse=True)
    assert out.dtype == dtype and out.shape == (B, HQ, N, D) and lse.dtype == torch.float32
    flat = [inputs[0], inputs[1], inputs[2], *inputs[3], *inputs[4]]
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, flat, dout.to(dtype))

    def run_oracle(compute_dtype):
        copies = [t.detach().to(compute_dtype).requires_grad_() for t in flat]
        T = len(LENGTHS)
        o, lse_ = bank_oracle(*copies[:3], copies[3:3 + T], copies[3 + T:], index, causal, mask, compute_dtype)
        return o, lse_, torch.autograd.grad(o, copies, dout.to(compute_dtype), allow_unused=True)

    ref_out, ref_lse, ref_grads = run_oracle(torch.float64)
    same_out, same_lse, same_grads = run_oracle(dtype)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    if masks == "left padding":
        assert empty[4].all() and (out[4] == 0).all()
    comparisons = [compare("out", out, ref_out, same_out), compare("lse", lse, ref_lse, same_lse, valid=~empty)]
    names = ["dq", "dk", "dv"] + [f"d{kv}[{t}]" for kv in "kv" for t in range(len(LENGTHS))]
    for name, g, rg, sg, t in zip(names, grads, ref_grads, same_grads, flat):
        rg = torch.zeros_like(t, dtype=torch.float64) if rg is None else rg
        sg = torch.zeros_like(t) if sg is None else sg
        assert g.shape == t.shape and g.dtype == dtype, name
        comparisons.append(compare(name, g, rg, sg))
    assert all(c.ok for c in comparisons), "\n".join(str(c) for c in comparisons if not c.ok)
    assert not grads[3 + 4].any() and not grads[3 + len(LENGTHS) + 4].any()  # entry 4: read by no row


def test_op_without_gradients_computes_the_same():
    gen = torch.Generator().manual_seed(1)
    inputs = bank_inputs(4, 5, torch.float32, gen)
    index = torch.tensor(INDEX)
    with_grad = bank_prefix_attention(*inputs, index, causal=True)
    with torch.no_grad():
        without = bank_prefix_attention(*inputs, index, causal=True)
    assert torch.equal(with_grad.detach(), without)


def test_op_entry_gradient_is_the_sum_of_its_rows_computed_separately():
    """Entry t's gradient equals the sum over its rows of `prefix_attention` run on each row alone with entry t
    as a shared prefix (float64)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v, bank_k, bank_v = bank_inputs(3, 4, torch.float64, gen)
    index = torch.tensor(INDEX)
    dout = torch.randn(B, HQ, 3, D, generator=gen, dtype=torch.float64)
    out = bank_prefix_attention(q, k, v, bank_k, bank_v, index, causal=True)
    grads = torch.autograd.grad(out, bank_k + bank_v, dout)
    expected = [torch.zeros_like(t) for t in bank_k + bank_v]
    T = len(LENGTHS)
    for b, t in enumerate(INDEX):
        row = fastprefix.prefix_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], bank_k[t], bank_v[t], causal=True)
        dk, dv = torch.autograd.grad(row, (bank_k[t], bank_v[t]), dout[b:b + 1], allow_unused=True)
        expected[t] += 0 if dk is None else dk
        expected[T + t] += 0 if dv is None else dv
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ the model

PROMPTS = (9, 4, 15)
SUFFIXES = (5, 3, 7, 1, 6, 4)
ROWS = (2, 0, 1, 2, 0, 2)


@pytest.fixture(scope="module")
def setting():
    """A tiny LLaMA (GQA 8/4 heads, D = 32, 4 layers), three prompts of different lengths in a bank, six
    left-padded suffixes, the entry of each."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(1, vocab, (n,), generator=gen) for n in PROMPTS]
    bank = fastprefix.PrefixBank([fastprefix.Prefix.from_prompt(model, p) for p in prompts])
    ids, mask = padded_batch(SUFFIXES, max(SUFFIXES), gen, vocab=vocab)
    return model, prompts, bank, ids, mask


def generate(model, ids, mask=None, new_tokens=6, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0, **options)


def alone(setting, row, new_tokens=6, **options):
    """Plain transformers on row `row`'s [prompt ; suffix]: the oracle."""
    model, prompts, _, ids, _ = setting
    n = SUFFIXES[row]
    return generate(model, torch.cat([prompts[ROWS[row]], ids[row, ids.shape[1] - n:]])[None], None, new_tokens,
                    **options)


def assert_rows_match_alone(setting, rows=ROWS, new_tokens=6):
    """Batched greedy generation with `bank.rows(rows)` equals each row alone: same tokens, logits of every
    step within 1e-5 (relative); each row's cache holds its own tokens only."""
    model, prompts, bank, ids, mask = setting
    with fastprefix.patched(model, bank.rows(torch.tensor(rows))):
        batched = generate(model, ids, mask, new_tokens)
    width = ids.shape[1]
    for layer in cache_of(batched).layers:
        assert layer.keys.shape[-2] == width + new_tokens - 1
    for row in range(len(SUFFIXES)):
        expected = alone(setting, row, new_tokens)
        start = len(prompts[ROWS[row]]) + SUFFIXES[row]
        assert torch.equal(batched.sequences[row, width:], expected.sequences[0, start:]), row
        for step, (got, want) in enumerate(zip(batched.logits, expected.logits)):
            assert relative_error(got[row], want[0]) < 1e-5, (row, step)


def test_generation_matches_each_row_alone(setting):
    assert_rows_match_alone(setting)


def test_a_swapped_entry_is_caught(setting):
    """The check above fails when two rows read each other's entries (rows 0 and 1: prompts 2 and 0)."""
    swapped = (0, 2) + ROWS[2:]
    with pytest.raises(AssertionError):
        assert_rows_match_alone(setting, swapped, new_tokens=2)


def test_last_position_logits_of_a_forward(setting):
    """A plain forward, positions counted from each row's first token (as generate counts them)."""
    model, prompts, bank, ids, mask = setting
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), fastprefix.patched(model, bank.rows(torch.tensor(ROWS))):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    for row in range(len(SUFFIXES)):
        n = SUFFIXES[row]
        full = torch.cat([prompts[ROWS[row]], ids[row, ids.shape[1] - n:]])[None]
        with torch.no_grad():
            expected = model(input_ids=full).logits[0, -1]
        assert relative_error(logits[row], expected) < 1e-5, row


def test_beam_search_repeats_the_index(setting):
    """num_beams = 2, num_return_sequences = 2: the batch has each row twice in a row, and so has the index."""
    model, prompts, bank, ids, mask = setting
    rows = (1, 2)
    with fastprefix.patched(model, bank.rows(torch.tensor([ROWS[r] for r in rows]))):
        got = generate(model, ids[list(rows)], mask[list(rows)], 4, num_beams=2, num_return_sequences=2)
    for i, row in enumerate(rows):
        expected = alone(setting, row, 4, num_beams=2, num_return_sequences=2)
        start = len(prompts[ROWS[row]]) + SUFFIXES[row]
        assert torch.equal(got.sequences[2 * i:2 * i + 2, ids.shape[1]:], expected.sequences[:, start:]), row


def test_set_prefix_switches_to_bank_rows_and_back(setting):
    model, prompts, bank, ids, mask = setting
    with fastprefix.patched(model, bank[0]) as handle:
        handle.set_prefix(bank.rows(torch.tensor(ROWS)))
        batched = generate(model, ids, mask, 3)
        handle.set_prefix(bank[ROWS[0]])
        first = generate(model, ids[:1], mask[:1], 3)
    assert torch.equal(batched.sequences[0], first.sequences[0])
    expected = alone(setting, 0, 3)
    assert torch.equal(batched.sequences[0, ids.shape[1]:], expected.sequences[0, -3:])


# --------------------------------------------------------------------------------------------------- training

def test_entry_gradients_equal_their_rows_run_separately():
    """A bank of trainable prefixes (leaf tensors, P = 3, 6, 2); a loss over a batch of 5 rows. Each entry's
    gradient equals the sum of the gradients of its rows, each run alone with that entry as a plain shared
    prefix; so do the model's weights' gradients (entry 1 is read by no row: zero gradient)."""
    model = tiny_model(heads=4, kv_heads=2, hidden=32, layers=2)
    gen = torch.Generator().manual_seed(3)
    geometry = (2, 2, 8)  # layers, Hkv, D

    def trainable(P):
        make = lambda: [torch.randn(geometry[1], P, geometry[2], generator=gen).requires_grad_()
                        for _ in range(geometry[0])]
        return fastprefix.Prefix(make(), make())

    bank = fastprefix.PrefixBank([trainable(P) for P in (3, 6, 2, 4)])
    rows = (2, 0, 2, 3, 0)
    ids, mask = padded_batch((6, 4, 2, 5, 6), 6, gen)
    weights = torch.randn(5, 6, model.config.vocab_size, generator=gen) * mask[..., None]
    leaves = [t for entry in bank.entries for t in entry.keys + entry.values]

    with fastprefix.patched(model, bank.rows(torch.tensor(rows)), backend="torch"):
        loss = (model(input_ids=ids, attention_mask=mask).logits * weights).sum()
    got = torch.autograd.grad(loss, leaves, allow_unused=True)

    expected = [torch.zeros_like(t) for t in leaves]
    for b, t in enumerate(rows):
        with fastprefix.patched(model, bank[t], backend="torch"):
            row_loss = (model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits * weights[b]).sum()
        for i, g in enumerate(torch.autograd.grad(row_loss, leaves, allow_unused=True)):
            if g is not None:
                expected[i] += g
    for i, (g, e) in enumerate(zip(got, expected)):
        entry = i // (2 * geometry[0])
        if entry == 1:
            assert g is None or not g.any(), i
            continue
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=f"leaf {i} (entry {entry})")


# ------------------------------------------------------------------------------------------ no materialization

# P = 17, 7, 23 and D = 12 coincide with no other dimension of the model (hidden 48, 4 / 2 heads, intermediate
# 40, vocabulary 100) nor of the batch (B = 5, suffix width 11, 3 new tokens).
def test_no_entry_is_copied_per_row_in_generation_and_training():
    model = tiny_model(heads=4, kv_heads=2, hidden=48, intermediate=40, vocab=100)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 100, (P,), generator=gen) for P in (17, 7, 23)]
    bank = fastprefix.PrefixBank([fastprefix.Prefix.from_prompt(model, p) for p in prompts])
    ids, mask = padded_batch((11, 9, 11, 6, 8), 11, gen, vocab=100)
    rows = bank.rows(torch.tensor([2, 0, 1, 2, 2]))
    with AllocationRecorder() as recorder, fastprefix.patched(model, rows):
        out = generate(model, ids, mask, 3)
    for layer in cache_of(out).layers:
        assert layer.keys.shape[-2] == 11 + 3 - 1
    trainable = fastprefix.PrefixBank([fastprefix.Prefix([k.clone().requires_grad_() for k in p.keys],
                                                         [v.clone().requires_grad_() for v in p.values])
                                       for p in bank.entries])
    with AllocationRecorder() as training, fastprefix.patched(model, trainable.rows(rows.index)):
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    bad = []
    for P in (17, 7, 23):
        for produced in (recorder.produced, training.produced):
            bad += materialization_violations(produced, B=5, Hq=4, Hkv=2, N=11, S=11, P=P, D=12, itemsize=4,
                                              shared=True)
    assert bad == []


def test_the_check_catches_a_gathered_bank():
    """The check above can fail: gathering the entries per row (what the bank avoids) is reported."""
    entry = torch.randn(2, 17, 12)
    with AllocationRecorder() as recorder:
        torch.stack([entry] * 5)
    assert materialization_violations(recorder.produced, B=5, Hq=4, Hkv=2, N=11, S=11, P=17, D=12, itemsize=4,
                                      shared=True)


# ------------------------------------------------------------------------------------------------- bad inputs

def other(prefix, **change):
    """`prefix` with its tensors changed by `change` (a function of each tensor) or its source replaced."""
    fn = change.get("fn", lambda t: t)
    return fastprefix.Prefix([fn(k) for k in prefix.keys], [fn(v) for v in prefix.values],
                             source=change.get("source", prefix.source))


BAD_BANKS = {  # name -> (entries from a good prefix p, error, message)
    "not a list": (lambda p: p, TypeError, "expected a list of fastprefix.Prefix entries, got Prefix"),
    "empty": (lambda p: [], ValueError, "the list of entries is empty"),
    "not a prefix": (lambda p: [p, p.keys], TypeError, "entry 1 must be a fastprefix.Prefix, got tuple"),
    "per-row": (lambda p: [p, other(p, fn=lambda t: t.expand(2, -1, -1, -1))], ValueError,
                r"entry 1 is a per-row prefix \(B=2"),
    "layers": (lambda p: [p, fastprefix.Prefix(p.keys[:2], p.values[:2])], ValueError, "entry 1 has layers 2 but"),
    "KV heads": (lambda p: [p, p, other(p, fn=lambda t: t[:2])], ValueError, r"entry 2 has KV heads \(Hkv\) 2 but"),
    "head dim": (lambda p: [p, other(p, fn=lambda t: t[..., :16])], ValueError, r"entry 1 has head dim \(D\) 16"),
    "dtype": (lambda p: [p, other(p, fn=torch.Tensor.double)], ValueError, "entry 1 has dtype torch.float64"),
    "device": (lambda p: [p, other(p, fn=lambda t: t.to("meta"))], ValueError, "entry 1 has device meta"),
    "source": (lambda p: [p, other(p, source="llama:0123456789abcdef")], ValueError,
               "entry 1 was computed by a model of signature llama:0123456789abcdef"),
}


@pytest.mark.parametrize("case", BAD_BANKS)
def test_bad_banks_are_refused(setting, case):
    bank = setting[2]
    entries, error, message = BAD_BANKS[case]
    with pytest.raises(error, match=message):
        fastprefix.PrefixBank(entries(bank[0]))


BAD_INDEXES = {
    "not a tensor": ([0, 1], TypeError, "`index` must be a 1-D integer tensor .* got list"),
    "float": (torch.tensor([0.0, 1.0]), TypeError, "int32 or int64 tensor of entries, got torch.float32"),
    "bool": (torch.tensor([True, False]), TypeError, "got torch.bool"),
    "2-D": (torch.zeros(2, 3, dtype=torch.long), ValueError, r"1-D tensor \[B\].*got shape \[2, 3\]"),
    "too large": (torch.tensor([0, 3, 1]), ValueError, r"holds 3, but the bank has T = 3 entries.*\[0, 3\)"),
    "negative": (torch.tensor([0, -1], dtype=torch.int32), ValueError, "holds -1, but the bank has T = 3"),
}


@pytest.mark.parametrize("case", BAD_INDEXES)
def test_bad_indexes_are_refused(setting, case):
    bad, error, message = BAD_INDEXES[case]
    with pytest.raises(error, match=message):
        setting[2].rows(bad)


def assert_generates_plainly(setting):
    """The model is unpatched and generates row 0's [prompt ; suffix] as before."""
    model = setting[0]
    assert fastprefix.patching.handle_of(model) is None
    expected = alone(setting, 0, 3)
    again = alone(setting, 0, 3)
    assert torch.equal(again.sequences, expected.sequences)


def test_an_index_not_matching_the_batch_says_both_numbers(setting):
    """Checked when the batch's rows are known; the handle then still serves a batch that matches."""
    model, prompts, bank, ids, mask = setting
    with fastprefix.patched(model, bank.rows(torch.tensor(ROWS[:4]))) as handle:
        with pytest.raises(ValueError, match="index has 4 entries but the batch has 6 rows"):
            generate(model, ids, mask, 2)
        handle.set_prefix(bank.rows(torch.tensor(ROWS)))
        batched = generate(model, ids, mask, 3)
    assert torch.equal(batched.sequences[0, ids.shape[1]:], alone(setting, 0, 3).sequences[0, -3:])
    assert_generates_plainly(setting)


def test_the_reference_backend_is_refused(setting):
    model, _, bank, ids, mask = setting
    rows = bank.rows(torch.tensor(ROWS))
    message = "backend 'reference' does not read a prefix bank.*use backend='triton' or 'torch'"
    with pytest.raises(ValueError, match=message):
        fastprefix.patch(model, rows, backend="reference")
    assert_generates_plainly(setting)
    with fastprefix.patched(model, bank[0], backend="reference") as handle, pytest.raises(ValueError, match=message):
        handle.set_prefix(rows)
    assert_generates_plainly(setting)


def test_reference_chosen_by_the_environment_is_refused_at_the_call(setting, monkeypatch):
    model, _, bank, ids, mask = setting
    monkeypatch.setenv("FASTPREFIX_BACKEND", "reference")
    with fastprefix.patched(model, bank.rows(torch.tensor(ROWS))):
        with pytest.raises(ValueError, match="'reference' .from FASTPREFIX_BACKEND. does not read a prefix bank"):
            generate(model, ids, mask, 2)
    monkeypatch.delenv("FASTPREFIX_BACKEND")
    assert_generates_plainly(setting)


def test_t5_is_refused():
    model = tiny_t5()
    bank = fastprefix.PrefixBank([t5_random_prefix(model, "decoder", P) for P in (3, 5)])
    with pytest.raises(TypeError, match="read by the LLaMA family only for now, not by T5"):
        fastprefix.patch(model, bank.rows(torch.tensor([0, 1])))
    assert fastprefix.patching.handle_of(model) is None


def test_a_sliding_window_is_refused():
    model = tiny_model("mistral", sliding_window=16)
    prompt = torch.randint(1, 100, (6,))
    bank = fastprefix.PrefixBank([fastprefix.Prefix.from_prompt(model, prompt)])
    ids, mask = padded_batch((4, 2), 4)
    with fastprefix.patched(model, bank.rows(torch.tensor([0, 0]))):
        with pytest.raises(ValueError, match=r"sliding window \(16\), which bank rows .* do not support yet"):
            generate(model, ids, mask, 2)
    with fastprefix.patched(model, bank[0]):
        generate(model, ids, mask, 2)


def test_op_bad_inputs():
    gen = torch.Generator().manual_seed(5)
    q, k, v, bank_k, bank_v = bank_inputs(2, 3, torch.float32, gen)
    index = torch.tensor(INDEX)
    with pytest.raises(ValueError, match="entry 1 of the bank .* `prefix_k` has head count"):
        bank_prefix_attention(q, k, v, [bank_k[0], bank_k[1][:1]], bank_v[:2], index[:2] * 0)
    with pytest.raises(ValueError, match="`index` has 6 entries but the batch has 2 rows"):
        bank_prefix_attention(q[:2], k[:2], v[:2], bank_k, bank_v, index)
    with pytest.raises(ValueError, match="`bank_k\\[0\\]` must be one entry's"):
        bank_prefix_attention(q, k, v, [bank_k[0][None]], [bank_v[0]], index * 0)
    with pytest.raises(ValueError, match="backend 'reference' does not read a prefix bank"):
        bank_prefix_attention(q, k, v, bank_k, bank_v, index, backend="reference")
