"""The Triton kernels reading a prefix bank by row index (`bank_prefix_attention(..., backend="triton")`) against
the float64 oracle of each row alone, run on CPU tensors by Triton's interpreter (16 x 16 tiles there;
tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).

Entries of different lengths around the block size (an empty one, one over a block, one read by no row); the
general kernels (forward, lse, and the gradients of q, k, v and every entry) and the decode kernels (N = 1, 2),
masks, causal and padding; each entry's gradient bitwise the same run after run; a patched tiny LLaMA decoding
on the Triton kernels like the torch path; no entry gathered per row. Every buffer the launchers allocate is
NaN-poisoned first, so an element a kernel forgets to write shows.
"""

import warnings

import pytest
import torch

import fastprefix
from fastprefix import kernels
from fastprefix.kernels import common
from fastprefix.ops import bank_prefix_attention
from fastprefix.presets import tiny_llama
from fastprefix.testing import AllocationRecorder, compare, materialization_violations, relative_error
from helpers.bank import bank_oracle
from helpers.interpreter import device, poison_launchers
from helpers.llama import padded_batch

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1 before Triton is imported")

BLOCK = common.INTERPRETER_BLOCK
B, HQ, HKV, D = 6, 4, 2, 16
LENGTHS = (5, 0, BLOCK + 3, 3, 6)  # entry 1 is empty, entry 2 spans two key blocks, entry 4 is read by no row
INDEX = (2, 0, 2, 3, 1, 2)  # entry 2 three times, row 4 reads the empty entry

MASKS = {  # name -> (N, S, causal, key padding [B, S] or None)
    "none": (5, 7, False, None),
    # row 4 (empty entry) fully padded: it sees nothing at all; row 1 padded by 3
    "left padding": (5, 7, False, torch.arange(7) >= torch.tensor([0, 3, 0, 0, 7, 1])[:, None]),
    "causal N < S, padded": (3, 8, True, torch.arange(8) >= torch.tensor([0, 2, 0, 5, 0, 0])[:, None]),
    "causal N > S": (BLOCK + 2, 3, True, None),  # the first queries of a row see its entry only
    "no sequence keys": (2, 0, False, None),
}


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    poison_launchers(monkeypatch)


def bank_inputs(N, S, dtype, generator):
    """q, k, v and the entries' keys and values, standard normal in `dtype`, requiring gradients."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).to(device()).requires_grad_()

    q, k, v = randn(B, HQ, N, D), randn(B, HKV, S, D), randn(B, HKV, S, D)
    return q, k, v, [randn(HKV, P, D) for P in LENGTHS], [randn(HKV, P, D) for P in LENGTHS]


def padding(mask):
    return None if mask is None else mask[:, None, None, :].to(device())


def flat(inputs):
    q, k, v, bank_k, bank_v = inputs
    return [q, k, v, *bank_k, *bank_v]


def comparisons(inputs, index, causal, mask, out, lse, grads=None, dout=None):
    """out, lse (and the gradients of every input, for `dout`) against the float64 oracle, element-wise, each
    within what the same math achieves in the inputs' dtype (`fastprefix.testing.compare`)."""
    tensors = flat(inputs)
    T = len(LENGTHS)

    def run_oracle(dtype):
        copies = [t.detach().cpu().to(dtype).requires_grad_() for t in tensors]
        o, l = bank_oracle(*copies[:3], copies[3:3 + T], copies[3 + T:], index.cpu(), causal,
                           None if mask is None else mask.cpu(), dtype)
        if dout is None:
            return o, l, []
        return o, l, torch.autograd.grad(o, copies, dout.cpu().to(dtype), allow_unused=True)

    dtype = tensors[0].dtype
    ref_out, ref_lse, ref_grads = run_oracle(torch.float64)
    same_out, same_lse, same_grads = run_oracle(dtype)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), empty), "rows that see no key differ from the oracle's"
    found = [compare("out", out.cpu(), ref_out, same_out), compare("lse", lse.cpu(), ref_lse, same_lse, valid=~empty)]
    names = ["dq", "dk", "dv"] + [f"d{kv}[{t}]" for kv in "kv" for t in range(T)]
    for name, g, rg, sg, t in zip(names, grads or [], ref_grads, same_grads, tensors):
        assert g.shape == t.shape and g.dtype == dtype, name
        rg = torch.zeros(t.shape, dtype=torch.float64) if rg is None else rg
        sg = torch.zeros(t.shape, dtype=dtype) if sg is None else sg
        found.append(compare(name, g.cpu(), rg, sg))
    return [str(c) for c in found if not c.ok]


class Spy:
    """Counts the calls of a launcher of `fastprefix.kernels`."""

    def __init__(self, monkeypatch, name):
        self.fn, self.calls = getattr(kernels, name), 0
        monkeypatch.setattr(kernels, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


CASES = [(masks, torch.float32) for masks in MASKS] + [("causal N < S, padded", torch.float16),
                                                       ("left padding", torch.bfloat16)]


@pytest.mark.parametrize("masks, dtype", CASES, ids=[f"{m}-{str(d)[6:]}" for m, d in CASES])
def test_matches_each_row_alone(masks, dtype, monkeypatch):
    """The general kernels: out, lse and the gradients of q, k, v and every entry (an entry's oracle gradient is
    the sum over the rows that read it; zero for an entry no row reads)."""
    forward = Spy(monkeypatch, "attention_forward")
    N, S, causal, mask = MASKS[masks]
    gen = torch.Generator().manual_seed(0)
    inputs = bank_inputs(N, S, dtype, gen)
    index = torch.tensor(INDEX, device=device())
    out, lse = bank_prefix_attention(*inputs, index, causal=causal, attn_mask=padding(mask), return_lse=True,
                                     backend="triton")
    assert forward.calls == 1 and out.dtype == dtype and lse.dtype == torch.float32
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype).to(device())
    grads = torch.autograd.grad(out, flat(inputs), dout)
    assert comparisons(inputs, index, causal, padding(mask), out, lse, grads, dout) == []
    assert not grads[3 + 4].any() and not grads[3 + len(LENGTHS) + 4].any()  # entry 4: read by no row


@pytest.mark.parametrize("N", [1, 2])
@pytest.mark.parametrize("masks", ["none", "left padding", "causal N < S, padded"])
def test_decode_matches_each_row_alone(N, masks, monkeypatch):
    """Without gradients and with few queries per row: the decode kernels (each entry against the stacked queries
    of its rows), against the oracle; the general forward does not run."""
    decode, forward = Spy(monkeypatch, "decode_forward"), Spy(monkeypatch, "attention_forward")
    _, S, causal, mask = MASKS[masks]
    inputs = bank_inputs(N, S, torch.float32, torch.Generator().manual_seed(1))
    index = torch.tensor(INDEX, device=device())
    with torch.no_grad():
        out, lse = bank_prefix_attention(*inputs, index, causal=causal, attn_mask=padding(mask), return_lse=True,
                                         backend="triton")
    assert (decode.calls, forward.calls) == (1, 0)
    assert comparisons(inputs, index, causal, padding(mask), out, lse) == []


def test_decode_stacks_the_rows_of_an_entry_over_several_tiles(monkeypatch):
    """More rows read one entry than a tile of stacked queries holds (12 rows x 2 query heads per KV head = 24
    > 16): the entry's rows span two tiles, another entry's rows one; entries split over several key ranges."""
    monkeypatch.setattr(common, "INTERPRETER_PROGRAMS", 64)
    global_index = torch.tensor([0] * 12 + [1] * 3, device=device())
    gen = torch.Generator().manual_seed(2)
    rows = len(global_index)
    q = torch.randn(rows, HQ, 1, D, generator=gen).to(device())
    k, v = (torch.randn(rows, HKV, 4, D, generator=gen).to(device()) for _ in "kv")
    bank_k = [torch.randn(HKV, P, D, generator=gen).to(device()) for P in (70, 9)]
    bank_v = [torch.randn(HKV, P, D, generator=gen).to(device()) for P in (70, 9)]
    with torch.no_grad():
        out, lse = bank_prefix_attention(q, k, v, bank_k, bank_v, global_index, return_lse=True, backend="triton")
    ref_out, ref_lse = bank_oracle(q, k, v, bank_k, bank_v, global_index, False, None, torch.float64)
    assert relative_error(out, ref_out) < 1e-6 and relative_error(lse, ref_lse) < 1e-6


def test_entry_gradients_are_deterministic():
    """No atomics: an entry's gradient is summed over its rows in a fixed order, bitwise the same run after run."""
    inputs = bank_inputs(9, 11, torch.float16, torch.Generator().manual_seed(3))
    index = torch.tensor(INDEX, device=device())
    dout = torch.randn(B, HQ, 9, D, dtype=torch.float16, device=device())

    def grads():
        out = bank_prefix_attention(*inputs, index, causal=True, backend="triton")
        return torch.autograd.grad(out, flat(inputs), dout)

    first = grads()
    assert all(torch.equal(a, b) for a, b in zip(first, grads()))


def test_dropout_gradients_are_those_of_the_forward():
    """With dropout (the seed fixed per call): the directional derivative (f(x + eps d) - f(x - eps d)) / 2 eps . dO
    over all inputs at once equals sum grad . d. A backward that drew another mask than its forward misses by
    O(1)."""
    inputs = bank_inputs(5, 7, torch.float32, torch.Generator().manual_seed(4))
    index = torch.tensor(INDEX, device=device())
    mask = padding(MASKS["left padding"][3])

    def attention(tensors):
        torch.manual_seed(5)
        T = len(LENGTHS)
        return bank_prefix_attention(*tensors[:3], tensors[3:3 + T], tensors[3 + T:], index, causal=True,
                                     attn_mask=mask, dropout_p=0.3, backend="triton")

    tensors = flat(inputs)
    out = attention(tensors)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, dout)
    directions = [torch.randn_like(t) for t in tensors]
    eps = 1e-2
    with torch.no_grad():
        plus = attention([t + eps * d for t, d in zip(tensors, directions)])
        minus = attention([t - eps * d for t, d in zip(tensors, directions)])
    numeric = ((plus - minus) * dout).sum().item() / (2 * eps)
    analytic = sum((g * d).sum().item() for g, d in zip(grads, directions))
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)


def test_auto_stays_on_the_torch_path_on_cpu(monkeypatch):
    """'auto' picks the Triton kernels for CUDA tensors only, as for one prefix: on the CPU, the torch path."""
    if device() != "cpu":
        pytest.skip("the CPU choice")
    forward, decode = Spy(monkeypatch, "attention_forward"), Spy(monkeypatch, "decode_forward")
    inputs = bank_inputs(2, 3, torch.float32, torch.Generator().manual_seed(6))
    index = torch.tensor(INDEX)
    bank_prefix_attention(*inputs, index)
    with torch.no_grad():
        bank_prefix_attention(*inputs, index)
    assert (forward.calls, decode.calls) == (0, 0)


# ------------------------------------------------------------------------------------------------ the model

def generate(model, ids, mask, new_tokens):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)


def test_patched_model_decodes_on_the_triton_kernels_like_the_torch_path(monkeypatch):
    """A tiny LLaMA (GQA) patched with bank rows (prompts of 9, 4, 15 tokens; 4 left-padded suffixes): greedy
    generation on backend='triton' (prefill and step on the decode kernels, N <= 16) gives the torch path's tokens
    and logits."""
    decode = Spy(monkeypatch, "decode_forward")
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=gen) for n in (9, 4, 15)]
    bank = fastprefix.PrefixBank([fastprefix.Prefix.from_prompt(model, p) for p in prompts])
    ids, mask = padded_batch((5, 3, 7, 2), 7, gen, vocab=model.config.vocab_size)
    runs = {}
    for backend in ("torch", "triton"):
        with fastprefix.patched(model, bank.rows(torch.tensor([2, 0, 2, 1])), backend=backend):
            runs[backend] = generate(model, ids, mask, 2)
    assert decode.calls == 2 * model.config.num_hidden_layers
    assert torch.equal(runs["triton"].sequences, runs["torch"].sequences)
    for got, want in zip(runs["triton"].logits, runs["torch"].logits):
        assert relative_error(got, want) < 1e-5


def test_no_entry_is_gathered_per_row():
    """Training (the general kernels, forward and backward) and decoding (the decode kernels) produce no tensor
    that holds an entry per row, nor keys concatenated with an entry (`fastprefix.testing`). The entries' gradients
    are views of one buffer of their sum P_t rows (53), fewer than a copy of any entry per row (5 x 13)."""
    rows, Hq, Hkv, N, S, D, lengths = 5, 4, 2, 11, 11, 12, (17, 13, 23)
    index = torch.tensor([0, 2, 0, 1, 0], device=device())
    gen = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device()).requires_grad_()

    q, k, v = randn(rows, Hq, N, D), randn(rows, Hkv, S, D), randn(rows, Hkv, S, D)
    bank_k, bank_v = [randn(Hkv, P, D) for P in lengths], [randn(Hkv, P, D) for P in lengths]
    with AllocationRecorder() as recorder:
        out = bank_prefix_attention(q, k, v, bank_k, bank_v, index, causal=True, backend="triton")
        out.backward(torch.randn_like(out))
        with torch.no_grad():
            bank_prefix_attention(q[:, :, :1], k, v, bank_k, bank_v, index, causal=True, backend="triton")
    bad = []
    for P in lengths:
        bad += materialization_violations(recorder.produced, B=rows, Hq=Hq, Hkv=Hkv, N=N, S=S, P=P, D=D, itemsize=4,
                                          shared=True)
    assert bad == []
