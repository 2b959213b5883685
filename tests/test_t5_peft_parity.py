"""`from_peft` on T5 (PeftModelForSeq2SeqLM) against PEFT 0.21 itself, for both num_transformer_submodules:
logits, loss, gradients, generation, training. What PEFT does there, verified below against PEFT:

* 2 (the default): the prefix reaches decoder self-attention only, decoder layer l reading prompt slots
  4l mod 2L (keys) and 4l + 1 mod 2L (values); neither the encoder nor cross-attention sees it.
* 1: one plain cache per decoder layer shared by self- and cross-attention, so cross-attention also attends to
  the prefix and to every decoder position, later ones included; a padded encoder batch makes PEFT fail.

PEFT's forward is the oracle, never its `generate` (it drops the prefix on transformers 5.24).
"""

import copy
import warnings

import pytest
import torch

import fastprefix
from fastprefix import PrefixConfigWarning
from fastprefix.compat import cache_argument, cache_of
from fastprefix.dispatch import unavailable_reasons
from fastprefix.testing import greedy_by_forward, relative_error
from helpers.parity import assert_same_step
from helpers.t5 import VOCAB, batch, concatenating_oracle, lazy_cache, random_prefix, t5_twins, tiny_t5

GEOMETRIES = {"d_model-40-heads-4x12": dict(), "decoder-3-over-encoder-2": dict(num_decoder_layers=3)}
PROJECTION = {"plain": dict(prefix_projection=False), "projected": dict(prefix_projection=True,
                                                                         encoder_hidden_size=24)}


def from_peft(peft_model):
    """fastprefix.from_peft, which warns (PrefixConfigWarning) exactly when num_transformer_submodules is 1."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = fastprefix.from_peft(peft_model)
    ours = [w for w in caught if issubclass(w.category, PrefixConfigWarning)]
    assert len(ours) == (peft_model.active_peft_config.num_transformer_submodules == 1), ours
    return fast


def training_batch(submodules, seed):
    """PEFT fails on a padded encoder batch with num_transformer_submodules=1, so its inputs are unpadded."""
    inputs = batch(torch.Generator().manual_seed(seed))
    if submodules == 1:
        del inputs["attention_mask"]
    return inputs


@pytest.mark.parametrize("projection", list(PROJECTION))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("submodules", [2, 1])
def test_forward_and_gradients_match_peft(submodules, geometry, projection):
    peft_model, oracle = t5_twins(tiny_t5(**GEOMETRIES[geometry]), submodules=submodules, **PROJECTION[projection])
    assert_same_step(from_peft(peft_model), oracle, training_batch(submodules, seed=1))


@pytest.mark.parametrize("submodules", [2, 1])
def test_inference_mode_matches_peft(submodules):
    """In inference mode PEFT reads the prefix straight from the embedding; gradients still reach it."""
    peft_model, oracle = t5_twins(tiny_t5(), submodules=submodules, inference_mode=True)
    for m in (peft_model, oracle):
        m.prompt_encoder.requires_grad_(True)
    assert_same_step(from_peft(peft_model), oracle, training_batch(submodules, seed=2))


def test_the_prefix_reaches_decoder_self_attention_only_with_two_submodules():
    """With 2 submodules PEFT's prompt slots of odd layers are never read when the decoder has an even number
    of layers (layer l reads slot 4l mod 2L): their gradients are zero, in PEFT and in fastprefix. The
    encoder's output does not depend on the prefix."""
    peft_model, oracle = t5_twins(tiny_t5(num_layers=4), submodules=2, prefix_projection=False)
    fast = from_peft(peft_model)
    inputs = training_batch(2, seed=3)
    for model in (fast, oracle):
        model(**inputs).loss.backward()
    for model in (peft_model, oracle):
        grad = model.prompt_encoder.default.embedding.weight.grad.view(5, 4, 2, -1)  # [P, layer, k/v, H * d_kv]
        assert (grad[:, 1::2] == 0).all() and (grad[:, 0::2] != 0).any()
    with torch.no_grad():
        out = fast(**inputs, output_hidden_states=True)
        base = oracle.get_base_model()(**inputs, output_hidden_states=True)
    assert torch.equal(out.encoder_last_hidden_state, base.encoder_last_hidden_state)


def test_peft_one_submodule_lets_cross_attention_see_later_decoder_tokens():
    """What validate's warning says, on PEFT itself: with 1 submodule, changing the last decoder token changes
    the logits of earlier positions (so in training they see the labels); with 2 it does not."""
    changed = {}
    for submodules in (1, 2):
        peft_model, _ = t5_twins(tiny_t5(), submodules=submodules)
        ids = torch.randint(1, VOCAB, (1, 7))
        decoder_ids = torch.randint(1, VOCAB, (1, 6))
        other = decoder_ids.clone()
        other[0, -1] = decoder_ids[0, -1] % (VOCAB - 1) + 1
        with torch.no_grad():
            a = peft_model(input_ids=ids, decoder_input_ids=decoder_ids).logits[:, :-1]
            b = peft_model(input_ids=ids, decoder_input_ids=other).logits[:, :-1]
        changed[submodules] = not torch.equal(a, b)
    assert changed == {1: True, 2: False}


def assert_generation_matches_oracle(fast, oracle, lengths=(8, 5, 2), new_tokens=20):
    """Left-padded batch: every row equals greedy decoding by PEFT's forward on that row alone, the decoder's
    cache holds the generated tokens only, and the prefix changes some row's tokens."""
    width = max(lengths)
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    out = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                        return_dict_in_generate=True)
    cache = cache_of(out)
    if fast.peft_model.active_peft_config.num_transformer_submodules == 1:
        assert cache is None, "no cache can hold the states of PEFT's one-submodule layout"
    else:
        for layer in cache.self_attention_cache.layers:
            assert layer.keys.shape[-2] == new_tokens, "the decoder cache must hold the generated tokens only"
    prefix_mattered = False
    for r, n in enumerate(lengths):
        row = ids[r:r + 1, width - n:]
        expected = greedy_by_forward(oracle, row, new_tokens, decoder_start=0)
        assert torch.equal(out.sequences[r:r + 1, 1:], expected), f"row {r}"
        base = greedy_by_forward(oracle.get_base_model(), row, new_tokens, decoder_start=0)
        prefix_mattered |= not torch.equal(base, expected)
    assert prefix_mattered, "the prefix must change the generated tokens, or this test cannot tell"


@pytest.mark.parametrize("submodules", [2, 1])
def test_generate_matches_forward_greedy_oracle(submodules):
    peft_model, oracle = t5_twins(tiny_t5(), submodules=submodules, prefix_projection=True, encoder_hidden_size=24)
    assert_generation_matches_oracle(from_peft(peft_model), oracle)


def test_one_submodule_generation_refuses_a_cache():
    peft_model, _ = t5_twins(tiny_t5(), submodules=1)
    fast = from_peft(peft_model)
    name = cache_argument(peft_model.get_base_model())
    for arguments, named in ((dict(use_cache=True), "use_cache=True"), ({name: lazy_cache()}, name)):
        with pytest.raises(ValueError, match=f"generate got {named}.*no cache can hold their states"):
            fast.generate(input_ids=torch.ones(1, 3, dtype=torch.long), **arguments)


def train(model_call, parameters, submodules, steps, seed=5):
    """`steps` AdamW steps fitting one batch; returns the losses."""
    optimizer = torch.optim.AdamW(parameters, lr=3e-2)
    inputs = training_batch(submodules, seed)
    losses = []
    for _ in range(steps):
        loss = model_call(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("submodules", [2, 1])
def test_generate_after_training_steps(submodules):
    """Training mode (attention and hidden dropout on), three optimizer steps through fastprefix, then
    generation on the same object equals PEFT's forward with the trained weights."""
    peft_model, oracle = t5_twins(tiny_t5(), submodules=submodules)
    fast = from_peft(peft_model)
    peft_model.train()
    train(fast, peft_model.parameters(), submodules, steps=3)
    peft_model.eval()
    oracle.load_state_dict(peft_model.state_dict())
    assert_generation_matches_oracle(fast, oracle, new_tokens=20)


@pytest.mark.parametrize("submodules", [2, 1])
def test_training_loop_matches_peft(submodules):
    """15 steps with an optimizer on peft_model.parameters(), dropout off (PEFT and fastprefix draw dropout masks
    differently): the same loss curve as PEFT. Optimizer steps amplify float32 rounding from step to step
    (PEFT's own curve drifts 1.9e-4 from a float64 run of itself by step 14 with 2 submodules), so a step where
    the two curves differ by more than 1e-4 is judged against that float64 run: fastprefix may be no farther
    from it than 1e-4 or twice PEFT's own distance."""
    peft_model, oracle = t5_twins(tiny_t5(dropout_rate=0.0), submodules=submodules, prefix_projection=True,
                                  encoder_hidden_size=24)
    exact = copy.deepcopy(oracle).double()
    peft_model.train(), oracle.train(), exact.train()
    losses = train(from_peft(peft_model), peft_model.parameters(), submodules, steps=15)
    expected = train(oracle, oracle.parameters(), submodules, steps=15)
    exact_losses = train(exact, exact.parameters(), submodules, steps=15)
    for step, (got, want, true) in enumerate(zip(losses, expected, exact_losses)):
        assert abs(got - want) < 1e-4 * abs(want) or abs(got - true) <= max(1e-4 * abs(true), 2 * abs(want - true)), \
            f"step {step}: {got} vs PEFT {want}, float64 {true}"
    assert losses[-1] < 0.9 * losses[0], "training must make progress, or the curve comparison says little"


def test_gradient_checkpointing_same_gradients():
    """PEFT refuses checkpointing for prefix tuning; fastprefix gives the gradients PEFT gives without it."""
    peft_model, oracle = t5_twins(tiny_t5(dropout_rate=0.0), submodules=2)
    peft_model.train(), oracle.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model.get_base_model().gradient_checkpointing_enable()
    fast = from_peft(peft_model)
    assert_same_step(fast, oracle, training_batch(2, seed=6))


def test_from_peft_makes_the_peft_model_itself_run_on_fastprefix_until_unpatched():
    from peft import PeftModelForSeq2SeqLM

    peft_model, oracle = t5_twins(tiny_t5())
    fast = from_peft(peft_model)
    inputs = training_batch(2, seed=7)
    assert fast is peft_model and isinstance(fast, PeftModelForSeq2SeqLM)
    with torch.no_grad():
        assert relative_error(fast(**inputs).logits, oracle(**inputs).logits) < 1e-5
    fast.unpatch()
    assert type(peft_model) is PeftModelForSeq2SeqLM
    with torch.no_grad():
        assert torch.equal(peft_model(**inputs).logits, oracle(**inputs).logits)
    assert {c._attn_implementation for c in (peft_model.get_base_model().config,
                                              peft_model.get_base_model().encoder.config,
                                              peft_model.get_base_model().decoder.config)} == {"sdpa"}


def test_triton_backend_matches_peft_and_the_reference(monkeypatch):
    """A smaller case on the Triton kernels (under TRITON_INTERPRET=1 on CPU), selected by FASTPREFIX_BACKEND:
    PEFT's step and generation, and prefixes in all three kinds against the concatenating oracle."""
    reasons = unavailable_reasons("triton", torch.device("cpu"))
    if reasons:
        pytest.skip("Triton backend unavailable here: " + "; ".join(reasons))
    monkeypatch.setenv("FASTPREFIX_BACKEND", "triton")
    inputs = batch(torch.Generator().manual_seed(9), lengths=(5, 3), width=5, target_lengths=(4, 2), target_width=4)
    peft_model, oracle = t5_twins(tiny_t5(), P=3)
    fast = from_peft(peft_model)
    assert_same_step(fast, oracle, inputs)
    # Generation: each step's logits (one query against the cache) equal PEFT's forward over the final sequence.
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                        return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        expected = oracle(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences).logits[:, :-1]
        base = oracle.get_base_model()(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences).logits
    assert relative_error(torch.stack(out.logits, dim=1), expected) < 1e-5
    assert relative_error(base[:, :-1], expected) > 1e-2, "the prefix must change the logits"

    model = tiny_t5()
    model.requires_grad_(False)
    prefixes = {kind: random_prefix(model, kind, P=3, requires_grad=True) for kind in ("encoder", "decoder", "cross")}
    leaves = [t for p in prefixes.values() for t in p.keys + p.values]

    def step(attending):
        for t in leaves:
            t.grad = None
        with attending(model, prefixes):
            out = model(**inputs)
            out.loss.backward()
        return out.logits, [t.grad for t in leaves]

    logits, grads = step(fastprefix.patched)
    ref_logits, ref_grads = step(concatenating_oracle)
    assert relative_error(logits, ref_logits) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert relative_error(g, r) < 1e-4
