"""The reference loss (``train.loss.impl: reference``): the float64 oracle the fused loss is tested against.

Each contrastive group gathers its features from every rank with gradient, then computes the rank-local rows of
the global logit matrix, [n, N] with N = W*n (open_clip's ``local_loss=True, gather_with_grad=True`` shape, with one
collective per group instead of two). Straightforward and memory-hungry; training runs ``fused.py``. Loss values
are unitless (nats), rank-local, and follow the exactness convention of the package docstring: it holds here
because :class:`GatherWithGrad`'s backward *sums* the gradient over ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pcd_ray.model.loss.groups import check_process_group, prepare_groups, process_group_size

if TYPE_CHECKING:
    from pcd_ray.config import LossConfig


class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the incoming gradient over ranks and keeps this rank's slice.

    torch.distributed.nn.all_gather's backward needs reduce_scatter, which gloo lacks; all_reduce + slice works on
    gloo and nccl alike at the price of reducing the full [W*n, ...] gradient instead of a 1/W share.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd's buffer may be shared
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0: [n, ...] -> [W*n, ...], rank order, differentiable.

    Every rank must pass the same shape and dtype. With no initialised process group, or a group of one rank, this
    is the identity and runs no collective.
    """
    if process_group_size(group) == 1:
        return x
    return GatherWithGrad.apply(x, group)


def contrastive_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    rank: int,
    world_size: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rank-local symmetric InfoNCE ``l_r`` of this rank's rows against all ranks' rows (package docstring).

    Args:
        x, y: [n, D] L2-normalised features; row i of x matches row i of y; n equal on every rank.
        scale: logit multiplier (1/temperature), a float or a 0-dim tensor (may require grad).
        rank, world_size: this rank's place in the default process group.
        valid: optional [n] bool; False rows (degenerate pairs) leave the problem entirely, on every rank: they are
            neither positives nor negatives, as if absent from the global batch of N_valid rows.

    Returns a 0-dim tensor, computed in float32 (float64 if x is float64). Without ``valid``:
    ``(CE(s*x@y_all.T, lab) + CE(s*y@x_all.T, lab)) / 2`` with ``lab = arange(n) + rank*n``. With it, the sum of both
    CE terms over this rank's valid rows times ``W / (2*N_valid)`` (0 when N_valid = 0). Either way the mean over
    ranks is the global loss.

    Raises ValueError on mismatched shapes, RuntimeError if world_size > 1 without a matching process group.
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"contrastive_loss: x and y must both be [n, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if valid is not None and valid.shape != x.shape[:1]:
        raise ValueError(f"contrastive_loss: valid must be [{x.shape[0]}], got {tuple(valid.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    n, dim = x.shape
    # One collective per group: x, y (and the validity flag as a constant column) travel in one [n, 2D(+1)] buffer.
    packed = torch.cat([x, y] if valid is None else [x, y, valid.to(dtype).unsqueeze(1)], dim=1)
    if world_size > 1:
        check_process_group(rank, world_size)
        packed = gather_with_grad(packed)
    x_all, y_all = packed[:, :dim], packed[:, dim : 2 * dim]
    if valid is None:
        labels = torch.arange(n, device=x.device) + rank * n
        logits_xy = scale * (x @ y_all.T)  # [n, N]: row LSEs a_i of this rank's rows
        logits_yx = scale * (y @ x_all.T)  # [n, N]: column LSEs c_i of this rank's columns
        return (F.cross_entropy(logits_xy, labels) + F.cross_entropy(logits_yx, labels)) / 2
    valid_all = packed[:, 2 * dim].detach() > 0.5
    rows = valid.nonzero().squeeze(1)
    # -inf columns drop invalid rows as negatives; selecting rows drops them as positives. Every selected row keeps
    # its own (valid) column, so no row is all -inf and nothing becomes NaN.
    logits_xy = (scale * (x[rows] @ y_all.T)).masked_fill(~valid_all, float("-inf"))
    logits_yx = (scale * (y[rows] @ x_all.T)).masked_fill(~valid_all, float("-inf"))
    labels = rows + rank * n
    total = F.cross_entropy(logits_xy, labels, reduction="sum") + F.cross_entropy(logits_yx, labels, reduction="sum")
    # The count must be in the loss dtype: int / int-tensor would round the factor to the default float32.
    return total * world_size / (2 * valid_all.sum().clamp_min(1).to(dtype))


def pc_clip_loss(
    features: dict[str, torch.Tensor],
    cfg: LossConfig,
    *,
    logit_scale: torch.Tensor | None,
    rank: int,
    world_size: int,
    diff_logit_scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted sum of the difference group and the optional image-caption CLIP group, rank-local (package
    docstring): one gather with gradient per group and the full [n, N] logits.

    Args:
        features: raw (unnormalised) model outputs. Difference group (cfg.diff_weight > 0): "image_a", "image_b",
            "diff_text", each [p, D]. CLIP group (cfg.clip_weight > 0): "image", "caption", each [b, D].
            p and b must be equal on every rank (they may differ from each other). Optional padding masks
            "diff_valid" [p] and "clip_valid" [b] (bool, False = padded row, left out like a degenerate pair).
        cfg: weights and temperatures. Difference scale: ``diff_logit_scale.exp()`` when cfg.learn_diff_temperature,
            else 1/cfg.diff_temperature (the paper's fixed tau = 1). CLIP scale: ``logit_scale.exp()``, or
            1/cfg.clip_temperature when that is set.
        logit_scale: open_clip's learned log-scale (0-dim).
        rank, world_size: this rank's place in the default process group.
        diff_logit_scale: the learned log-scale of the difference group (0-dim), when cfg.learn_diff_temperature.

    Returns {"loss": weighted sum (carries grad), "diff_loss", "clip_loss" (detached, 0 when the group is off),
    "degenerate_pairs" (this rank's count of degenerate pairs, int64 0-dim; sum it over ranks to log),
    "padded_rows" (this rank's count of padded rows)}. Degenerate pairs
    (:func:`pcd_ray.model.loss.groups.difference_directions`, with cfg.near_duplicate_distance) are excluded on
    every rank, positives and negatives alike: the loss is the paper's over the N_valid remaining pairs, and 0
    (still differentiable) if none remain.

    Raises KeyError naming the missing features of an enabled group, ValueError if a needed scale is missing.
    """
    groups, degenerate, padded = prepare_groups(
        features, cfg, logit_scale=logit_scale, diff_logit_scale=diff_logit_scale
    )
    first = next(iter(features.values()))
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=dtype, device=first.device)
    total, parts = zero, {"diff": zero, "clip": zero}
    for g in groups:
        parts[g.name] = contrastive_loss(g.x, g.y, g.scale, rank=rank, world_size=world_size, valid=g.valid)
        total = total + g.weight * parts[g.name]
    return {
        "loss": total,
        "diff_loss": parts["diff"].detach(),
        "clip_loss": parts["clip"].detach(),
        "degenerate_pairs": degenerate,
        "padded_rows": padded,
    }


def reference_loss(
    features: dict[str, torch.Tensor],
    cfg: LossConfig,
    *,
    logit_scale: torch.Tensor | None,
    rank: int,
    world_size: int,
    diff_logit_scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`pc_clip_loss` with the keys the train loop reads (package docstring): plus ``global_loss`` and
    ``skip_step``."""
    out = pc_clip_loss(
        features, cfg, logit_scale=logit_scale, rank=rank, world_size=world_size, diff_logit_scale=diff_logit_scale
    )
    # The reference has no gathered loss to read: one extra all-reduce makes the skip decision identical on every
    # rank (a rank that skipped alone would hang the next collective).
    global_loss = out["loss"].detach().clone()
    if world_size > 1:
        dist.all_reduce(global_loss)
        global_loss /= world_size
    return out | {"global_loss": global_loss, "skip_step": ~torch.isfinite(global_loss)}
