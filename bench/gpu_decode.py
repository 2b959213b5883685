"""The decode cases of bench/gpu_bench.py: their sizes and providers (fastprefix's decode against SDPA over per-row
copies of the prompts), importable without a GPU so that the tests check them on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastprefix import prefix_attention
from fastprefix.ops import levels_prefix_attention

HQ, D = 32, 128
DECODE_HKV, DECODE_P, DECODE_S = 8, 4096, 256
TWO_LEVEL_SYSTEM, TWO_LEVEL_DOCUMENT, TWO_LEVEL_DOCUMENTS = 1024, 2048, 8


def _seeded_randn(device: str, dtype):
    """randn(*shape) drawing from one generator seeded with 0 on `device`, in `dtype`."""
    gen = torch.Generator(device=device).manual_seed(0)
    return lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)


def decode_providers(b: int, n: int, device: str = "cuda", p: int = DECODE_P, s: int = DECODE_S,
                     dtype=torch.bfloat16):
    """(fused, {SDPA kernel: step}) for the decode case, each step() -> out: fastprefix on a shared prefix
    [Hkv, P, D] and per-row caches [B, Hkv, S, D], and SDPA over per-row copies [B, Hkv, P + S, D]
    (allocated before timing, as a copied cache would be)."""
    randn, hkv = _seeded_randn(device, dtype), DECODE_HKV
    q, k, v = randn(b, HQ, n, D), randn(b, hkv, s, D), randn(b, hkv, s, D)
    prefix_k, prefix_v = randn(hkv, p, D), randn(hkv, p, D)
    copies_k = torch.cat([prefix_k.expand(b, -1, -1, -1), k], dim=2)
    copies_v = torch.cat([prefix_v.expand(b, -1, -1, -1), v], dim=2)

    def fused():
        with torch.no_grad():
            return prefix_attention(q, k, v, prefix_k, prefix_v, causal=n > 1, backend="triton")

    return fused, sdpa_over_copies(q, copies_k, copies_v)


def sdpa_over_copies(q, copies_k, copies_v) -> dict:
    """{SDPA kernel: step() -> out} of q [B, Hq, N, D] over per-row copies [B, Hkv, keys, D] whose last N keys
    are the rows' own newest tokens (lower-right causal when N > 1)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, _, n, _ = q.shape
    hkv, keys = copies_k.shape[1], copies_k.shape[2]
    g = HQ // hkv
    # Query i of head h * G + j is row j * N + i of KV head h, so SDPA reads each copy once per KV head; with
    # N > 1 a bool mask gives query i the lower-right causal window (keys up to keys - N + i).
    grouped_q = q.view(b, hkv, g * n, D)
    mask = None
    if n > 1:
        last_key = keys - n + torch.arange(n, device=q.device).repeat(g)
        mask = torch.arange(keys, device=q.device)[None, :] <= last_key[:, None]

    def sdpa(backend):
        def step():
            with torch.no_grad(), sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(grouped_q, copies_k, copies_v, attn_mask=mask)
            return out.view(b, HQ, n, D)
        return step

    return {"flash": sdpa(SDPBackend.FLASH_ATTENTION), "efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)}


def two_level_providers(b: int, n: int, device: str = "cuda", system: int = TWO_LEVEL_SYSTEM,
                        document: int = TWO_LEVEL_DOCUMENT, documents: int = TWO_LEVEL_DOCUMENTS,
                        s: int = DECODE_S, dtype=torch.bfloat16):
    """(fused, {SDPA kernel: step}) for the two-level decode case: a shared system prompt [Hkv, system, D],
    `documents` documents [Hkv, document, D] read by row (row r reads document r mod documents) and per-row
    caches [B, Hkv, S, D]; fastprefix's levels_prefix_attention against SDPA over per-row copies
    [B, Hkv, system + document + S, D] (each row's cache holding both prompts, as when they are copied)."""
    randn, hkv = _seeded_randn(device, dtype), DECODE_HKV
    q, k, v = randn(b, HQ, n, D), randn(b, hkv, s, D), randn(b, hkv, s, D)
    system_k, system_v = randn(hkv, system, D), randn(hkv, system, D)
    doc_k = [randn(hkv, document, D) for _ in range(documents)]
    doc_v = [randn(hkv, document, D) for _ in range(documents)]
    index = torch.arange(b, device=device) % documents
    copies_k = torch.cat([system_k.expand(b, -1, -1, -1), torch.stack(doc_k)[index], k], dim=2)
    copies_v = torch.cat([system_v.expand(b, -1, -1, -1), torch.stack(doc_v)[index], v], dim=2)
    levels = [(system_k, system_v), (doc_k, doc_v, index)]

    def fused():
        with torch.no_grad():
            return levels_prefix_attention(q, k, v, levels, causal=n > 1)

    return fused, sdpa_over_copies(q, copies_k, copies_v)


def usable_baselines(fused, baselines) -> dict:
    """The SDPA kernels that take these shapes, each checked against fastprefix's output (bf16: 2e-2
    relative); raises AssertionError on a mismatch."""
    from fastprefix.testing import relative_error

    expected = fused()
    usable = {}
    for name, step in baselines.items():
        try:
            out = step()
        except RuntimeError as error:  # a kernel that refuses these shapes or this device
            print(f"SDPA {name}: not usable here ({str(error).splitlines()[0]})", flush=True)
            continue
        error = relative_error(expected, out)
        assert error < 2e-2, f"fastprefix decode differs from SDPA {name} over per-row copies: {error:.2e}"
        usable[name] = step
    return usable
