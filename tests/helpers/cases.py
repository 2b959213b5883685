"""Feature sets of the oracle grids, shared by the torch-backend and Triton tests."""

FEATURES = {  # name: `fastprefix.testing.Case` options
    "plain": {},
    "causal": {"causal": True},
    "padmask": {"mask": "rows"},
    "t5bias": {"bias": "heads", "scale": 1.0},
    "t5padded": {"mask": "rows", "bias": "heads", "scale": 1.0},
    "biasgrad": {"bias": "1d", "bias_grad": True},
    "all": {"causal": True, "mask": "full", "bias": "rows", "bias_grad": True},
}
