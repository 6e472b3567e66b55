"""The PC-CLIP training loss (docs/METHOD.md, "Loss"; docs/LOSS.md) with global negatives under data parallelism.

:func:`compute_loss` runs the implementation ``LossConfig.impl`` names:

- ``groups.py``: shared preparation: features -> normalised contrastive groups, the difference direction,
  near-duplicate and padding masks;
- ``fused.py`` (``impl: fused``, the default, what training runs): one packed all-gather, chunked online LSEs, a
  backward with no collective;
- ``reference.py`` (``impl: reference``): one gather with gradient per group and full [n, N] logits; the float64
  oracle the tests hold the fused loss to.

Both take the feature dict of :class:`pcd_ray.model.pair_encoder.PairEncoder` (raw [p, D] / [b, D] embeddings)
and return the same keys, so the train loop does not care which one runs: ``loss`` (rank-local, carries grad),
``diff_loss``/``clip_loss`` (rank-local, detached), ``global_loss`` (detached, identical on every rank),
``skip_step`` (bool 0-dim, identical on every rank: the global loss is not finite), ``degenerate_pairs`` and
``padded_rows`` (this rank's counts, int64 0-dim). Losses are unitless (nats).

Exactness convention. With W ranks of n rows each (N = W*n) the global symmetric InfoNCE loss is
``L = mean_r l_r``, where the rank-local loss ``l_r`` covers the rows of rank r against all N columns in both
directions. Each implementation's backward hands rank r ``sum_q d l_q / d f_r = W * dL/d f_r`` for its own
features f_r; DDP/DeepSpeed then *average* parameter gradients over ranks, which divides that W back out and yields
exactly ``dL/d theta``. A replicated scalar that enters every rank's loss directly (the learned logit scale) gets
``d l_r / d scale`` on rank r, and the average over ranks is ``dL/d scale``. So never rescale the loss by W: the
convention relies on the plain average the frameworks apply.

Torch is imported at module level (only code that runs the model imports this package); open_clip is not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pcd_ray.model.loss.fused import fused_pc_clip_loss
from pcd_ray.model.loss.reference import reference_loss

if TYPE_CHECKING:
    from pcd_ray.config import LossConfig

__all__ = ["LOSSES", "compute_loss"]

LOSSES = {"fused": fused_pc_clip_loss, "reference": reference_loss}


def compute_loss(
    features: dict[str, torch.Tensor],
    cfg: LossConfig,
    *,
    logit_scale: torch.Tensor | None,
    rank: int,
    world_size: int,
    diff_logit_scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The loss cfg.impl names, with the arguments of :func:`pcd_ray.model.loss.reference.pc_clip_loss` and the
    keys of the package docstring."""
    return LOSSES[cfg.impl](
        features, cfg, logit_scale=logit_scale, rank=rank, world_size=world_size, diff_logit_scale=diff_logit_scale
    )
