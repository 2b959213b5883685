"""`Prefix`: layout, properties and the errors for malformed input."""

import pytest
import torch

from fastprefix import Prefix


def layers(n, *shape, dtype=torch.float32):
    return [torch.randn(*shape, dtype=dtype) for _ in range(n)]


def test_shared_and_per_row_properties():
    shared = Prefix(layers(3, 2, 5, 8), layers(3, 2, 5, 8))
    assert (shared.num_layers, shared.num_kv_heads, shared.length, shared.head_dim) == (3, 2, 5, 8)
    assert shared.shared and shared.batch_size is None
    per_row = Prefix(layers(2, 4, 2, 5, 8), layers(2, 4, 2, 5, 8))
    assert not per_row.shared and per_row.batch_size == 4 and per_row.length == 5


def test_keeps_the_given_tensors():
    keys, values = layers(2, 2, 5, 8), layers(2, 2, 5, 8)
    prefix = Prefix(keys, values)
    assert all(a is b for a, b in zip(prefix.keys + prefix.values, keys + values))
    assert prefix.layer(1) == (keys[1], values[1])


@pytest.mark.parametrize("keys, values, error, match", [
    (torch.randn(2, 5, 8), [torch.randn(2, 5, 8)], TypeError, "one tensor per attention layer"),
    ([], [], ValueError, "empty"),
    (layers(2, 2, 5, 8), layers(3, 2, 5, 8), ValueError, "2 key tensors and 3 value tensors"),
    (layers(1, 5, 8), layers(1, 5, 8), ValueError, r"\[Hkv, P, D\].*got shape \[5, 8\]"),
    (layers(2, 2, 5, 8), [torch.randn(2, 5, 8), torch.randn(2, 6, 8)], ValueError, r"values\[1\]` has shape \[2, 6, 8\]"),
    (layers(1, 2, 5, 8), layers(1, 2, 5, 8, dtype=torch.float64), ValueError, "one dtype and device"),
    ([torch.ones(2, 5, 8, dtype=torch.long)], [torch.ones(2, 5, 8, dtype=torch.long)], TypeError, "floating-point"),
    ([torch.randn(2, 5, 8)], ["v"], TypeError, r"values\[0\]` must be a torch.Tensor"),
], ids=["tensor-not-list", "empty", "count", "rank", "shape", "dtype", "integer", "not-tensor"])
def test_malformed_prefix_is_refused(keys, values, error, match):
    with pytest.raises(error, match=match):
        Prefix(keys, values)
