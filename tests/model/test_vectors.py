"""The shared vector helpers: the numpy and torch versions of normalise and the difference direction agree.

Model (torch), eval and serve (numpy) all compute the paper's direction through ``pcd_ray.vectors``; a drift
between the two versions would make training optimise one geometry while evaluation and serving score another.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcd_ray.vectors import difference_direction, difference_direction_torch, normalise, normalise_torch


def _pairs(dtype=np.float64):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5)) * 3.0, rng.normal(size=(6, 5))
    b[1] = a[1]  # the same image twice: distance 0, no direction
    a[2] = b[2] = 0.0  # zero embeddings
    a[3] = 1e-9 * rng.normal(size=5)  # below the 1e-6 floor: divided by the floor, not by its norm
    return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("eps", [1e-12, 1e-6])
@pytest.mark.parametrize("normalised", [False, True])
def test_numpy_and_torch_difference_directions_agree(eps, normalised):
    a, b = _pairs()
    if normalised:
        a, b = normalise(a, eps=eps), normalise(b, eps=eps)
    d_np, dist_np = difference_direction(a, b, eps=eps, normalised=normalised)
    d_t, dist_t = difference_direction_torch(torch.from_numpy(a), torch.from_numpy(b), eps=eps, normalised=normalised)
    np.testing.assert_allclose(d_t.numpy(), d_np, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dist_t.numpy(), dist_np, rtol=1e-12, atol=1e-15)
    assert d_np.shape == a.shape and dist_np.shape == a.shape[:1]
    # The same embedding twice, or two zero embeddings, have no difference: zero, never NaN, in both.
    assert dist_np[1] == dist_np[2] == 0 and not np.isnan(d_np).any()
    assert (d_np[1:3] == 0).all() and (d_t[1:3] == 0).all()
    far = dist_np > 1e-3
    np.testing.assert_allclose(np.linalg.norm(d_np[far], axis=1), 1.0, rtol=1e-12)


def test_numpy_and_torch_normalise_agree_and_floor_at_eps():
    x, _ = _pairs()
    for eps in (1e-12, 1e-6):
        np.testing.assert_allclose(
            normalise_torch(torch.from_numpy(x), eps=eps).numpy(), normalise(x, eps=eps), rtol=1e-12, atol=1e-15
        )
    np.testing.assert_array_equal(normalise(x[3], eps=1e-6), x[3] / 1e-6)  # one row [D] works too
    assert (normalise(x[2], eps=1e-12) == 0).all()


def test_dtypes_follow_the_caller():
    a, b = _pairs(np.float32)
    assert normalise(a, eps=1e-12).dtype == np.float32
    assert normalise(a, eps=1e-12, dtype=np.float64).dtype == np.float64
    d, dist = difference_direction(a, b, eps=1e-12, normalised=True, dtype=np.float64)
    # With normalised inputs the difference is taken in the inputs' dtype and converted after.
    np.testing.assert_array_equal(d, normalise((a - b).astype(np.float64), eps=1e-12))
    assert dist.dtype == np.float64
    d_t, _ = difference_direction_torch(torch.from_numpy(a), torch.from_numpy(b), eps=1e-6)
    assert d_t.dtype == torch.float32
    np.testing.assert_allclose(d_t.numpy(), difference_direction(a, b, eps=1e-6)[0], rtol=1e-5, atol=1e-6)


def test_torch_direction_carries_gradient_and_distance_does_not():
    a, b = (torch.from_numpy(x).requires_grad_() for x in _pairs())
    d, distance = difference_direction_torch(a, b, eps=1e-6)
    assert d.requires_grad and not distance.requires_grad
    d[0].sum().backward()
    assert a.grad[0].abs().sum() > 0 and torch.isfinite(a.grad).all()
