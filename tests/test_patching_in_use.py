"""Patched models as they are used: from several threads, beside models that share their config, copied,
pickled, unpatched without their handle, under a sliding window, with logits processors that read the
context; each against plain transformers or PEFT."""

import copy
import gc
import io
import threading

import pytest
import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

import fastprefix
from fastprefix.models.base import Swapped
from helpers.llama import VOCAB, padded_batch, peft_twins, quiet, tiny_config, tiny_model
from helpers.t5 import VOCAB as T5_VOCAB, random_prefix, t5_twins, tiny_t5


def greedy(model, ids, mask=None, new_tokens=6, **kwargs):
    return quiet(model.generate, input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                 pad_token_id=0, **kwargs)


def llama_patched(model_type="llama"):
    model = tiny_model(model_type)
    prefix = fastprefix.Prefix.from_prompt(model, torch.randint(1, VOCAB, (7,)))
    return model, lambda: fastprefix.patch(model, prefix)


def t5_patched():
    model = tiny_t5(dropout_rate=0.0)
    prefixes = {kind: random_prefix(model, kind, P=4) for kind in ("decoder", "encoder", "cross")}
    return model, lambda: fastprefix.patch(model, prefixes)


def peft_patched(kind):
    peft_model = peft_twins(tiny_model(), P=5)[0] if kind == "llama" else t5_twins(tiny_t5(dropout_rate=0.0))[0]
    torch.nn.init.normal_(peft_model.prompt_encoder.default.embedding.weight)
    return peft_model, lambda: fastprefix.from_peft(peft_model)


SETUPS = {"llama": lambda: llama_patched("llama"), "qwen2": lambda: llama_patched("qwen2"), "t5": t5_patched,
          "peft-llama": lambda: peft_patched("llama"), "peft-t5": lambda: peft_patched("t5")}


def inputs(generator, count):
    return [padded_batch((6, 3), 6, generator, vocab=T5_VOCAB) for _ in range(count)]


@pytest.mark.parametrize("setup", SETUPS)
def test_threads_generate_as_the_serial_run(setup):
    """4 threads x 4 generations at once on one patched model equal the same 16 run one after another (T5
    gave wrong tokens in 7 of 16 while a call's cache length lived on the shared handle)."""
    model, patch = SETUPS[setup]()
    patch()
    batches = inputs(torch.Generator().manual_seed(1), 16)
    serial = [greedy(model, ids, mask) for ids, mask in batches]
    results = [None] * 16
    start = threading.Barrier(4)

    def work(worker):
        start.wait()
        for i in range(worker, 16, 4):
            results[i] = greedy(model, *batches[i])

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [i for i in range(16) if not torch.equal(results[i], serial[i])] == []


def test_models_sharing_a_config_are_patched_independently():
    """transformers shares one config object between models built from it: patching one changes nothing the
    other computes, and unpatching one leaves the other patched."""
    config = tiny_config()
    a, b = (type(tiny_model())(config).eval() for _ in range(2))
    assert a.config is b.config
    ids = torch.randint(1, VOCAB, (2, 6))
    plain_b = b(ids).logits
    prefix_a = fastprefix.Prefix.from_prompt(a, torch.randint(1, VOCAB, (4,)))
    prefix_b = fastprefix.Prefix.from_prompt(b, torch.randint(1, VOCAB, (3,)))
    handle_a = fastprefix.patch(a, prefix_a)
    assert torch.equal(b(ids).logits, plain_b)
    assert config._attn_implementation == "sdpa"
    with fastprefix.patched(b, prefix_b):
        patched_b = b(ids).logits
        handle_a.unpatch()
        assert torch.equal(b(ids).logits, patched_b)
    assert not torch.allclose(patched_b, plain_b)
    assert torch.equal(b(ids).logits, plain_b)


@pytest.mark.parametrize("setup", SETUPS)
def test_a_copy_is_unpatched_and_patches_like_the_original(setup):
    """copy.deepcopy of a patched model is the model unpatched (its own classes, no shifted positions, no
    fastprefix config); patching the copy gives the original's patched outputs, and unpatching it leaves it
    plain. For PEFT models "plain" is PEFT's own generate (which keeps the prefix on transformers 5.20 and drops
    it on 5.24)."""
    model, patch = SETUPS[setup]()
    ids, mask = padded_batch((6, 4), 6, torch.Generator().manual_seed(2), vocab=T5_VOCAB)
    plain = greedy(model, ids, mask)
    own_class = type(model)
    patch()
    patched = greedy(model, ids, mask)
    if not setup.startswith("peft"):
        assert not torch.equal(patched, plain)
    twin = copy.deepcopy(model)
    assert type(twin) is own_class and not any(isinstance(m, Swapped) for m in twin.modules())
    assert torch.equal(greedy(twin, ids, mask), plain)
    assert twin.config._attn_implementation == "sdpa"
    if setup.startswith("peft"):
        fastprefix.from_peft(twin)
    else:
        fastprefix.patch(twin, fastprefix.patching.handle_of(model).prefix)
    assert torch.equal(greedy(twin, ids, mask), patched)
    fastprefix.unpatch(twin)
    assert torch.equal(greedy(twin, ids, mask), plain)
    assert torch.equal(greedy(model, ids, mask), patched)


@pytest.mark.parametrize("setup", SETUPS)
def test_torch_save_of_a_patched_model_saves_the_model_unpatched(setup):
    model, patch = SETUPS[setup]()
    ids, mask = padded_batch((5, 3), 5, torch.Generator().manual_seed(3), vocab=T5_VOCAB)
    plain = greedy(model, ids, mask)
    patch()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded).__name__ == type(model).__name__.removeprefix("FastPrefix")
    assert not isinstance(loaded, fastprefix.PeftPrefixModel)
    assert torch.equal(greedy(loaded, ids, mask), plain)


def test_unpatch_without_the_handle():
    """A handle that is not kept still serves its model; fastprefix.unpatch(model) finds and removes it."""
    model, patch = llama_patched()
    ids = torch.randint(1, VOCAB, (2, 5))
    plain = model(ids).logits
    patch()
    gc.collect()
    patched = model(ids).logits
    assert not torch.allclose(patched, plain)
    with pytest.raises(RuntimeError, match=r"fastprefix\.unpatch\(model\)"):
        fastprefix.patch(model, fastprefix.patching.handle_of(model).prefix)
    fastprefix.unpatch(model)
    assert torch.equal(model(ids).logits, plain)
    with pytest.raises(ValueError, match="is not patched"):
        fastprefix.unpatch(model)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_unpatch_a_peft_model_whose_wrapper_was_not_kept(kind):
    peft_model, oracle = (peft_twins(tiny_model(), P=5) if kind == "llama" else t5_twins(tiny_t5(dropout_rate=0.0)))
    peft_class = type(peft_model)
    ids, mask = padded_batch((6, 4), 6, torch.Generator().manual_seed(4), vocab=T5_VOCAB)
    fastprefix.from_peft(peft_model)
    assert fastprefix.from_peft(peft_model) is peft_model
    fastprefix.unpatch(peft_model)
    assert type(peft_model) is peft_class
    batch = dict(input_ids=ids, attention_mask=mask)
    if kind == "t5":
        batch.update(decoder_input_ids=ids[:, :3])
    assert torch.equal(peft_model(**batch).logits, oracle(**batch).logits)


WINDOWED = {"mistral": lambda: tiny_model("mistral", sliding_window=16),
            # layer 0 full attention, layer 1 a sliding window
            "qwen2": lambda: tiny_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)}


@pytest.mark.parametrize("lengths", [(4,), (5, 2)])
@pytest.mark.parametrize("model_type", WINDOWED)
def test_a_prompt_leaves_the_sliding_window_as_in_plain_transformers(model_type, lengths):
    """Window 16, prompt of 6: generating past the window gives the tokens of plain transformers on
    [prompt ; suffix] alone, per row; a learned prefix (no prompt ids) stays visible, and differs."""
    model = WINDOWED[model_type]()
    generator = torch.Generator().manual_seed(5)
    prompt = torch.randint(1, VOCAB, (6,), generator=generator)
    suffixes, mask = padded_batch(lengths, max(lengths), generator)
    prefix = fastprefix.Prefix.from_prompt(model, prompt)
    with fastprefix.patched(model, prefix):
        batched = greedy(model, suffixes, mask, new_tokens=24)[:, suffixes.shape[1]:]
    with fastprefix.patched(model, fastprefix.Prefix(prefix.keys, prefix.values)):
        always_visible = greedy(model, suffixes, mask, new_tokens=24)[:, suffixes.shape[1]:]
    for row, n in enumerate(lengths):
        alone = torch.cat([prompt, suffixes[row, suffixes.shape[1] - n:]])[None]
        expected = greedy(model, alone, new_tokens=24)[0, alone.shape[1]:]  # shorter if it ends at eos
        assert torch.equal(batched[row, :len(expected)], expected), row
        assert (batched[row, len(expected):] == 0).all(), row
    assert not torch.equal(always_visible, batched)


def test_a_saved_prompt_keeps_its_ids(tmp_path):
    model = tiny_model()
    prefix = fastprefix.Prefix.from_prompt(model, torch.randint(1, VOCAB, (6,)))
    prefix.save(tmp_path / "prompt.safetensors")
    assert torch.equal(fastprefix.Prefix.load(tmp_path / "prompt.safetensors").prompt_ids, prefix.prompt_ids)


def context_processors(prefix=None):
    processors = [RepetitionPenaltyLogitsProcessor(3.0), NoRepeatNGramLogitsProcessor(2)]
    return LogitsProcessorList([fastprefix.SeesPrompt(p, prefix, pad_token_id=0) for p in processors]
                               if prefix is not None else processors)


@pytest.mark.parametrize("lengths", [(4,), (5, 2)])
def test_processors_that_read_the_context_see_the_prompt(lengths):
    """repetition_penalty and no_repeat_ngram_size through SeesPrompt equal plain transformers on [prompt ; suffix]
    with the same arguments; without it they differ."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(6)
    # A prompt of tokens this model likes to generate, so that penalizing them changes what it generates.
    prompt = greedy(model, torch.randint(1, VOCAB, (1, 2), generator=generator), new_tokens=8)[0, 2:]
    suffixes, mask = padded_batch(lengths, max(lengths), generator)
    prefix = fastprefix.Prefix.from_prompt(model, prompt)
    with fastprefix.patched(model, prefix):
        seen = greedy(model, suffixes, mask, 12, logits_processor=context_processors(prefix))[:, suffixes.shape[1]:]
        unseen = greedy(model, suffixes, mask, 12, logits_processor=context_processors())[:, suffixes.shape[1]:]
    for row, n in enumerate(lengths):
        alone = torch.cat([prompt, suffixes[row, suffixes.shape[1] - n:]])[None]
        expected = greedy(model, alone, None, 12, repetition_penalty=3.0, no_repeat_ngram_size=2)
        assert torch.equal(seen[row], expected[0, alone.shape[1]:]), row
    assert not torch.equal(seen, unseen)


def test_sees_prompt_places_padding_before_the_prompt():
    processor = fastprefix.SeesPrompt(lambda ids, scores: ids, fastprefix.Prefix.from_prompt(
        tiny_model(), torch.tensor([7, 8])), pad_token_id=0)
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    assert processor(ids, None).tolist() == [[0, 0, 7, 8, 5, 6], [7, 8, 1, 2, 3, 4]]


def test_sees_prompt_needs_a_prompt():
    model = tiny_model()
    prefix = fastprefix.Prefix.from_prompt(model, torch.tensor([7, 8]))
    with pytest.raises(ValueError, match="Prefix.from_prompt"):
        fastprefix.SeesPrompt(RepetitionPenaltyLogitsProcessor(2.0), fastprefix.Prefix(prefix.keys, prefix.values))


def test_output_attentions_warns():
    model, patch = llama_patched()
    patch()
    with pytest.warns(UserWarning, match="no attention maps"):
        model(torch.randint(1, VOCAB, (1, 4)), output_attentions=True)


def test_trainable_prefix_takes_one_kind_by_name():
    model = tiny_t5()
    assert list(fastprefix.TrainablePrefix(model, 3, kinds="decoder").prefix()) == ["decoder"]


def test_a_per_row_prefix_under_beams_says_why_the_batch_grew():
    model = tiny_model()
    shared = fastprefix.Prefix.from_prompt(model, torch.randint(1, VOCAB, (3,)))
    per_row = fastprefix.Prefix([k.expand(2, -1, -1, -1) for k in shared.keys],
                                [v.expand(2, -1, -1, -1) for v in shared.values])
    ids, mask = padded_batch((4, 3), 4)
    why = r"num_beams x num_return_sequences .*3 here"
    with fastprefix.patched(model, per_row), pytest.raises(ValueError, match=why):
        greedy(model, ids, mask, num_beams=3)


def test_a_shared_prompt_under_beam_search_and_several_return_sequences():
    """Beam search (3 beams, 2 sequences returned) with a prompt's prefix gives plain transformers' sequences
    on [prompt ; suffix]."""
    model = tiny_model()
    prompt, suffix = torch.randint(1, VOCAB, (6,)), torch.randint(1, VOCAB, (1, 4))
    with fastprefix.patched(model, fastprefix.Prefix.from_prompt(model, prompt)):
        got = greedy(model, suffix, new_tokens=8, num_beams=3, num_return_sequences=2)[:, 4:]
    expected = greedy(model, torch.cat([prompt[None], suffix], 1), new_tokens=8, num_beams=3,
                      num_return_sequences=2)[:, 10:]
    assert torch.equal(got, expected)
