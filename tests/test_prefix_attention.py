"""prefix_attention on every CPU backend against the float64 oracle over the concatenated keys."""

import pytest
import torch

from fastprefix.testing import DECODE_SHAPE_IDS, DECODE_SHAPES, Case, compare_to_oracle, make_inputs
from helpers.cases import FEATURES

SHAPES = [  # B, Hq, Hkv, N, S, P, D
    (1, 2, 2, 1, 1, 1, 64),      # one query, one key
    (2, 4, 4, 17, 17, 7, 64),    # MHA, square
    (2, 4, 2, 5, 33, 0, 80),     # GQA, no prefix, more keys than queries
    (3, 6, 1, 13, 13, 1, 128),   # MQA, one prefix token
    (2, 4, 2, 33, 20, 65, 64),   # more queries than keys: causal rows before N - S see only the prefix
    (1, 8, 2, 1, 50, 20, 128),   # a decoding step against a cache
    (2, 2, 1, 64, 64, 63, 80),   # block-sized sequence, prefix one short of a block
    (2, 4, 2, 3, 0, 5, 64),      # no sequence keys: the prefix alone
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}x{}-N{}-S{}-P{}-D{}".format(*s))
def test_matches_oracle(backend, shape, feature, shared, dtype):
    inp = make_inputs(Case(*shape, shared=shared, **FEATURES[feature]), dtype)
    failures = [str(c) for c in compare_to_oracle(inp, backend) if not c.ok]
    assert not failures, failures


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
@pytest.mark.parametrize("feature", ["plain", "causal", "padmask", "all"])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=DECODE_SHAPE_IDS)
def test_decoding_steps_match_oracle(backend, shape, feature, shared, dtype):
    """Decoding shapes (1 to 16 queries per row, caches of 1 to 1000 keys): for a shared prefix the torch path
    stacks the B x G x N queries of a KV head against it in one product."""
    inp = make_inputs(Case(*shape, shared=shared, **FEATURES[feature]), dtype)
    failures = [str(c) for c in compare_to_oracle(inp, backend) if not c.ok]
    assert not failures, failures
