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


@pytest.fixture
def simulate_gpu(monkeypatch):
    """simulate_gpu(arch, smem_bytes=None): torch.cuda answers as a GPU of compute capability `arch` (80 = 8.0)
    with `smem_bytes` of shared memory per block (the architecture's own by default). The dispatcher's cache of
    launch reasons is emptied each time and after the test."""
    from types import SimpleNamespace

    from fastprefix.kernels.tuning import ARCH_SHARED_MEMORY

    def simulate(arch, smem_bytes=None):
        smem = smem_bytes or ARCH_SHARED_MEMORY.get(arch, 48 * 1024)
        properties = SimpleNamespace(shared_memory_per_block_optin=smem)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: divmod(arch, 10))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
        dispatch._unlaunchable.cache_clear()

    yield simulate
    dispatch._unlaunchable.cache_clear()


def cuda_call(D=64, dtype=torch.float16, B=2, Hq=4, N=128, needs_grad=True, bias_grad=False, features=frozenset()):
    dims = fastprefix.checks.Dims(B=B, Hq=Hq, Hkv=2, N=N, S=128, P=16, D=D, shared=True)
    return dispatch.Call(dims, dtype, torch.device("cuda", 0), 0.0, needs_grad, bias_grad, frozenset(features))


def triton_reasons(call):
    return {impl.name: impl.not_supported_reasons(call) for impl in dispatch.implementations("triton")}


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_every_supported_gpu_launches_every_head_dim_in_16_bits(arch, simulate_gpu):
    """fp16 and bf16 at D = 64, 128, 256 with every feature and every gradient; float32 goes to torch on GPUs,
    with the reason."""
    simulate_gpu(arch)
    for D in (64, 128, 256):
        for dtype in (torch.float16, torch.bfloat16):
            call = cuda_call(D, dtype, bias_grad=True, features={"mask", "bias", "dropout"})
            assert triton_reasons(call)["triton"] == [], (D, dtype)
        decode = triton_reasons(cuda_call(min(D, 128), torch.bfloat16, N=1, needs_grad=False, features={"mask"}))
        assert decode["triton-decode"] == []
    from fastprefix.kernels.tuning import FLOAT32_ON_GPUS

    assert triton_reasons(cuda_call(64, torch.float32))["triton"] == [FLOAT32_ON_GPUS]
    assert dispatch.select("auto", cuda_call(64, torch.float32)).name == "torch-explicit"


def test_auto_runs_torch_with_the_reason_where_no_launch_fits(simulate_gpu, debug_log):
    """A GPU with 16 KiB of shared memory per block fits no tile at D = 256: auto passes over Triton with the
    reason, and backend="triton" refuses the call with it."""
    simulate_gpu(86, smem_bytes=16 * 1024)
    call = cuda_call(256, torch.bfloat16)
    reasons = triton_reasons(call)["triton"]
    assert reasons and all("fits sm_86 (16 KiB of shared memory per block) at BLOCK_D 256 in 16-bit" in r
                           for r in reasons)
    assert any("Triton fwd kernel" in r for r in reasons)
    assert dispatch.select("auto", call).name == "torch-explicit"
    assert "passed over triton: no launch config of the Triton fwd kernel fits sm_86" in debug_log.text
    with pytest.raises(ValueError, match="backend 'triton' cannot take these inputs.*no launch config"):
        dispatch.select("triton", call)


def test_rocm_and_pre_ampere_gpus_are_refused_with_the_reason(simulate_gpu, monkeypatch):
    simulate_gpu(75)
    assert "compute capability 8.0 or newer" in dispatch.unavailable_reasons("triton", torch.device("cuda"))[0]
    assert dispatch.select("auto", cuda_call()).backend == "torch"
    simulate_gpu(90)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "ROCm (HIP)" in dispatch.unavailable_reasons("triton", torch.device("cuda"))[0]
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on cuda:0.*ROCm"):
        dispatch.select("triton", cuda_call())


def test_rows_and_heads_beyond_cuda_grid_limits_go_to_torch(simulate_gpu):
    simulate_gpu(90)
    for B, Hq in ((70_000, 4), (2, 70_000)):
        reasons = triton_reasons(cuda_call(B=B, Hq=Hq))["triton"]
        assert any("more than the 65535 CUDA's grid takes" in r for r in reasons), reasons
    assert triton_reasons(cuda_call(B=65_535))["triton"] == []
