import math

import numpy as np
import pytest

from jaxlm.ops.mlp import gated_mlp, mlp
from jaxlm.ops.norms import layer_norm, rms_norm

rng = np.random.default_rng(0)
x = rng.normal(size=(2, 3, 8)).astype(np.float32)
scale = rng.normal(size=(8,)).astype(np.float32)
bias = rng.normal(size=(8,)).astype(np.float32)


def test_rms_norm():
    ref = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(rms_norm(x, scale, eps=1e-6), ref, atol=1e-5)


def test_layer_norm():
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * scale + bias
    np.testing.assert_allclose(layer_norm(x, scale, bias, eps=1e-5), ref, atol=1e-5)


def test_plain_mlp_gelu_and_relu():
    w1, w2 = rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    b1, b2 = rng.normal(size=16).astype(np.float32), rng.normal(size=8).astype(np.float32)
    h = x @ w1 + b1
    gelu = 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))
    np.testing.assert_allclose(mlp(x, w1, w2, b1, b2, act="gelu"), gelu @ w2 + b2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mlp(x, w1, w2, act="relu"), np.maximum(x @ w1, 0) @ w2, rtol=1e-4, atol=1e-4)


def test_swiglu():
    wg, wu, wo = (rng.normal(size=s).astype(np.float32) for s in [(8, 16), (8, 16), (16, 8)])
    g = x @ wg
    ref = ((g / (1 + np.exp(-g))) * (x @ wu)) @ wo
    np.testing.assert_allclose(gated_mlp(x, wg, wu, wo, act="silu"), ref, rtol=1e-4, atol=1e-4)


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'swish2'"):
        mlp(x, np.ones((8, 2)), np.ones((2, 8)), act="swish2")
