"""What both loss implementations share: the feature dict turned into normalised contrastive groups with masks.

A step's features (``PairEncoder``'s dict, raw and unnormalised) become at most two groups, each a pair of unit
row sets x, y [n, D] whose row i match, a logit scale (1/temperature, unitless) and optional validity flags [n]:

- "diff": x = difference-text embeddings, y = image-difference directions (:func:`difference_directions`);
  degenerate / near-duplicate pairs and padded rows are invalid;
- "clip": x = image embeddings, y = caption embeddings; padded rows are invalid.

Also here: the check that the ``rank``/``world_size`` arguments match the default process group, which both
implementations run before their collectives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist

from pcd_ray.vectors import difference_direction_torch, normalise_torch

if TYPE_CHECKING:
    from pcd_ray.config import LossConfig

DIFF_KEYS = ("image_a", "image_b", "diff_text")
CLIP_KEYS = ("image", "caption")
EPS = 1e-6  # norm floor of every normalisation of the loss, and the smallest degeneracy threshold


def process_group_size(group) -> int:
    """World size of ``group`` (the default group when None); 1 without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def check_process_group(rank: int, world_size: int) -> None:
    """The labels use ``rank`` while the gather uses the process group: they must agree or the loss is silently off.

    Raises RuntimeError naming both when they do not.
    """
    if process_group_size(None) == 1:
        actual = "not initialised (or has one rank)"
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        actual = f"rank {dist.get_rank()} of {dist.get_world_size()}"
    else:
        return
    raise RuntimeError(
        f"contrastive_loss: rank={rank}, world_size={world_size} but the default process group is "
        f"{actual}; initialise torch.distributed and pass its rank and world size"
    )


def difference_directions(
    emb_a: torch.Tensor, emb_b: torch.Tensor, eps: float = EPS, min_distance: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's image-difference direction ``normalise(normalise(e_a) - normalise(e_b))``.

    Args:
        emb_a, emb_b: [p, D] raw image embeddings of the two images of each ordered pair.
        eps: norm floor of both normalisations and the degeneracy threshold.
        min_distance: a larger threshold for near-duplicate pairs (their direction is mostly noise); the pair is
            degenerate when the distance is below ``max(eps, min_distance)``.

    Returns ``(d, degenerate)``: d [p, D] in float32 (float64 if an input is float64), unit rows; degenerate [p] bool,
    True where ``|e_a/|e_a| - e_b/|e_b|| < eps`` (e.g. the same image twice). A degenerate pair has no direction
    (the paper's code divides 0 by 0 and skips the whole step on the NaN): its row is set to exactly zero, finite
    with zero gradient, and :func:`prepare_groups` marks it invalid, so both losses drop it from the problem.

    Raises ValueError if the shapes differ.
    """
    if emb_a.shape != emb_b.shape:
        raise ValueError(f"difference_directions: shapes differ, {tuple(emb_a.shape)} vs {tuple(emb_b.shape)}")
    dtype = torch.float64 if torch.float64 in (emb_a.dtype, emb_b.dtype) else torch.float32
    d, distance = difference_direction_torch(emb_a.to(dtype), emb_b.to(dtype), eps=eps)
    degenerate = distance < max(eps, min_distance)
    return d.masked_fill(degenerate.unsqueeze(-1), 0.0), degenerate


def _require(features: dict[str, torch.Tensor], keys: tuple[str, ...], group: str, weight_name: str) -> None:
    missing = [k for k in keys if k not in features]
    if missing:
        raise KeyError(
            f"pc_clip_loss: the {group} group is on ({weight_name} > 0) but features lack {missing} "
            f"(got {sorted(features)})"
        )


class Group(NamedTuple):
    """One contrastive group as both implementations consume it: unit rows x, y [n, D], 0-dim scale, valid [n]."""

    name: str
    weight: float
    x: torch.Tensor
    y: torch.Tensor
    scale: torch.Tensor | float
    valid: torch.Tensor | None


def prepare_groups(
    features: dict[str, torch.Tensor],
    cfg: LossConfig,
    *,
    logit_scale: torch.Tensor | None,
    diff_logit_scale: torch.Tensor | None = None,
) -> tuple[list[Group], torch.Tensor, torch.Tensor]:
    """Normalised groups of both implementations, with masks; the inputs are those of
    :func:`pcd_ray.model.loss.reference.pc_clip_loss`.

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
            raise ValueError(
                "pc_clip_loss: clip_weight > 0 needs logit_scale (the model's learned log-scale) "
                "or a fixed clip_temperature"
            )
    first = next(iter(features.values()))
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    groups: list[Group] = []
    degenerate = torch.zeros((), dtype=torch.int64, device=first.device)
    padded = torch.zeros((), dtype=torch.int64, device=first.device)
    if cfg.diff_weight > 0:
        d, mask = difference_directions(
            features["image_a"], features["image_b"], min_distance=cfg.near_duplicate_distance
        )
        t = normalise_torch(features["diff_text"].to(d.dtype), eps=EPS)
        valid = ~mask
        if "diff_valid" in features:  # a padded row is counted as padding, not as a degenerate pair
            mask = mask & features["diff_valid"]
            valid = valid & features["diff_valid"]
            padded = padded + (~features["diff_valid"]).sum()
        degenerate = mask.sum()
        scale = diff_logit_scale.exp() if cfg.learn_diff_temperature else 1.0 / cfg.diff_temperature
        groups.append(Group("diff", cfg.diff_weight, t, d, scale, valid))
    if cfg.clip_weight > 0:
        image = normalise_torch(features["image"].to(dtype), eps=EPS)
        caption = normalise_torch(features["caption"].to(dtype), eps=EPS)
        valid = features.get("clip_valid")
        if valid is not None:
            padded = padded + (~valid).sum()
        scale = logit_scale.exp() if cfg.clip_temperature is None else 1.0 / cfg.clip_temperature
        groups.append(Group("clip", cfg.clip_weight, image, caption, scale, valid))
    return groups, degenerate, padded
