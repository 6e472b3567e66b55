"""The fused loss (``train.loss.impl: fused``, what training runs; docs/LOSS.md): one packed all-gather, chunked LSEs,
no b x N logits.

:func:`fused_pc_clip_loss` is :func:`pcd_ray.model.loss.reference.pc_clip_loss` (same arguments, same values) with
every group going through :class:`FusedContrastive`, which computes, for each contrastive group (x, y, scale, valid),
the rank-local symmetric InfoNCE ``l_r`` of :func:`pcd_ray.model.loss.reference.contrastive_loss` (same value, same
exactness convention, package docstring), but:

- all groups' features (and validity flags) travel in ONE ``all_gather_single`` (bf16 or full precision) and are
  read through views; the small per-row LSE vectors (2n floats per group per rank) and the per-rank losses follow
  in a second, tiny gather;
- logits are only ever formed as [chunk, chunk] tiles with an online log-sum-exp in fp32 (fp64 for fp64 inputs):
  memory is O(W*n*D) for the gathered features plus O(chunk^2), never O(n*N);
- the backward runs NO collective: from the gathered features and LSEs every rank recomputes, tile by tile, the
  exact gradient of the global loss for its own rows (times W, what DDP's averaging expects) and only the local
  terms of the temperature gradient (whose mean over ranks is the global one).

Per group, with S = s * x @ Y_all.T, a = row LSEs, c = column LSEs, k = W / (2 N_valid):
``l_r = k * sum_{i local, valid} (a_i + c_i - 2 S_ii)``;
``dx_i = k s [sum_j (e^{S_ij - a_i} + e^{S_ij - c_j}) y_j - 2 y_i]`` (pass 1: local rows x all columns);
``dy_j = k s [sum_i (e^{S_ij - a_i} + e^{S_ij - c_j}) x_i - 2 x_j]`` (pass 2: other ranks' rows x local columns,
computed as the transposed problem); ``dl_r/ds = k [(sum P*S)_pass1 + (sum P*S)_pass2) / s - 2 sum_i S_ii / s]``,
P being each pass's own softmax. The local x local block is the same tile in both directions, so pass 1 does it
for both: (6W - 2) n*n*D block products per step (2W - 1 forward, 4W - 1 backward) against open_clip's 6W.

Invalid rows (degenerate pairs, padding) get -inf logits as rows and as columns and an LSE of +inf, so every
exponential that involves them is exactly 0 and they drop out of the problem on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pcd_ray.model.loss.groups import check_process_group, prepare_groups

if TYPE_CHECKING:
    from pcd_ray.config import LossConfig

NEG_INF = float("-inf")


@dataclass(frozen=True)
class GroupLayout:
    """Where one group's tensors sit in the packed per-rank buffer (element offsets)."""

    rows: int
    dim: int
    x_off: int
    y_off: int
    flag_off: int | None  # None: the group has no validity flags (every row valid)


def _layout(shapes: list[tuple[int, int]], flagged: list[bool]) -> tuple[list[GroupLayout], int]:
    layouts, off = [], 0
    feature_ends = []
    for n, d in shapes:
        feature_ends.append((off, off + n * d))
        off += 2 * n * d
    for (n, d), (x_off, y_off), has_flags in zip(shapes, feature_ends, flagged):
        layouts.append(GroupLayout(n, d, x_off, y_off, off if has_flags else None))
        off += n if has_flags else 0
    return layouts, off


def _gather(flat: torch.Tensor, world: int, group) -> torch.Tensor:
    """[L] per rank -> [W, L]; identity view (no collective, no copy) when W = 1."""
    if world == 1:
        return flat.unsqueeze(0)
    out = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    _all_gather(out, flat.contiguous(), group)
    return out.view(world, -1)


def _all_gather(out: torch.Tensor, local: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(out, local, group=group)


def _pack_and_gather(parts: list[torch.Tensor], world: int, rank: int, dtype: torch.dtype, group) -> torch.Tensor:
    """Every rank's concatenated ``parts`` as [W, L], in ``dtype``, through ONE all-gather.

    The parts are written straight into this rank's slot of the output and gathered in place (an input that is
    the output's own slot, which NCCL and gloo both accept): no separate packed copy of the local features.
    """
    total = sum(p.numel() for p in parts)
    out = torch.empty(world, total, dtype=dtype, device=parts[0].device)
    off = 0
    for p in parts:
        out[rank, off : off + p.numel()].view_as(p).copy_(p)
        off += p.numel()
    if world > 1:
        _all_gather(out.view(-1), out[rank], group)
    return out


def _blocks(buf: torch.Tensor, off: int, lay: GroupLayout) -> torch.Tensor:
    """[W, n, D] view of one feature of every rank, no copy."""
    return buf[:, off : off + lay.rows * lay.dim].view(buf.shape[0], lay.rows, lay.dim)


class _Tiles:
    """Reusable [chunk, chunk] logit buffers and [chunk, D] key/query buffers for one pass.

    Every tile op writes into these (out= / in place): a fresh 4 MiB tensor per tile would cost an mmap and a
    page fault per page on every tile with glibc's allocator, and fragment the CUDA caching allocator.
    """

    def __init__(self, count: int, chunk: int, dim: int, dtype: torch.dtype, device):
        self.bufs = [torch.empty(chunk * chunk, dtype=dtype, device=device) for _ in range(count)]
        self.key = torch.empty(chunk, dim, dtype=dtype, device=device)
        self.query = torch.empty(chunk, dim, dtype=dtype, device=device)

    def tile(self, i: int, rows: int, cols: int) -> torch.Tensor:
        return self.bufs[i][: rows * cols].view(rows, cols)


def _key_chunks(blocks: torch.Tensor, scale: torch.Tensor, chunk: int, tiles: _Tiles, skip: int | None):
    """Yield (rank w, offset j0, scale * key tile [c, D] in the compute dtype), rank by rank, chunk by chunk.

    Scaling the [c, D] key tile instead of the [n, D] queries keeps the only per-pass copy at tile size.
    """
    world, n, _ = blocks.shape
    for w in range(world):
        if w == skip:
            continue
        for j0 in range(0, n, chunk):
            block = blocks[w, j0 : j0 + chunk]
            yield w, w * n + j0, torch.mul(block, scale, out=tiles.key[: block.shape[0]])


def _masked(s: torch.Tensor, qb: torch.Tensor | None, kb: torch.Tensor | None) -> torch.Tensor:
    """-inf at invalid rows/columns, in place (no-op without a mask)."""
    return s if qb is None else s.add_(qb.unsqueeze(1)).add_(kb.unsqueeze(0))


def _lse_(s: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp along dim, destroying s. The tile's own max keeps exp in range (never a fixed-max shortcut); an
    all -inf (masked) line keeps max 0 and sums to 0, i.e. LSE -inf."""
    m = s.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    return s.sub_(m).exp_().sum(dim=dim, keepdim=True).log_().add_(m).squeeze(dim)


def _lse_pass(q, blocks, scale, q_bias, key_bias, chunk, dtype, *, skip=None, cols_of=None):
    """Online LSEs of the logits scale * q @ keys.T over key tiles.

    Returns (row LSE of every query row over the keys of every rank but ``skip`` [n], and for the keys of rank
    ``cols_of`` their column LSE over the queries [n], or None). The second output lets one pass serve both
    directions for the block of this rank's own rows, whose logits the other direction would only transpose.
    """
    n = q.shape[0]
    tiles = _Tiles(2, chunk, q.shape[1], dtype, q.device)
    rows = torch.full((n,), NEG_INF, dtype=dtype, device=q.device)
    cols = None if cols_of is None else torch.full((blocks.shape[1],), NEG_INF, dtype=dtype, device=q.device)
    for w, j, key in _key_chunks(blocks, scale, chunk, tiles, skip):
        c = key.shape[0]
        kb = None if key_bias is None else key_bias[j : j + c]
        for r0 in range(0, n, chunk):
            qb = None if q_bias is None else q_bias[r0 : r0 + chunk]
            s = _masked(torch.mm(q[r0 : r0 + chunk], key.T, out=tiles.tile(0, min(chunk, n - r0), c)), qb, kb)
            if w == cols_of:
                j0 = j - w * blocks.shape[1]
                part = _lse_(tiles.tile(1, *s.shape).copy_(s), dim=0)
                cols[j0 : j0 + c] = torch.logaddexp(cols[j0 : j0 + c], part)
            rows[r0 : r0 + chunk] = torch.logaddexp(rows[r0 : r0 + chunk], _lse_(s, dim=1))
    return rows, cols


def _grad_pass(
    q,
    blocks,
    scale,
    own_lse,
    key_lse,
    q_bias,
    key_bias,
    chunk,
    dtype,
    want_scale: bool,
    *,
    skip=None,
    cols_of=None,
    acc=None,
):
    """With S = scale * q @ keys.T and G = e^{S_ij - own_i} + e^{S_ij - key_j}: returns
    (sum_j G_ij scale k_j for every query row [n, D], the scale term, the keys' side [n, D] or None).

    The scale term sums e^{S_ij - own_i} S_ij (the queries' softmax); for the keys of rank ``cols_of`` it also
    sums e^{S_ij - key_j} S_ij and returns sum_i G_ij scale q_i for those keys: G of that block is the same
    matrix in both directions, so the other direction's pass skips it (``skip``). own_lse/key_lse are +inf at
    invalid rows, which (with the -inf logits) makes their weights exactly 0. ``acc``: add into this [n, D].
    """
    n, masked = q.shape[0], q_bias is not None
    tiles = _Tiles(3, chunk, q.shape[1], dtype, q.device)
    acc = torch.zeros_like(q) if acc is None else acc
    acc_keys = None if cols_of is None else torch.zeros_like(q)
    tau = torch.zeros((), dtype=dtype, device=q.device)
    for w, j, key in _key_chunks(blocks, scale, chunk, tiles, skip):
        c = key.shape[0]
        klse = key_lse[j : j + c].unsqueeze(0)
        kb = None if key_bias is None else key_bias[j : j + c]
        for r0 in range(0, n, chunk):
            rows = q[r0 : r0 + chunk]
            raw = torch.mm(rows, key.T, out=tiles.tile(0, rows.shape[0], c))
            # raw stays finite for the scale terms: masked entries then give weight * raw = 0 * finite.
            s = _masked(tiles.tile(2, *raw.shape).copy_(raw), q_bias[r0 : r0 + chunk], kb) if masked else raw
            p = torch.sub(s, own_lse[r0 : r0 + chunk].unsqueeze(1), out=tiles.tile(1, *raw.shape)).exp_()
            if want_scale:
                tau += torch.dot(p.reshape(-1), raw.reshape(-1))
            if w == cols_of:
                q_w = torch.sub(s, klse, out=tiles.tile(2, *raw.shape)).exp_()
                if want_scale:
                    tau += torch.dot(q_w.reshape(-1), raw.reshape(-1))
                p += q_w
                j0 = j - w * blocks.shape[1]
                acc_keys[j0 : j0 + c].addmm_(p.T, torch.mul(rows, scale, out=tiles.query[: rows.shape[0]]))
            else:
                p += s.sub_(klse).exp_()  # s is spent (raw, when unmasked, too): reuse it for the second weights
            acc[r0 : r0 + chunk].addmm_(p, key)
    return acc, tau, acc_keys


class FusedContrastive(torch.autograd.Function):
    """Rank-local symmetric InfoNCE of several groups with one feature gather and a collective-free backward.

    Inputs (after ``layouts, options``): per group ``x, y, scale, valid``: x, y [n_g, D_g] L2-normalised (any float
    dtype), scale a 0-dim tensor (may require grad), valid [n_g] bool or None. Outputs: ``(local [G], global [G],
    n_valid [G])``; only ``local`` is differentiable, and its backward follows the package's exactness convention
    (features: W x the global gradient of this rank's rows; scale: d l_r / d scale). The upstream gradient of
    ``local`` must be identical on every rank (fixed loss weights, a shared loss scale), since no collective
    combines it.
    """

    @staticmethod
    def forward(ctx, options: dict, *inputs):
        world, rank, chunk, group = options["world"], options["rank"], options["chunk"], options["group"]
        groups = [inputs[i : i + 4] for i in range(0, len(inputs), 4)]
        dtype = torch.float64 if any(x.dtype == torch.float64 for x, *_ in groups) else torch.float32
        wire = torch.bfloat16 if options["gather_dtype"] == "bf16" else dtype
        layouts, _ = _layout([tuple(x.shape) for x, *_ in groups], [v is not None for *_, v in groups])
        parts = [t.detach() for x, y, _, _ in groups for t in (x, y)] + [v for *_, v in groups if v is not None]
        buf = _pack_and_gather(parts, world, rank, wire, group)

        stats, locals_, n_valid, cached = [], [], [], []
        for lay, (x, _, scale, _) in zip(layouts, groups):
            s = scale.detach().to(dtype)
            x_loc = _blocks(buf, lay.x_off, lay)[rank].to(dtype)
            y_loc = _blocks(buf, lay.y_off, lay)[rank].to(dtype)
            if lay.flag_off is None:
                valid_all, q_bias, key_bias = None, None, None
                count = torch.tensor(world * lay.rows, device=x.device)
            else:
                valid_all = buf[:, lay.flag_off : lay.flag_off + lay.rows].reshape(-1) > 0.5
                key_bias = torch.zeros(valid_all.shape, dtype=dtype, device=x.device).masked_fill_(~valid_all, NEG_INF)
                q_bias = key_bias[rank * lay.rows : (rank + 1) * lay.rows]
                count = valid_all.sum()
            # Pass 1: local rows against every rank's columns, plus the column LSEs of the local block; pass 2:
            # local columns against the other ranks' rows (the local block is done).
            a, c_own = _lse_pass(x_loc, _blocks(buf, lay.y_off, lay), s, q_bias, key_bias, chunk, dtype, cols_of=rank)
            c = c_own
            if world > 1:
                c_rest, _ = _lse_pass(y_loc, _blocks(buf, lay.x_off, lay), s, q_bias, key_bias, chunk, dtype, skip=rank)
                c = torch.logaddexp(c_own, c_rest)
            dots = (x_loc * y_loc).sum(-1)
            terms = a + c - 2 * s * dots
            k = world / (2 * count.clamp_min(1).to(dtype))
            if q_bias is not None:  # invalid rows: no loss term, and +inf LSE so backward weights vanish
                keep = q_bias == 0
                terms = torch.where(keep, terms, 0.0)
                a, c = (torch.where(keep, v, float("inf")) for v in (a, c))
            stats.append(torch.stack([a, c]).reshape(-1))
            locals_.append(k * terms.sum())
            n_valid.append(count)
            cached.append((s, k, dots, q_bias, key_bias))
        local = torch.stack(locals_)
        small = _gather(torch.cat(stats + [local]), world, group)  # [W, sum(2 n_g) + G]
        glob = small[:, -len(groups) :].mean(0)

        ctx.layouts, ctx.options, ctx.dtype, ctx.cached = layouts, options, dtype, cached
        ctx.in_dtypes = [(x.dtype, y.dtype, scale.dtype) for x, y, scale, _ in groups]
        ctx.save_for_backward(buf, small)
        counts = torch.stack(n_valid)
        ctx.mark_non_differentiable(glob, counts)  # one call: a second would replace the first's set
        return local, glob, counts

    @staticmethod
    def backward(ctx, grad_local, _grad_global, _grad_counts):
        buf, small = ctx.saved_tensors
        world, rank, chunk = ctx.options["world"], ctx.options["rank"], ctx.options["chunk"]
        dtype, grads, off = ctx.dtype, [], 0
        for g, (lay, (s, k, dots, q_bias, key_bias)) in enumerate(zip(ctx.layouts, ctx.cached)):
            n = lay.rows
            lse = small[:, off : off + 2 * n].reshape(world, 2, n)
            off += 2 * n
            a_all, c_all = lse[:, 0].reshape(-1), lse[:, 1].reshape(-1)
            x_blocks, y_blocks = _blocks(buf, lay.x_off, lay), _blocks(buf, lay.y_off, lay)
            x_loc, y_loc = x_blocks[rank].to(dtype), y_blocks[rank].to(dtype)
            a_loc, c_loc = a_all[rank * n : (rank + 1) * n], c_all[rank * n : (rank + 1) * n]
            want = ctx.needs_input_grad[1 + 4 * g : 1 + 4 * g + 3]
            if not any(want):
                grads += [None] * 4
                continue
            gx, t1, gy = _grad_pass(
                x_loc, y_blocks, s, a_loc, c_all, q_bias, key_bias, chunk, dtype, want[2], cols_of=rank
            )
            t2 = 0.0
            if world > 1:
                _, t2, _ = _grad_pass(
                    y_loc, x_blocks, s, c_loc, a_all, q_bias, key_bias, chunk, dtype, want[2], skip=rank, acc=gy
                )
            up = grad_local[g].to(dtype)
            # In place on the accumulators: the gradients are the largest buffers the backward owns.
            dx, dy = gx.addcmul_(y_loc, s, value=-2).mul_(up * k), gy.addcmul_(x_loc, s, value=-2).mul_(up * k)
            if q_bias is not None:
                keep = (q_bias == 0).to(dtype).unsqueeze(1)
                dx, dy = dx.mul_(keep), dy.mul_(keep)
            kept_dots = dots if q_bias is None else torch.where(q_bias == 0, dots, 0.0)
            dscale = up * k * ((t1 + t2) / s - 2 * kept_dots.sum()) if want[2] else None
            dx_t, dy_t, ds_t = ctx.in_dtypes[g]
            grads += [
                dx.to(dx_t) if want[0] else None,
                dy.to(dy_t) if want[1] else None,
                None if dscale is None else dscale.to(ds_t),
                None,
            ]
        return (None, *grads)


def fused_contrastive(
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | float, torch.Tensor | None]],
    *,
    rank: int,
    world_size: int,
    chunk_size: int = 1024,
    gather_dtype: str = "fp32",
    group=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-local losses of several contrastive groups in one fused op (see :class:`FusedContrastive`).

    Args:
        groups: per group ``(x, y, scale, valid)``; x, y [n, D] unit rows, n (and whether valid is None) equal on
            every rank; scale a float or 0-dim tensor (logit multiplier, 1/temperature); valid [n] bool or None.
        rank, world_size: this rank's place in ``group`` (the default process group when None).
        chunk_size: edge of the logit tiles (rows and columns); memory O(chunk_size^2) per tile.
        gather_dtype: "fp32" gathers features in the compute dtype (fp32, or fp64 for fp64 inputs); "bf16" halves
            the bytes on the wire. Logits and LSEs are always fp32 (fp64).

    Returns ``(local [G], global [G], n_valid [G])``: ``local[g]`` is l_r of group g (mean over ranks = the global
    loss, differentiable), ``global[g]`` that mean (detached, identical on every rank), ``n_valid[g]`` the number
    of valid rows over all ranks.
    """
    if world_size > 1:
        check_process_group(rank, world_size)
    flat = []
    for x, y, scale, valid in groups:
        if x.shape != y.shape or x.dim() != 2:
            raise ValueError(f"fused_contrastive: x and y must both be [n, D], got {tuple(x.shape)}, {tuple(y.shape)}")
        if valid is not None and valid.shape != x.shape[:1]:
            raise ValueError(f"fused_contrastive: valid must be [{x.shape[0]}], got {tuple(valid.shape)}")
        if not torch.is_tensor(scale):
            scale = torch.tensor(float(scale), dtype=torch.float64, device=x.device)
        flat += [x, y, scale, valid]
    options = {"world": world_size, "rank": rank, "chunk": chunk_size, "gather_dtype": gather_dtype, "group": group}
    return FusedContrastive.apply(options, *flat)


def fused_pc_clip_loss(
    features: dict[str, torch.Tensor],
    cfg: LossConfig,
    *,
    logit_scale: torch.Tensor | None,
    rank: int,
    world_size: int,
    diff_logit_scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`pcd_ray.model.loss.reference.pc_clip_loss` (same arguments, same values) through one fused
    collective op, with the keys the train loop reads (package docstring).

    All enabled groups share one feature all-gather and one LSE gather; the backward runs no collective. The
    global loss and the NaN check ride on the LSE gather, so skipping a bad step costs no extra collective.
    """
    groups, degenerate, padded = prepare_groups(
        features, cfg, logit_scale=logit_scale, diff_logit_scale=diff_logit_scale
    )
    local, glob, _ = fused_contrastive(
        [(g.x, g.y, g.scale, g.valid) for g in groups],
        rank=rank,
        world_size=world_size,
        chunk_size=cfg.chunk_size,
        gather_dtype=cfg.gather_dtype,
    )
    weights = torch.tensor([g.weight for g in groups], dtype=local.dtype, device=local.device)
    parts = {g.name: local[i].detach() for i, g in enumerate(groups)}
    zero = torch.zeros((), dtype=local.dtype, device=local.device)
    global_loss = (glob * weights).sum()
    return {
        "loss": (local * weights).sum(),
        "diff_loss": parts.get("diff", zero),
        "clip_loss": parts.get("clip", zero),
        "global_loss": global_loss,
        "skip_step": ~torch.isfinite(global_loss),
        "degenerate_pairs": degenerate,
        "padded_rows": padded,
    }
