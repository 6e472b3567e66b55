"""Unit rows and the paper's image-difference direction, one numpy and one torch version, for model, eval and serve.

Embeddings are rows along the last axis: ``x [..., D]``. ``normalise(x) = x / max(|x|, eps)``: a row whose norm is
below ``eps`` is divided by ``eps``, so an all-zero row (the difference of two identical images) stays zero instead
of becoming NaN. The difference direction of an ordered pair (docs/METHOD.md, "Loss") is
``d = normalise(normalise(e_a) - normalise(e_b))`` [..., D]; with ``normalised=True`` the inputs are unit rows
already and ``d = normalise(e_a - e_b)``. Both versions also return the distance ``|normalise(e_a) - normalise(e_b)|``
[...] (0 to 2, unitless), which tells a degenerate pair (no direction) from a real one.

``eps`` is the caller's: the loss floors at 1e-6, embeddings and scores at 1e-12 (``EPS``, F.normalize's default),
and changing a call site's floor changes its results. numpy is imported here; torch only inside the torch
functions, so numpy-only callers (serve/scoring.py, the eval metrics) never load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

EPS = 1e-12


def _unit(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps), norm


def normalise(x: np.ndarray, *, eps: float, dtype=None) -> np.ndarray:
    """Rows of x [..., D] scaled to unit norm (norm floored at eps) -> [..., D]; ``dtype`` (e.g. np.float64) is
    what x is converted to first, None keeps x's."""
    return _unit(np.asarray(x, dtype=dtype), eps)[0]


def difference_direction(
    e_a: np.ndarray, e_b: np.ndarray, *, eps: float, normalised: bool = False, dtype=None
) -> tuple[np.ndarray, np.ndarray]:
    """The difference direction of e_a, e_b [..., D] -> (d [..., D], distance [...]) (module docstring).

    ``dtype`` converts the inputs before normalising them, or, with ``normalised=True``, the difference after the
    subtraction (which then runs in the inputs' dtype). None keeps the inputs' dtype throughout.
    """
    if normalised:
        diff = np.asarray(np.asarray(e_a) - np.asarray(e_b), dtype=dtype)
    else:
        diff = normalise(e_a, eps=eps, dtype=dtype) - normalise(e_b, eps=eps, dtype=dtype)
    d, norm = _unit(diff, eps)
    return d, norm[..., 0]


def normalise_torch(x: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Rows of x [..., D] scaled to unit norm (norm floored at eps), differentiable, in x's dtype -> [..., D]."""
    import torch.nn.functional as F

    return F.normalize(x, dim=-1, eps=eps)


def difference_direction_torch(
    e_a: torch.Tensor, e_b: torch.Tensor, *, eps: float, normalised: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The difference direction of e_a, e_b [..., D] -> (d [..., D], distance [...]) (module docstring), in the
    inputs' dtype (convert them first for another). d carries gradient; the distance is detached: it decides which
    pairs count, and no gradient may flow through that decision."""
    import torch

    diff = e_a - e_b if normalised else normalise_torch(e_a, eps=eps) - normalise_torch(e_b, eps=eps)
    distance = torch.linalg.vector_norm(diff.detach(), dim=-1)
    return normalise_torch(diff, eps=eps), distance
