"""The PC-CLIP training loss (PAPER.md section 2) with global negatives under data parallelism.

Reference implementation: each contrastive group gathers its features from every rank with gradient, then computes
the rank-local rows of the global logit matrix (open_clip's ``local_loss=True, gather_with_grad=True`` shape, with one
collective per group instead of two). Training uses the fused, chunked loss of ``fused_loss.py`` (LOSS.md) by
default; this module is the float64 correctness oracle it must match (``LossConfig.impl = "reference"``).

Exactness convention (LOSS.md). With W ranks of n rows each (N = W*n) the global symmetric InfoNCE loss is
``L = mean_r l_r``, where the rank-local loss ``l_r`` covers the rows of rank r against all N columns in both
directions. Because :class:`GatherWithGrad`'s backward *sums* the gradient over ranks, rank r receives
``sum_q d l_q / d f_r = W * dL/d f_r`` for its own features f_r; DDP/DeepSpeed then *average* parameter gradients over
ranks, which divides that W back out and yields exactly ``dL/d theta``. A replicated scalar that enters every rank's
loss directly (the learned logit scale) gets ``d l_r / d scale`` on rank r, and the average over ranks is
``dL/d scale``. So never rescale the loss by W: the convention relies on the plain average the frameworks apply.

Torch is imported at module level (this module is only imported by code that runs the model); open_clip is not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

if TYPE_CHECKING:
    from pcd_ray.config import LossConfig

DIFF_KEYS = ("image_a", "image_b", "diff_text")
CLIP_KEYS = ("image", "caption")


def _group_world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


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
        return grad[start:start + ctx.rows], None


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0: [n, ...] -> [W*n, ...], rank order, differentiable.

    Every rank must pass the same shape and dtype. With no initialised process group, or a group of one rank, this
    is the identity and runs no collective.
    """
    if _group_world(group) == 1:
        return x
    return GatherWithGrad.apply(x, group)


def contrastive_loss(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | float, *, rank: int,
                     world_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Rank-local symmetric InfoNCE ``l_r`` of this rank's rows against all ranks' rows (see module docstring).

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
        _check_group(rank, world_size)
        packed = gather_with_grad(packed)
    x_all, y_all = packed[:, :dim], packed[:, dim:2 * dim]
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


def _check_group(rank: int, world_size: int) -> None:
    """The labels use ``rank`` while the gather uses the process group: they must agree or the loss is silently off."""
    if _group_world(None) == 1:
        actual = "not initialised (or has one rank)"
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        actual = f"rank {dist.get_rank()} of {dist.get_world_size()}"
    else:
        return
    raise RuntimeError(f"contrastive_loss: rank={rank}, world_size={world_size} but the default process group is "
                       f"{actual}; initialise torch.distributed and pass its rank and world size")


def difference_directions(emb_a: torch.Tensor, emb_b: torch.Tensor, eps: float = 1e-6,
                          min_distance: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's image-difference direction ``normalise(normalise(e_a) - normalise(e_b))``.

    Args:
        emb_a, emb_b: [p, D] raw image embeddings of the two images of each ordered pair.
        eps: norm floor of both normalisations and the degeneracy threshold.
        min_distance: a larger threshold for near-duplicate pairs (their direction is mostly noise); the pair is
            degenerate when the distance is below ``max(eps, min_distance)``.

    Returns ``(d, degenerate)``: d [p, D] in float32 (float64 if an input is float64), unit rows; degenerate [p] bool,
    True where ``|e_a/|e_a| - e_b/|e_b|| < eps`` (e.g. the same image twice). A degenerate pair has no direction
    (the paper's code divides 0 by 0 and skips the whole step on the NaN): its row is set to exactly zero, finite
    with zero gradient, and :func:`pc_clip_loss` drops it from the contrastive problem via ``valid``.

    Raises ValueError if the shapes differ.
    """
    if emb_a.shape != emb_b.shape:
        raise ValueError(f"difference_directions: shapes differ, {tuple(emb_a.shape)} vs {tuple(emb_b.shape)}")
    dtype = torch.float64 if torch.float64 in (emb_a.dtype, emb_b.dtype) else torch.float32
    diff = F.normalize(emb_a.to(dtype), dim=-1, eps=eps) - F.normalize(emb_b.to(dtype), dim=-1, eps=eps)
    degenerate = torch.linalg.vector_norm(diff.detach(), dim=-1) < max(eps, min_distance)
    d = F.normalize(diff, dim=-1, eps=eps)
    return d.masked_fill(degenerate.unsqueeze(-1), 0.0), degenerate


def _require(features: dict[str, torch.Tensor], keys: tuple[str, ...], group: str, weight_name: str) -> None:
    missing = [k for k in keys if k not in features]
    if missing:
        raise KeyError(f"pc_clip_loss: the {group} group is on ({weight_name} > 0) but features lack {missing} "
                       f"(got {sorted(features)})")


class Group(NamedTuple):
    """One contrastive group as both implementations consume it: unit rows x, y [n, D], 0-dim scale, valid [n]."""

    name: str
    weight: float
    x: torch.Tensor
    y: torch.Tensor
    scale: torch.Tensor | float
    valid: torch.Tensor | None


def prepare_groups(features: dict[str, torch.Tensor], cfg: LossConfig, *, logit_scale: torch.Tensor | None,
                   diff_logit_scale: torch.Tensor | None = None) -> tuple[list[Group], torch.Tensor, torch.Tensor]:
    """Normalised groups of :func:`pc_clip_loss` and the fused loss, with masks; see pc_clip_loss for the inputs.

    Returns ``(groups, degenerate_pairs, padded_rows)``: the enabled groups (difference first), this rank's count
    of degenerate/near-duplicate pairs among the non-padded ones, and of padded rows (False in the optional
    "diff_valid" [p] / "clip_valid" [b] bool features), both int64 0-dim.

    Raises KeyError naming the missing features of an enabled group, ValueError when a scale it needs is missing.
    """
    if cfg.diff_weight > 0:
        _require(features, DIFF_KEYS, "difference", "diff_weight")
        if cfg.learn_diff_temperature and diff_logit_scale is None:
            raise ValueError("pc_clip_loss: learn_diff_temperature needs diff_logit_scale (the learned log-scale)")
    if cfg.clip_weight > 0:
        _require(features, CLIP_KEYS, "clip", "clip_weight")
        if logit_scale is None and cfg.clip_temperature is None:
            raise ValueError("pc_clip_loss: clip_weight > 0 needs logit_scale (the model's learned log-scale) "
                             "or a fixed clip_temperature")
    first = next(iter(features.values()))
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    groups: list[Group] = []
    degenerate = torch.zeros((), dtype=torch.int64, device=first.device)
    padded = torch.zeros((), dtype=torch.int64, device=first.device)
    if cfg.diff_weight > 0:
        d, mask = difference_directions(features["image_a"], features["image_b"],
                                        min_distance=cfg.near_duplicate_distance)
        t = F.normalize(features["diff_text"].to(d.dtype), dim=-1, eps=1e-6)
        valid = ~mask
        if "diff_valid" in features:  # a padded row is counted as padding, not as a degenerate pair
            mask = mask & features["diff_valid"]
            valid = valid & features["diff_valid"]
            padded = padded + (~features["diff_valid"]).sum()
        degenerate = mask.sum()
        scale = diff_logit_scale.exp() if cfg.learn_diff_temperature else 1.0 / cfg.diff_temperature
        groups.append(Group("diff", cfg.diff_weight, t, d, scale, valid))
    if cfg.clip_weight > 0:
        image = F.normalize(features["image"].to(dtype), dim=-1, eps=1e-6)
        caption = F.normalize(features["caption"].to(dtype), dim=-1, eps=1e-6)
        valid = features.get("clip_valid")
        if valid is not None:
            padded = padded + (~valid).sum()
        scale = logit_scale.exp() if cfg.clip_temperature is None else 1.0 / cfg.clip_temperature
        groups.append(Group("clip", cfg.clip_weight, image, caption, scale, valid))
    return groups, degenerate, padded


def pc_clip_loss(features: dict[str, torch.Tensor], cfg: LossConfig, *, logit_scale: torch.Tensor | None,
                 rank: int, world_size: int, diff_logit_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Weighted sum of the difference group and the optional image-caption CLIP group, rank-local (module docstring).

    The reference implementation (the float64 oracle of the fused loss): one gather with gradient per group and the
    full [n, N] logits.

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
    "padded_rows" (this rank's count of padded rows)}. Degenerate pairs (:func:`difference_directions`, with
    cfg.near_duplicate_distance) are excluded on every rank, positives and negatives alike: the loss is the
    paper's over the N_valid remaining pairs, and 0 (still differentiable) if none remain.

    Raises KeyError naming the missing features of an enabled group, ValueError if a needed scale is missing.
    """
    groups, degenerate, padded = prepare_groups(features, cfg, logit_scale=logit_scale,
                                                diff_logit_scale=diff_logit_scale)
    first = next(iter(features.values()))
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=dtype, device=first.device)
    total, parts = zero, {"diff": zero, "clip": zero}
    for g in groups:
        parts[g.name] = contrastive_loss(g.x, g.y, g.scale, rank=rank, world_size=world_size, valid=g.valid)
        total = total + g.weight * parts[g.name]
    return {"loss": total, "diff_loss": parts["diff"].detach(), "clip_loss": parts["clip"].detach(),
            "degenerate_pairs": degenerate, "padded_rows": padded}
