"""`from_peft` against PEFT 0.21 itself: logits, loss, gradients, generation, training, checkpointing.

PEFT's forward is the oracle. Its `generate` is not: on transformers 5.24 it silently drops the prefix, so
generation is checked against greedy decoding by PEFT's forward re-run on the growing sequence.
"""

import pytest
import torch

import fastprefix
from fastprefix.dispatch import unavailable_reasons
from fastprefix.compat import cache_of
from fastprefix.testing import greedy_by_forward, relative_error
from helpers.llama import checkpointed_layers, padded_batch, peft_twins, quiet, tiny_model
from helpers.parity import assert_same_step

HEADS = {"mha": dict(heads=4, kv_heads=4), "gqa": dict(heads=4, kv_heads=2)}
PROJECTION = {"plain": dict(prefix_projection=False), "projected": dict(prefix_projection=True,
                                                                         encoder_hidden_size=48)}


@pytest.fixture(params=list(HEADS))
def heads(request):
    return HEADS[request.param]


@pytest.fixture(params=list(PROJECTION))
def projection(request):
    return PROJECTION[request.param]


def training_batch(generator, lengths=(9, 6, 3), width=9):
    ids, mask = padded_batch(lengths, width, generator)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def test_forward_and_gradients_match_peft(heads, projection):
    peft_model, oracle = peft_twins(tiny_model(**heads), **projection)
    fast = fastprefix.from_peft(peft_model)
    assert_same_step(fast, oracle, training_batch(torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("projection", list(PROJECTION))
def test_inference_mode_matches_peft(projection):
    """In inference mode PEFT reads the prefix straight from the embedding; gradients still reach it."""
    peft_model, oracle = peft_twins(tiny_model(**HEADS["gqa"]), inference_mode=True, **PROJECTION[projection])
    for m in (peft_model, oracle):
        m.prompt_encoder.requires_grad_(True)
    fast = fastprefix.from_peft(peft_model)
    assert_same_step(fast, oracle, training_batch(torch.Generator().manual_seed(2)))


def test_explicit_position_ids_match_peft():
    """PEFT shifts given position ids by P; fastprefix's patched rotary embedding does the same."""
    peft_model, oracle = peft_twins(tiny_model(**HEADS["gqa"]))
    fast = fastprefix.from_peft(peft_model)
    ids, mask = padded_batch((8, 5), 8, torch.Generator().manual_seed(3))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = fast(input_ids=ids, attention_mask=mask, position_ids=positions)
        ref = oracle(input_ids=ids, attention_mask=mask, position_ids=positions)
    assert relative_error(out.logits, ref.logits) < 1e-5


def assert_generation_matches_oracle(fast, oracle, lengths=(7, 4, 2), new_tokens=20):
    """Left-padded batch: every row equals PEFT's forward-greedy oracle and the same row generated alone."""
    ids, mask = padded_batch(lengths, max(lengths), torch.Generator().manual_seed(4))
    width = ids.shape[1]
    out = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                        pad_token_id=0, return_dict_in_generate=True)
    for layer in cache_of(out).layers:
        assert layer.keys.shape[-2] == out.sequences.shape[1] - 1, "the cache must hold the sequence only"
    base = oracle.get_base_model()
    prefix_mattered = False
    for r, n in enumerate(lengths):
        row = ids[r:r + 1, width - n:]
        expected = greedy_by_forward(oracle, row, new_tokens)
        assert torch.equal(out.sequences[r:r + 1, width:], expected), f"row {r}"
        alone = fast.generate(input_ids=row, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert torch.equal(alone[:, n:], expected), f"row {r} alone"
        prefix_mattered |= not torch.equal(greedy_by_forward(base, row, new_tokens), expected)
    assert prefix_mattered, "the prefix must change the generated tokens, or this test cannot tell"


def test_generate_matches_forward_greedy_oracle(heads, projection):
    peft_model, oracle = peft_twins(tiny_model(**heads), **projection)
    assert_generation_matches_oracle(fastprefix.from_peft(peft_model), oracle)


def train(model_call, parameters, steps, seed=5):
    """`steps` AdamW steps fitting one padded batch; returns the losses."""
    optimizer = torch.optim.AdamW(parameters, lr=3e-2)
    batch = training_batch(torch.Generator().manual_seed(seed))
    losses = []
    for _ in range(steps):
        loss = model_call(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_loop_matches_peft():
    """30 prefix-tuning steps with an optimizer on peft_model.parameters(): the same loss curve as PEFT."""
    peft_model, oracle = peft_twins(tiny_model(**HEADS["gqa"]), **PROJECTION["projected"])
    peft_model.train(), oracle.train()
    fast = fastprefix.from_peft(peft_model)
    losses = train(fast, peft_model.parameters(), 30)
    expected = train(oracle, oracle.parameters(), 30)
    for step, (got, want) in enumerate(zip(losses, expected)):
        assert abs(got - want) / abs(want) < 1e-4, f"step {step}: {got} vs {want}"
    assert losses[-1] < 0.9 * losses[0], "training must make progress, or the curve comparison says little"


def test_generate_after_training_steps(heads):
    peft_model, oracle = peft_twins(tiny_model(**heads), **PROJECTION["plain"])
    fast = fastprefix.from_peft(peft_model)
    peft_model.train()
    train(fast, peft_model.parameters(), 3)
    peft_model.eval()
    oracle.load_state_dict(peft_model.state_dict())
    assert_generation_matches_oracle(fast, oracle, new_tokens=10)


@pytest.mark.parametrize("projection", list(PROJECTION))
def test_gradient_checkpointing_same_gradients(projection):
    """PEFT refuses checkpointing for prefix tuning; fastprefix gives the gradients PEFT gives without it."""
    peft_model, oracle = peft_twins(tiny_model(**HEADS["gqa"]), **PROJECTION[projection])
    peft_model.train(), oracle.train()
    quiet(peft_model.get_base_model().gradient_checkpointing_enable)
    calls = checkpointed_layers(peft_model.get_base_model())
    fast = fastprefix.from_peft(peft_model)
    assert_same_step(fast, oracle, training_batch(torch.Generator().manual_seed(6)))
    assert len(calls) == 2, "both layers must have run under checkpointing"


def test_reentrant_checkpointing_is_refused():
    peft_model, _ = peft_twins(tiny_model())
    peft_model.train()
    quiet(peft_model.get_base_model().gradient_checkpointing_enable,
          gradient_checkpointing_kwargs={"use_reentrant": True})
    fast = fastprefix.from_peft(peft_model)
    with pytest.raises(RuntimeError, match="use_reentrant=True.*use_reentrant': False"):
        fast(**training_batch(torch.Generator().manual_seed(7)))


def test_from_peft_makes_the_peft_model_itself_run_on_fastprefix_until_unpatched():
    """from_peft returns the PEFT model itself, still a PeftModelForCausalLM with PEFT's state dict, whose
    forward now runs on fastprefix with PEFT's logits; a second call returns it as it is; unpatch gives it back
    its own class and PEFT's own forward, bit for bit."""
    from peft import PeftModelForCausalLM

    peft_model, oracle = peft_twins(tiny_model())
    keys = list(peft_model.state_dict())
    fast = fastprefix.from_peft(peft_model)
    assert fast is peft_model and fastprefix.from_peft(peft_model) is fast
    assert isinstance(fast, PeftModelForCausalLM) and isinstance(fast, fastprefix.PeftPrefixModel)
    assert list(fast.state_dict()) == keys
    batch = training_batch(torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert relative_error(fast(**batch).logits, oracle(**batch).logits) < 1e-5
    assert fast.get_base_model().config._attn_implementation == "fastprefix"
    fast.unpatch()
    assert type(peft_model) is PeftModelForCausalLM
    assert peft_model.get_base_model().config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, oracle(**batch).logits)


def test_from_peft_rejects_other_models():
    with pytest.raises(TypeError, match="PeftModelForCausalLM"):
        fastprefix.from_peft(tiny_model())


def test_triton_backend_matches_peft(monkeypatch):
    """A smaller case on the Triton kernels (under TRITON_INTERPRET=1 on CPU), selected by FASTPREFIX_BACKEND."""
    reasons = unavailable_reasons("triton", torch.device("cpu"))
    if reasons:
        pytest.skip("Triton backend unavailable here: " + "; ".join(reasons))
    monkeypatch.setenv("FASTPREFIX_BACKEND", "triton")
    peft_model, oracle = peft_twins(tiny_model(**HEADS["gqa"], hidden=32), P=3, **PROJECTION["projected"])
    fast = fastprefix.from_peft(peft_model)
    assert_same_step(fast, oracle, training_batch(torch.Generator().manual_seed(9), lengths=(5, 3), width=5))
    assert_generation_matches_oracle(fast, oracle, lengths=(4, 2), new_tokens=4)
