"""The training loss by name (LossConfig.impl): the fused all-gather loss (default) or the reference oracle.

Both take the feature dict of :class:`pcd_ray.model.pair_encoder.PairEncoder` and return the same keys, so the
train loop does not care which one runs:
``loss`` (rank-local, carries grad: the mean over ranks is the global loss and DDP-style gradient averaging gives
exactly its gradient), ``diff_loss``/``clip_loss`` (rank-local, detached), ``global_loss`` (detached, identical on
every rank), ``skip_step`` (bool 0-dim, identical on every rank: the global loss is not finite),
``degenerate_pairs`` and ``padded_rows`` (this rank's counts, int64 0-dim).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pcd_ray.model.fused_loss import fused_contrastive
from pcd_ray.model.loss import pc_clip_loss, prepare_groups

if TYPE_CHECKING:
    from pcd_ray.config import LossConfig


def fused_pc_clip_loss(features: dict[str, torch.Tensor], cfg: LossConfig, *, logit_scale: torch.Tensor | None,
                       rank: int, world_size: int,
                       diff_logit_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """:func:`pcd_ray.model.loss.pc_clip_loss` (same arguments, same values) through one fused collective op.

    All enabled groups share one feature all-gather and one LSE gather; the backward runs no collective. The
    global loss and the NaN check ride on the LSE gather, so skipping a bad step costs no extra collective.
    """
    groups, degenerate, padded = prepare_groups(features, cfg, logit_scale=logit_scale,
                                                diff_logit_scale=diff_logit_scale)
    local, glob, _ = fused_contrastive([(g.x, g.y, g.scale, g.valid) for g in groups], rank=rank,
                                       world_size=world_size, chunk_size=cfg.chunk_size,
                                       gather_dtype=cfg.gather_dtype)
    weights = torch.tensor([g.weight for g in groups], dtype=local.dtype, device=local.device)
    parts = {g.name: local[i].detach() for i, g in enumerate(groups)}
    zero = torch.zeros((), dtype=local.dtype, device=local.device)
    global_loss = (glob * weights).sum()
    return {"loss": (local * weights).sum(), "diff_loss": parts.get("diff", zero),
            "clip_loss": parts.get("clip", zero), "global_loss": global_loss, "skip_step": ~torch.isfinite(global_loss),
            "degenerate_pairs": degenerate, "padded_rows": padded}


def _reference_loss(features: dict[str, torch.Tensor], cfg: LossConfig, *, logit_scale: torch.Tensor | None,
                    rank: int, world_size: int, diff_logit_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    out = pc_clip_loss(features, cfg, logit_scale=logit_scale, rank=rank, world_size=world_size,
                       diff_logit_scale=diff_logit_scale)
    # The reference has no gathered loss to read: one extra all-reduce makes the skip decision identical on every
    # rank (a rank that skipped alone would hang the next collective).
    global_loss = out["loss"].detach().clone()
    if world_size > 1:
        dist.all_reduce(global_loss)
        global_loss /= world_size
    return out | {"global_loss": global_loss, "skip_step": ~torch.isfinite(global_loss)}


LOSSES = {"fused": fused_pc_clip_loss, "reference": _reference_loss}


def compute_loss(features: dict[str, torch.Tensor], cfg: LossConfig, *, logit_scale: torch.Tensor | None,
                 rank: int, world_size: int, diff_logit_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The loss cfg.impl names, with the arguments and key set described in the module docstring."""
    return LOSSES[cfg.impl](features, cfg, logit_scale=logit_scale, rank=rank, world_size=world_size,
                            diff_logit_scale=diff_logit_scale)
