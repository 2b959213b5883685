"""Bad inputs to levels of prefixes (cascade prompts): levels out of order or with a wrong start, bank rows not
last, per-row prefixes, prefixes of another model, `after=` that does not fit, backends and families that do
not read levels: each refused before any compute with what to do, the model left usable."""

import pytest
import torch

import fastprefix
from fastprefix.ops import levels_prefix_attention
from fastprefix.presets import tiny_t5
from helpers.levels import B, INDEX, LEVELS, SYSTEM, cascade_setting, generate, level_inputs, row_alone
from helpers.llama import padded_batch, tiny_model
from helpers.t5 import random_prefix as t5_random_prefix


@pytest.fixture(scope="module")
def setting():
    return cascade_setting()


def assert_generates_plainly(s):
    """The model is unpatched and generates row 0's [system ; document ; question] as before."""
    model = s["model"]
    assert fastprefix.patching.handle_of(model) is None
    full = row_alone(s, 0)[None]
    assert torch.equal(generate(model, full, None, 2).sequences, generate(model, full, None, 2).sequences)


OTHER = "llama:0123456789abcdef"  # the signature of another model


def with_start(prefix, start):
    return fastprefix.Prefix(prefix.keys, prefix.values, source=prefix.source, start=start)


def per_row(prefix, rows):
    """`prefix` as a per-row prefix of `rows` rows ([B, Hkv, P, D] views)."""
    return fastprefix.Prefix([k.expand(rows, -1, -1, -1) for k in prefix.keys],
                             [v.expand(rows, -1, -1, -1) for v in prefix.values], start=prefix.start)


BAD_LEVELS = {  # name -> (levels from the setting, error, message)
    "empty": (lambda s: [], ValueError, r"the list of levels is empty; give \[level0, level1, ...\]"),
    "out of order": (lambda s: [s["bank"][0], s["level0"]], ValueError,
                     "level 0 starts at position 11 .* but it is the first level; put the levels it was"),
    "wrong start": (lambda s: [s["level0"], with_start(s["bank"][0], 7)], ValueError,
                    r"level 1 starts at position 7 .* levels 0 .. 0 hold 11 positions, so it must start at 11"),
    "a level skipped": (lambda s: [s["bank"].rows(torch.tensor(INDEX))], ValueError,
                        "level 0 starts at position 11"),
    "bank rows not last": (lambda s: [s["level0"], s["bank"].rows(torch.tensor(INDEX)), s["level0"]], ValueError,
                           "level 1 is bank rows but level 2 follows it; bank rows can only be the last level"),
    "per-row prefix": (lambda s: [s["level0"], per_row(s["bank"][0], 12)], ValueError,
                       r"level 1 is a per-row prefix \(B=12\); .* PrefixBank and give bank.rows"),
    "not a prefix": (lambda s: [s["level0"], s["bank"]], TypeError,
                     "level 1 is a PrefixBank; expected a fastprefix.Prefix: each level must be a shared"),
    "another model": (lambda s: [s["level0"], fastprefix.Prefix(s["bank"][0].keys, s["bank"][0].values,
                                                                source=OTHER, start=SYSTEM)],
                      ValueError, f"level 1 of self-attention was computed by a model of signature {OTHER}"),
    "another geometry": (lambda s: [s["level0"], fastprefix.Prefix([k[:2] for k in s["bank"][0].keys],
                                                                   [v[:2] for v in s["bank"][0].values], start=SYSTEM)],
                         ValueError, r"level 1 of self-attention has 2 KV heads \(Hkv\) but LlamaForCausalLM has 4"),
    "a lone later level": (lambda s: s["bank"][0], ValueError,
                           r"computed after levels of 11 positions .* list of levels \[level0, ..., this prefix\]"),
}


@pytest.mark.parametrize("case", BAD_LEVELS)
def test_bad_levels_are_refused_before_any_compute(setting, case):
    """At patch and at set_prefix, with what to do; the model stays usable and a handle keeps its levels."""
    levels, error, message = BAD_LEVELS[case]
    model = setting["model"]
    with pytest.raises(error, match=message):
        fastprefix.patch(model, levels(setting))
    assert_generates_plainly(setting)
    good = [setting["level0"], setting["bank"].rows(torch.tensor(INDEX))]
    with fastprefix.patched(model, good) as handle:
        with pytest.raises(error, match=message):
            handle.set_prefix(levels(setting))
        assert handle.prefix is good
    assert_generates_plainly(setting)


BAD_AFTER = {  # name -> (after= from the setting, error, message)
    "bank rows": (lambda s: s["bank"].rows(torch.tensor(INDEX)), TypeError,
                  "`after` must be a shared Prefix or a list of shared Prefixes .* item 0 is BankRows"),
    "per-row": (lambda s: per_row(s["level0"], 1), TypeError, r"item 0 is a per-row Prefix \(B=1\)"),
    "empty": (lambda s: [], ValueError, "`after` is an empty list"),
    "another model": (lambda s: fastprefix.Prefix(s["level0"].keys, s["level0"].values, source=OTHER), ValueError,
                      f"`after` does not fit the model: .* signature {OTHER}"),
    "another geometry": (lambda s: fastprefix.Prefix.from_prompt(tiny_model(), s["system"][:5] % 128), ValueError,
                         "`after` does not fit the model: .* 2 layers but LlamaForCausalLM has 4"),
    "out of order": (lambda s: [s["bank"][0], s["level0"]], ValueError,
                     "`after` does not fit the model: .* level 0 starts at position 11"),
}


@pytest.mark.parametrize("case", BAD_AFTER)
def test_bad_after_is_refused(setting, case):
    after, error, message = BAD_AFTER[case]
    with pytest.raises(error, match=message):
        fastprefix.Prefix.from_prompt(setting["model"], setting["documents"][0], after=after(setting))
    assert_generates_plainly(setting)


def test_a_bank_of_entries_with_different_starts_is_refused(setting):
    with pytest.raises(ValueError, match="entry 1 has start 0 but entry 0 has 11; .* computed after the same levels"):
        fastprefix.PrefixBank([setting["bank"][0], setting["level0"]])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_backends_that_do_not_read_levels_are_refused(setting, backend):
    model, levels = setting["model"], [setting["level0"], setting["bank"].rows(torch.tensor(INDEX))]
    message = f"backend '{backend}' does not read levels of prefixes.*use backend='torch'"
    with pytest.raises(ValueError, match=message):
        fastprefix.patch(model, levels, backend=backend)
    assert_generates_plainly(setting)
    with fastprefix.patched(model, setting["level0"], backend=backend) as handle, pytest.raises(ValueError,
                                                                                               match=message):
        handle.set_prefix(levels)
    assert_generates_plainly(setting)


def test_triton_chosen_by_the_environment_is_refused_at_the_call(setting, monkeypatch):
    s = setting
    monkeypatch.setenv("FASTPREFIX_BACKEND", "triton")
    with fastprefix.patched(s["model"], [s["level0"], s["bank"].rows(torch.tensor(INDEX))]):
        with pytest.raises(ValueError, match="'triton' .from FASTPREFIX_BACKEND. does not read levels of prefixes"):
            generate(s["model"], s["ids"], s["mask"], 2)
    monkeypatch.delenv("FASTPREFIX_BACKEND")
    assert_generates_plainly(setting)


def test_t5_is_refused():
    model = tiny_t5()
    levels = [t5_random_prefix(model, "decoder", 3), t5_random_prefix(model, "decoder", 2)]
    with pytest.raises(TypeError, match=r"levels of prefixes \(a list \[level0, level1, ...\]\) are read by the "
                                        "LLaMA family only, not by T5"):
        fastprefix.patch(model, levels)
    assert fastprefix.patching.handle_of(model) is None


def test_a_sliding_window_is_refused():
    model = tiny_model("mistral", sliding_window=16)
    level0 = fastprefix.Prefix.from_prompt(model, torch.randint(1, 100, (6,)))
    level1 = fastprefix.Prefix.from_prompt(model, torch.randint(1, 100, (3,)), after=level0)
    ids, mask = padded_batch((4, 2), 4)
    with fastprefix.patched(model, [level0, level1]):
        with pytest.raises(ValueError, match=r"sliding window \(16\), which levels of prefixes do not support yet"):
            generate(model, ids, mask, 2)
    with fastprefix.patched(model, level0):
        generate(model, ids, mask, 2)


def test_op_bad_inputs():
    gen = torch.Generator().manual_seed(5)
    q, k, v, levels = level_inputs(LEVELS["shared, bank"], 2, 3, torch.float32, gen)
    with pytest.raises(TypeError, match="`levels` must be a non-empty list of levels"):
        levels_prefix_attention(q, k, v, [])
    with pytest.raises(TypeError, match=r"`levels\[1\]` must be a \(prefix_k, prefix_v\) pair .* got a tuple of 1"):
        levels_prefix_attention(q, k, v, [levels[0], (levels[0][0],)])
    with pytest.raises(ValueError, match=r"level 0: `prefix_k` must be a shared \[Hkv, P, D\] tensor"):
        levels_prefix_attention(q, k, v, [(levels[0][0].expand(B, -1, -1, -1), levels[0][1].expand(B, -1, -1, -1))])
    with pytest.raises(ValueError, match="level 0: .* `prefix_k` has head count = 1"):
        levels_prefix_attention(q, k, v, [(levels[0][0][:1], levels[0][1][:1]), levels[1]])
    with pytest.raises(ValueError, match=r"level 1: .* `index` holds 7, but the bank has T = 5"):
        levels_prefix_attention(q, k, v, [levels[0], (*levels[1][:2], torch.tensor([0, 1, 2, 3, 4, 7]))])
    with pytest.raises(ValueError, match="backend 'triton' does not read levels of prefixes"):
        levels_prefix_attention(q, k, v, levels, backend="triton")
