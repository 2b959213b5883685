"""The dispatcher: which implementation runs a call, why the others were passed over (DEBUG log), no fallback
for a backend named explicitly, and `backend=` on every entry point that patches a model."""

import logging
import re

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model

import fastprefix
from fastprefix import dispatch, kernels
from fastprefix.testing import Case, make_inputs, relative_error
from helpers.llama import VOCAB, padded_batch, tiny_model
from helpers.t5 import VOCAB as T5_VOCAB
from helpers.t5 import tiny_t5


def ran(caplog) -> list[str]:
    """The implementations that ran, in order, from the DEBUG log."""
    return re.findall(r"prefix_attention: (\S+) ran", caplog.text)


@pytest.fixture
def debug_log(caplog):
    caplog.set_level(logging.DEBUG, logger="fastprefix")
    return caplog


@pytest.mark.parametrize("backend, options, expected", [
    ("auto", {}, "torch-flash"),
    ("auto", {"dropout_p": 0.1}, "torch-explicit"),
    ("torch", {}, "torch-flash"),
    ("triton", {}, "triton"),
    ("reference", {}, "reference"),
])
def test_the_log_names_what_ran_and_why_the_others_did_not(backend, options, expected, debug_log):
    inp = make_inputs(Case(B=2, Hq=4, Hkv=2, N=5, S=7, P=3, D=16))
    fastprefix.prefix_attention(*inp.tensors, **inp.options, **options, backend=backend)
    assert ran(debug_log) == [expected]
    line = debug_log.records[-1].getMessage()
    assert "B=2 Hq=4 Hkv=2 N=5 S=7 P=3 D=16" in line
    if expected == "torch-explicit":
        assert "passed over torch-flash: dropout_p = 0.1, torch-flash has no dropout" in line
    if backend == "auto":
        assert "passed over triton: auto picks triton for cuda tensors only" in line
    if backend == "triton":
        assert "passed over triton-decode: gradients are needed" in line


def test_decoding_without_gradients_runs_the_decode_kernels(debug_log):
    inp = make_inputs(Case(B=2, Hq=4, Hkv=2, N=1, S=7, P=3, D=16), requires_grad=False)
    fastprefix.prefix_attention(*inp.tensors, backend="triton")
    assert ran(debug_log) == ["triton-decode"]


def test_an_explicit_backend_never_falls_back():
    """float64 is beyond both Triton implementations: the error names each and its reasons, and the call
    is not run elsewhere."""
    inp = make_inputs(Case(B=1, Hq=2, Hkv=2, N=3, S=4, P=2, D=16), torch.float64)
    with pytest.raises(ValueError) as info:
        fastprefix.prefix_attention(*inp.tensors, backend="triton")
    message = str(info.value)
    assert "(triton-decode: `q` must be float16, bfloat16, float32" in message
    assert "(triton: `q` must be float16, bfloat16, float32 for triton, got torch.float64; use backend='torch')" \
        in message


def test_nothing_is_logged_above_debug(caplog):
    caplog.set_level(logging.INFO, logger="fastprefix")
    inp = make_inputs(Case(B=1, Hq=2, Hkv=2, N=3, S=4, P=2, D=16))
    fastprefix.prefix_attention(*inp.tensors)
    assert caplog.records == []


def test_every_implementation_states_its_limits():
    limits = {impl.name: impl.limits() for impl in dispatch.IMPLEMENTATIONS}
    assert ("head dim <= 128; <= 16 queries per row; no gradients, no dropout, no bias gradient"
            in limits["triton-decode"])
    assert "head dim <= 256; gradients, dropout, bias gradient" in limits["triton"]
    assert limits["torch-flash"].startswith("CPU tensors") and "no dropout, no bias gradient" in limits["torch-flash"]
    assert set(dispatch.AUTO_PRIORITY) == set(limits) - {"reference"}


def llama_and_prefix():
    model = tiny_model()
    c = model.config
    make = lambda: [torch.randn(c.num_key_value_heads, 4, c.hidden_size // c.num_attention_heads)
                    for _ in range(c.num_hidden_layers)]
    return model, fastprefix.Prefix(make(), make())


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_patch_runs_every_attention_call_on_its_backend(backend, debug_log):
    model, prefix = llama_and_prefix()
    ids, mask = padded_batch((6, 4), 6, torch.Generator().manual_seed(0))
    with torch.no_grad():
        with fastprefix.patched(model, prefix):
            expected = model(input_ids=ids, attention_mask=mask).logits
        debug_log.clear()
        with fastprefix.patched(model, prefix, backend=backend):
            out = model(input_ids=ids, attention_mask=mask).logits
    assert {name.split("-")[0] for name in ran(debug_log)} == {backend}
    assert len(ran(debug_log)) == model.config.num_hidden_layers
    assert relative_error(out, expected) < 1e-5


def test_the_environment_variable_replaces_auto_only(monkeypatch, debug_log):
    model, prefix = llama_and_prefix()
    ids = torch.randint(1, VOCAB, (1, 5))
    monkeypatch.setenv("FASTPREFIX_BACKEND", "reference")
    with torch.no_grad():
        with fastprefix.patched(model, prefix):
            model(input_ids=ids)
        assert set(ran(debug_log)) == {"reference"}
        debug_log.clear()
        with fastprefix.patched(model, prefix, backend="torch"):
            model(input_ids=ids)
    assert set(ran(debug_log)) == {"torch-flash"}


@pytest.mark.parametrize("entry", ["patch", "patched", "from_peft", "TrainablePrefix", "from_prompt"])
def test_entry_points_refuse_a_bad_backend_first(entry, monkeypatch):
    """An unknown name (ValueError) and a backend that cannot run on the model's device (RuntimeError) are
    refused before anything is patched; the model is left as it was."""
    model, prefix = llama_and_prefix()
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    for backend, error, words in (("cuda", ValueError, "unknown backend 'cuda'"),
                                  ("triton", RuntimeError, "TRITON_INTERPRET=1")):
        with pytest.raises(error, match=words):
            if entry == "patch":
                fastprefix.patch(model, prefix, backend=backend)
            elif entry == "patched":
                with fastprefix.patched(model, prefix, backend=backend):
                    pass
            elif entry == "from_peft":
                fastprefix.from_peft(get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=3)), backend=backend)
            elif entry == "TrainablePrefix":
                fastprefix.TrainablePrefix(model, length=3, backend=backend)
            else:
                fastprefix.Prefix.from_prompt(model, torch.randint(1, VOCAB, (4,)), backend=backend)
        assert model.config._attn_implementation == "sdpa"


def test_from_peft_trainable_and_from_prompt_run_on_their_backend(debug_log):
    model = tiny_model()
    peft_model = get_peft_model(tiny_model(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids = torch.randint(1, VOCAB, (2, 5))
    with torch.no_grad():
        fastprefix.from_peft(peft_model, backend="reference")(input_ids=ids)
        assert set(ran(debug_log)) == {"reference"}
        debug_log.clear()
        fastprefix.Prefix.from_prompt(model, ids[0], backend="reference")
        assert set(ran(debug_log)) == {"reference"}
        debug_log.clear()
        t5 = tiny_t5()
        trainable = fastprefix.TrainablePrefix(t5, length=3, backend="reference")
        t5_ids = torch.randint(1, T5_VOCAB, (2, 5))
        with trainable.patched(t5):
            t5(input_ids=t5_ids, decoder_input_ids=t5_ids)
    assert set(ran(debug_log)) == {"reference"}
