"""Mixed precision: under `torch.autocast("cpu", dtype=torch.bfloat16)` a float32 model runs through fastprefix
as plain transformers runs it (attention in bfloat16, SDPA's policy), for every entry point (the op,
`Prefix.from_prompt`, `from_peft` on LLaMA and T5, a `TrainablePrefix` patched into LLaMA and into every T5
attention kind), forward, training step and generate, against PEFT, plain transformers or a concatenating
oracle under the same autocast; gradients reach the float32 parameters in float32."""

import copy

import pytest
import torch
from peft import PeftModel

import fastprefix
from fastprefix.testing import Case, make_inputs, relative_error
from helpers.llama import VOCAB, padded_batch, peft_twins, tiny_model
from helpers.t5 import batch as t5_batch
from helpers.t5 import concatenating_oracle, t5_twins, tiny_t5

BF16 = 2e-2  # relative error bfloat16 attention allows against another bfloat16 implementation


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_the_op_computes_in_the_autocast_dtype(backend):
    """float32 inputs (a float64 bias would be left alone): the result is bfloat16, equal to the op on the inputs
    cast to bfloat16, and the gradients reach the float32 tensors."""
    inp = make_inputs(Case(B=2, Hq=4, Hkv=2, N=5, S=7, P=3, D=16, causal=True, bias="heads", bias_grad=True))
    with autocast():
        out = fastprefix.prefix_attention(*inp.tensors, **inp.options, backend=backend)
    cast = [t.detach().bfloat16().requires_grad_() for t in inp.grad_targets()]  # the same path: gradients on
    expected = fastprefix.prefix_attention(*cast[:5], causal=True, attn_bias=cast[5], backend=backend)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    grads = torch.autograd.grad(out.float().sum(), inp.grad_targets())
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def step(model, inputs):
    """Forward under autocast, backward outside it (as a training loop does)."""
    with autocast():
        out = model(**inputs)
    out.loss.backward()
    return out


def forward(model, inputs):
    with autocast():
        return model(**inputs)


def assert_same_step(got, want):
    assert got.logits.dtype == want.logits.dtype == torch.bfloat16
    assert relative_error(got.loss, want.loss) < BF16 and relative_error(got.logits, want.logits) < BF16


def assert_float32_gradients(parameters):
    grads = [p.grad for p in parameters if p.requires_grad]
    assert grads and all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def assert_generate_matches_forward(generate, oracle, inputs, new_tokens=5):
    """Greedy generate under autocast: its logits at every new token equal the oracle's forward over the whole
    generated sequence, without a cache, under the same autocast (tokens themselves could flip on a bf16 tie)."""
    with autocast(), torch.no_grad():
        out = generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       return_dict_in_generate=True, output_logits=True)
        logits = torch.stack(out.logits, dim=1)
        if oracle.config.is_encoder_decoder:
            want = oracle(**inputs, decoder_input_ids=out.sequences[:, :-1]).logits
        else:
            n = inputs["input_ids"].shape[1]
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(out.sequences[:, n:])], dim=1)
            want = oracle(input_ids=out.sequences[:, :-1], attention_mask=mask[:, :-1]).logits[:, n - 1:]
    assert logits.shape == want.shape and relative_error(logits.float(), want.float()) < BF16


def llama_inputs(seed=0, lengths=(7, 5, 2)):
    ids, mask = padded_batch(lengths, max(lengths), torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def prompt_inputs(inputs):
    return {k: inputs[k] for k in ("input_ids", "attention_mask")}


def unpadded_prompts(seed=5):
    """Rows of one length: generate gives left-padded rows position ids counted from their first token, which a
    forward without position ids does not."""
    return prompt_inputs(llama_inputs(seed, lengths=(6, 6)))


def test_from_peft_on_llama_under_autocast():
    peft_model, oracle = peft_twins(tiny_model())
    fast, inputs = fastprefix.from_peft(peft_model), llama_inputs()
    assert_same_step(step(fast, inputs), step(oracle, inputs))
    assert_float32_gradients(fast.parameters())
    for (name, p), (_, q) in zip(fast.named_parameters(), oracle.named_parameters()):
        if p.requires_grad:
            assert relative_error(p.grad, q.grad) < 5 * BF16, name
    assert_generate_matches_forward(fast.generate, oracle, unpadded_prompts())


def test_trainable_prefix_patched_into_llama_under_autocast(tmp_path):
    """The oracle: plain PEFT loading the prefix as the adapter `save_pretrained` writes."""
    model = tiny_model()
    trainable = fastprefix.TrainablePrefix(model, length=4)
    trainable.save_pretrained(tmp_path)
    oracle = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    inputs = llama_inputs(1)
    with trainable.patched(model):
        got = step(model, inputs)
        assert_generate_matches_forward(model.generate, oracle, unpadded_prompts())
    with torch.no_grad():
        assert_same_step(got, forward(oracle, inputs))
    assert_float32_gradients(trainable.parameters())


def test_from_prompt_under_autocast_matches_the_concatenation():
    model = tiny_model()
    prompt = torch.randint(1, VOCAB, (8,), generator=torch.Generator().manual_seed(1))
    suffix = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    with autocast(), torch.no_grad():
        prefix = fastprefix.Prefix.from_prompt(model, prompt)
        with fastprefix.patched(model, prefix):
            got = model(input_ids=suffix).logits
            out = model.generate(input_ids=suffix, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True, output_logits=True)
        want = model(input_ids=torch.cat([prompt[None], out.sequences[:, :-1]], dim=1)).logits[:, prompt.shape[0]:]
    assert got.dtype == torch.bfloat16 and relative_error(got, want[:, :5]) < BF16
    assert relative_error(torch.stack(out.logits, dim=1).float(), want[:, 4:].float()) < BF16


def test_from_peft_on_t5_under_autocast():
    peft_model, oracle = t5_twins(tiny_t5(dropout_rate=0.0))
    fast, inputs = fastprefix.from_peft(peft_model), t5_batch(torch.Generator().manual_seed(3))
    assert_same_step(step(fast, inputs), step(oracle, inputs))
    assert_float32_gradients(fast.parameters())
    assert_generate_matches_forward(fast.generate, oracle, prompt_inputs(inputs))


def test_trainable_prefix_in_every_t5_attention_kind_under_autocast():
    model = tiny_t5(dropout_rate=0.0)
    trainable = fastprefix.TrainablePrefix(model, length=3)
    inputs = t5_batch(torch.Generator().manual_seed(4))
    with trainable.patched(model):
        got = step(model, inputs)
    assert_float32_gradients(trainable.parameters())
    with concatenating_oracle(model, trainable.prefix()), torch.no_grad():
        assert_same_step(got, forward(model, inputs))
