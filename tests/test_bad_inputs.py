"""Every bad argument fails before any compute, naming the argument, what was expected and what was given."""

import pytest
import torch

from fastprefix import dispatch, prefix_attention

B, HQ, HKV, N, S, P, D = 2, 4, 2, 5, 7, 3, 16


def good():
    return dict(q=torch.randn(B, HQ, N, D), k=torch.randn(B, HKV, S, D), v=torch.randn(B, HKV, S, D),
                prefix_k=torch.randn(HKV, P, D), prefix_v=torch.randn(HKV, P, D))


def good_in(dtype, head_dim=D):
    return {name: t.new_empty(*t.shape[:-1], head_dim).normal_().to(dtype) for name, t in good().items()}


def call(**changes):
    args = good()
    args.update(changes)
    tensors = [args.pop(name) for name in ("q", "k", "v", "prefix_k", "prefix_v")]
    return prefix_attention(*tensors, **args)


CASES = [
    # (id, changes, exception, fragments the message must contain)
    ("q_rank", dict(q=torch.randn(B, N, D)), ValueError, ["`q`", "[B, Hq, N, D]", "3-D"]),
    ("k_rank", dict(k=torch.randn(B, HKV, S, D, 1)), ValueError, ["`k`", "[B, Hkv, S, D]", "5-D"]),
    ("prefix_rank", dict(prefix_k=torch.randn(P, D)), ValueError, ["`prefix_k`", "[Hkv, P, D]", "2-D"]),
    ("prefix_ranks_differ", dict(prefix_k=torch.randn(B, HKV, P, D)), ValueError, ["`prefix_k`", "`prefix_v`"]),
    ("k_batch", dict(k=torch.randn(B + 1, HKV, S, D)), ValueError, ["`k`", "batch size = 3", "expected 2"]),
    ("v_head_dim", dict(v=torch.randn(B, HKV, S, D + 1)), ValueError, ["`v`", "head dim = 17", "expected 16"]),
    ("v_heads", dict(v=torch.randn(B, HKV + 1, S, D)), ValueError, ["`v`", "head count = 3", "expected 2"]),
    ("v_length", dict(v=torch.randn(B, HKV, S + 1, D)), ValueError, ["`v`", "sequence length = 8", "expected 7"]),
    ("gqa_ratio", dict(q=torch.randn(B, 3, N, D)), ValueError, ["`q`", "3 heads", "multiple", "2 KV heads"]),
    ("prefix_heads", dict(prefix_k=torch.randn(HKV + 1, P, D), prefix_v=torch.randn(HKV + 1, P, D)), ValueError,
     ["`prefix_k`", "head count = 3", "expected 2"]),
    ("prefix_head_dim", dict(prefix_v=torch.randn(HKV, P, D * 2)), ValueError,
     ["`prefix_v`", "head dim = 32", "expected 16"]),
    ("prefix_lengths", dict(prefix_v=torch.randn(HKV, P + 1, D)), ValueError,
     ["`prefix_v`", "prefix length = 4", "expected 3"]),
    ("per_row_prefix_batch", dict(prefix_k=torch.randn(B + 1, HKV, P, D), prefix_v=torch.randn(B + 1, HKV, P, D)),
     ValueError, ["`prefix_k`", "batch size = 3", "expected 2", "[Hkv, P, D]"]),
    ("k_dtype", dict(k=torch.randn(B, HKV, S, D, dtype=torch.float16)), TypeError,
     ["`k`", "torch.float16", "torch.float32", ".to(torch.float32)"]),
    ("prefix_dtype", dict(prefix_v=torch.randn(HKV, P, D, dtype=torch.bfloat16)), TypeError,
     ["`prefix_v`", "torch.bfloat16"]),
    ("q_int", dict(q=torch.ones(B, HQ, N, D, dtype=torch.int64)), TypeError, ["`q`", "torch.int64"]),
    ("k_device", dict(k=torch.randn(B, HKV, S, D, device="meta")), ValueError,
     ["`k`", "meta", "cpu", "k.to('cpu')"]),
    ("mask_device", dict(attn_mask=torch.ones(S, dtype=torch.bool, device="meta")), ValueError,
     ["`attn_mask`", "meta"]),
    ("not_a_tensor", dict(v=[[1.0]]), TypeError, ["`v`", "torch.Tensor", "list"]),
    ("empty_q", dict(q=torch.randn(B, HQ, 0, D)), ValueError, ["`q`", "non-empty"]),
    ("mask_dtype", dict(attn_mask=torch.ones(B, 1, 1, S)), TypeError, ["`attn_mask`", "bool", "torch.float32",
                                                                     "attn_bias"]),
    ("mask_shape", dict(attn_mask=torch.ones(B, 1, 1, S + P, dtype=torch.bool)), ValueError,
     ["`attn_mask`", "[2, 1, 1, 10]", "[B, Hq, N, S] = [2, 4, 5, 7]"]),
    ("mask_rank", dict(attn_mask=torch.ones(1, B, 1, 1, S, dtype=torch.bool)), ValueError, ["`attn_mask`"]),
    ("bias_shape", dict(attn_bias=torch.randn(1, HQ, N, S)), ValueError,
     ["`attn_bias`", "[1, 4, 5, 7]", "[B, Hq, N, P + S] = [2, 4, 5, 10]"]),
    ("bias_dtype", dict(attn_bias=torch.randn(1, HQ, N, P + S, dtype=torch.float64)), TypeError,
     ["`attn_bias`", "torch.float64", "torch.float32"]),
    ("negative_dropout", dict(dropout_p=-0.1), ValueError, ["`dropout_p`", "[0, 1)", "-0.1"]),
    ("dropout_one", dict(dropout_p=1.0), ValueError, ["`dropout_p`", "1.0"]),
    ("scale_nan", dict(scale=float("nan")), ValueError, ["`scale`", "nan"]),
    ("causal_not_bool", dict(causal=1), TypeError, ["`causal`", "bool", "int"]),
    ("unknown_backend", dict(backend="flash"), ValueError, ["backend", "'flash'", "'torch'", "'reference'"]),
    ("triton_float64", dict(good_in(torch.float64), backend="triton"), ValueError,
     ["'triton'", "`q`", "torch.float64", "backend='torch'"]),
    ("triton_head_dim", dict(good_in(torch.float32, head_dim=264), backend="triton"), ValueError,
     ["'triton'", "head dim D = 264", "D <= 256", "backend='torch'"]),
]


@pytest.mark.parametrize("changes, exception, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_explained(changes, exception, fragments):
    with pytest.raises(exception) as info:
        call(**changes)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"


def test_bad_env_backend(monkeypatch):
    monkeypatch.setenv("FASTPREFIX_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTPREFIX_BACKEND='cuda'"):
        call()


def test_env_backend_selects(monkeypatch):
    """FASTPREFIX_BACKEND overrides backend="auto"."""
    calls = []
    monkeypatch.setattr(dispatch, "reference_attention", lambda *a, **kw: calls.append(1) or (a[0], a[0][..., 0]))
    monkeypatch.setenv("FASTPREFIX_BACKEND", "reference")
    call()
    assert calls == [1]


def test_checks_run_before_compute(monkeypatch):
    """A bad mask is rejected before either segment is computed."""
    monkeypatch.setattr(dispatch, "torch_prefix_attention", lambda *a, **kw: pytest.fail("computed before checking"))
    with pytest.raises(ValueError):
        call(attn_mask=torch.ones(3, 1, 1, S, dtype=torch.bool))


def test_triton_on_cpu_without_the_interpreter(monkeypatch):
    """Triton's interpreter is fixed when fastprefix.kernels is imported; without it, CPU tensors are
    refused with the way out."""
    from fastprefix import kernels

    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(RuntimeError) as info:
        call(backend="triton")
    for fragment in ("'triton'", "TRITON_INTERPRET=1", "backend='torch'"):
        assert fragment in str(info.value)
