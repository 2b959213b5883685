"""The parity check every PEFT-parity test uses (LLaMA and T5)."""

from fastprefix.testing import relative_error


def trainable_grads(peft_model):
    return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


def assert_same_step(fast, oracle, inputs):
    """One forward + backward of both; logits and loss < 1e-5, every trainable gradient < 1e-4."""
    out, ref = fast(**inputs), oracle(**inputs)
    assert relative_error(out.logits, ref.logits) < 1e-5
    assert relative_error(out.loss, ref.loss) < 1e-5
    out.loss.backward()
    ref.loss.backward()
    grads, expected = trainable_grads(fast.peft_model), trainable_grads(oracle)
    assert grads.keys() == expected.keys() and grads
    for name in grads:
        assert relative_error(grads[name], expected[name]) < 1e-4, name
