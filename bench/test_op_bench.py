"""prefix_attention's fused PyTorch path vs concatenate-then-SDPA (what PEFT runs) vs no prefix (the floor).

Run: pytest bench/test_op_bench.py --benchmark-only [--benchmark-json=out.json]
Shape of issue 2: B=8, H=16, N=S=512, D=64, P=64, float32, CPU. Peak memory (MiB allocated during one call,
see fastprefix.profiling) goes into each benchmark's extra_info.

Timing: one thread and the process's CPU time (`time.process_time`), as in test_llama_bench.py, so that other
jobs on a shared machine cannot stretch the figures.
"""

import time

import pytest
import torch
import torch.nn.functional as F

from fastprefix import prefix_attention
from fastprefix.profiling import peak_cpu_memory

B, H, N, S, D, P = 8, 16, 512, 512, 64, 64


def fused(q, k, v, prefix_k, prefix_v):
    return prefix_attention(q, k, v, prefix_k, prefix_v, backend="torch")


def concat_sdpa(q, k, v, prefix_k, prefix_v):
    rows = (q.shape[0], -1, -1, -1)
    keys = torch.cat([prefix_k.expand(rows), k], dim=2)
    values = torch.cat([prefix_v.expand(rows), v], dim=2)
    return F.scaled_dot_product_attention(q, keys, values)


def no_prefix(q, k, v, prefix_k, prefix_v):
    return F.scaled_dot_product_attention(q, k, v)


PROVIDERS = {"fastprefix": fused, "concat_sdpa": concat_sdpa, "no_prefix": no_prefix}
pytestmark = pytest.mark.benchmark(timer=time.process_time)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_op(benchmark, provider, mode):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*shape, generator=gen, requires_grad=mode == "fwd_bwd")
               for shape in ((B, H, N, D), (B, H, S, D), (B, H, S, D), (H, P, D), (H, P, D))]
    attention = PROVIDERS[provider]
    dout = torch.randn(B, H, N, D, generator=gen)

    def step():
        out = attention(*tensors)
        if mode == "fwd_bwd":
            torch.autograd.grad(out, tensors if provider != "no_prefix" else tensors[:3], dout)

    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        benchmark.extra_info["peak_mib"] = round(peak_cpu_memory(step) / 2**20, 1)
        benchmark.extra_info.update(B=B, H=H, N=N, S=S, D=D, P=P, dtype="float32")
        benchmark.pedantic(step, rounds=15, warmup_rounds=2)
