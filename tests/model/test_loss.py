"""pc_clip_loss against independent float64 references, in one process and across W gloo ranks.

The references below are written from the loss of docs/METHOD.md ("Loss") with the full N x N logit matrix and no
shared code with pcd_ray.model.loss. Distributed checks follow the package's exactness convention
(pcd_ray/model/loss/__init__.py): mean over ranks of the rank losses is
the global loss, each rank's feature gradient is W x the global gradient of its rows, and the mean over ranks of
the logit-scale gradient is the global one.
"""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F

from pcd_ray.config import LossConfig
from pcd_ray.model.loss.groups import difference_directions
from pcd_ray.model.loss.reference import contrastive_loss, gather_with_grad, pc_clip_loss

D, IN = 6, 5
LOGIT_SCALE = math.log(10.0)
# name -> (LossConfig kwargs, global pair rows P, global caption rows B, degenerate pair rows); b != p in
# clip_ragged; in "degenerate" one row of rank 0 and, under W=2, every row of rank 1 are degenerate.
CASES = {
    "diff": (dict(diff_weight=1.0, clip_weight=0.0, diff_temperature=1.0), 8, 0, ()),
    "diff+clip": (dict(diff_weight=1.0, clip_weight=0.5, diff_temperature=0.5), 8, 8, ()),
    "clip_ragged": (dict(diff_weight=0.7, clip_weight=1.3, diff_temperature=2.0), 8, 4, ()),
    "degenerate": (dict(diff_weight=1.0, clip_weight=0.5, diff_temperature=1.0), 8, 8, (1, 4, 5, 6, 7)),
}
E2E_CFG = dict(diff_weight=1.0, clip_weight=0.5, diff_temperature=0.5)


# ------------------------------------------------------------------------------------------------ references
def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _ref_infonce(x, y, scale):
    logits = scale * _unit(x) @ _unit(y).T
    labels = torch.arange(len(x))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _ref_loss(feats, cfg: dict, logit_scale, degenerate=()):
    """Global loss over all rows: the paper's t @ d.T / tau, plus the CLIP image-caption loss when weighted.

    Degenerate pairs are simply left out of the batch, which is the semantics pc_clip_loss promises.
    """
    total = torch.zeros((), dtype=torch.float64)
    if cfg["diff_weight"]:
        keep = [i for i in range(len(feats["image_a"])) if i not in degenerate]
        a, b, t = (feats[k][keep] for k in ("image_a", "image_b", "diff_text"))
        d = _unit(_unit(a) - _unit(b))
        total = total + cfg["diff_weight"] * _ref_infonce(t, d, 1.0 / cfg["diff_temperature"])
    if cfg["clip_weight"]:
        total = total + cfg["clip_weight"] * _ref_infonce(feats["image"], feats["caption"], logit_scale.exp())
    return total


def _case_features(seed: int, p: int, b: int, degenerate=()) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = ["image_a", "image_b", "diff_text"] + (["image", "caption"] if b else [])
    feats = {
        k: torch.randn(p if k in ("image_a", "image_b", "diff_text") else b, D, generator=g, dtype=torch.float64)
        for k in keys
    }
    for i in degenerate:  # the same direction at another norm: identical once normalised
        feats["image_b"][i] = 2.5 * feats["image_a"][i]
    return feats


def _e2e_setup():
    """A tiny linear 'model' and per-key inputs: features = model(inputs[key])."""
    torch.manual_seed(0)
    model = torch.nn.Linear(IN, D, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    inputs = {
        k: torch.randn(8, IN, generator=g, dtype=torch.float64)
        for k in ("image_a", "image_b", "diff_text", "image", "caption")
    }
    return model, inputs


# --------------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One gloo rank: every case's loss and gradients for this rank's rows, plus a DDP-style linear-model step."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for i, (name, (cfg, p, b, degenerate)) in enumerate(CASES.items()):
            feats = {
                k: v.chunk(world)[rank].clone().requires_grad_() for k, v in _case_features(i, p, b, degenerate).items()
            }
            scale = torch.tensor(LOGIT_SCALE, dtype=torch.float64, requires_grad=True)
            out = pc_clip_loss(feats, LossConfig(**cfg), logit_scale=scale, rank=rank, world_size=world)
            out["loss"].backward()
            results[name] = {
                "loss": out["loss"].detach(),
                "grads": {k: f.grad for k, f in feats.items()},
                "scale_grad": scale.grad,
                "degenerate": out["degenerate_pairs"],
            }
        model, inputs = _e2e_setup()
        feats = {k: model(x.chunk(world)[rank]) for k, x in inputs.items()}
        pc_clip_loss(
            feats,
            LossConfig(**E2E_CFG),
            logit_scale=torch.tensor(LOGIT_SCALE, dtype=torch.float64),
            rank=rank,
            world_size=world,
        )["loss"].backward()
        for param in model.parameters():  # what DDP does: average parameter gradients over ranks
            dist.all_reduce(param.grad)
            param.grad /= world
        results["e2e"] = {n: p.grad for n, p in model.named_parameters()}
        if world > 1:  # a rank argument that disagrees with the process group would silently shift the labels
            x = F.normalize(torch.randn(2, D, dtype=torch.float64), dim=-1)
            try:
                contrastive_loss(x, x, 1.0, rank=world - 1 - rank, world_size=world)
            except RuntimeError as err:
                results["rank_mismatch"] = str(err)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[1, 2], ids=lambda w: f"W{w}")
def ranks(request, tmp_path_factory):
    """Spawn W gloo ranks once per world size; returns (W, [per-rank results])."""
    import torch.multiprocessing as mp

    world = request.param
    out_dir = tmp_path_factory.mktemp(f"ranks{world}")
    mp.spawn(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=True)
    return world, [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_match_global_loss_and_gradients(ranks, case):
    world, results = ranks
    cfg, p, b, degenerate = CASES[case]
    feats = {k: v.requires_grad_() for k, v in _case_features(list(CASES).index(case), p, b, degenerate).items()}
    scale = torch.tensor(LOGIT_SCALE, dtype=torch.float64, requires_grad=True)
    loss = _ref_loss(feats, cfg, scale, degenerate)
    loss.backward()
    per_rank = [r[case] for r in results]
    assert sum(r["degenerate"].item() for r in per_rank) == len(degenerate)
    torch.testing.assert_close(torch.stack([r["loss"] for r in per_rank]).mean(), loss.detach(), rtol=1e-12, atol=0)
    for rank, res in enumerate(per_rank):
        for key, f in feats.items():
            torch.testing.assert_close(res["grads"][key], world * f.grad.chunk(world)[rank], rtol=1e-10, atol=1e-14)
    if cfg["clip_weight"]:
        torch.testing.assert_close(
            torch.stack([r["scale_grad"] for r in per_rank]).mean(), scale.grad, rtol=1e-10, atol=1e-14
        )
        assert scale.grad.abs() > 1e-6  # a non-trivial gradient is what is being compared
    else:
        assert all(r["scale_grad"] is None for r in per_rank)


def test_ranks_step_equals_one_process_step(ranks):
    world, results = ranks
    model, inputs = _e2e_setup()
    _ref_loss(
        {k: model(x) for k, x in inputs.items()}, E2E_CFG, torch.tensor(LOGIT_SCALE, dtype=torch.float64)
    ).backward()
    for name, param in model.named_parameters():
        assert param.grad.abs().max() > 1e-6
        for res in results:  # every rank holds the same averaged gradient, as after DDP's all-reduce
            torch.testing.assert_close(res["e2e"][name], param.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("ranks", [2], indirect=True, ids=["W2"])
def test_rank_argument_must_match_process_group(ranks):
    world, results = ranks
    for rank, res in enumerate(results):
        assert f"rank={world - 1 - rank}" in res["rank_mismatch"] and f"rank {rank} of 2" in res["rank_mismatch"]


# ---------------------------------------------------------------------------------------------- one process
def test_clip_group_equals_open_clip_cliploss():
    from open_clip.loss import ClipLoss

    feats = {k: v.requires_grad_() for k, v in _case_features(7, 0, 12).items() if k in ("image", "caption")}
    scale = torch.tensor(LOGIT_SCALE, dtype=torch.float64, requires_grad=True)
    out = pc_clip_loss(feats, LossConfig(diff_weight=0, clip_weight=1), logit_scale=scale, rank=0, world_size=1)
    out["loss"].backward()
    ours = {k: f.grad.clone() for k, f in feats.items()} | {"scale": scale.grad.clone()}
    for t in (*feats.values(), scale):
        t.grad = None
    ref = ClipLoss()(F.normalize(feats["image"], dim=-1), F.normalize(feats["caption"], dim=-1), scale.exp())
    ref.backward()
    torch.testing.assert_close(out["loss"].detach(), ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out["clip_loss"], ref.detach(), rtol=1e-12, atol=0)
    assert out["diff_loss"] == 0 and out["loss"].requires_grad
    for k, f in feats.items():
        torch.testing.assert_close(ours[k], f.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ours["scale"], scale.grad, rtol=1e-10, atol=1e-14)


def test_diff_group_equals_paper_formula():
    feats = {k: v.requires_grad_() for k, v in _case_features(3, 16, 0).items()}
    cfg = dict(diff_weight=1.0, clip_weight=0.0, diff_temperature=1.0)
    out = pc_clip_loss(feats, LossConfig(**cfg), logit_scale=None, rank=0, world_size=1)
    ref = _ref_loss(feats, cfg, None)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["diff_loss"], ref.detach(), rtol=1e-12, atol=0)
    assert out["clip_loss"] == 0 and out["degenerate_pairs"] == 0
    grads = torch.autograd.grad(out["loss"], list(feats.values()))
    ref_grads = torch.autograd.grad(ref, list(feats.values()))
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)


def test_degenerate_pairs_are_counted_and_left_out():
    feats = _case_features(5, 6, 0)
    feats["image_b"][1] = feats["image_a"][1]
    feats["image_b"][4] = 3.0 * feats["image_a"][4]  # same direction, other norm: identical after normalising
    feats = {k: v.requires_grad_() for k, v in feats.items()}
    out = pc_clip_loss(feats, LossConfig(), logit_scale=None, rank=0, world_size=1)
    assert out["degenerate_pairs"].item() == 2 and out["degenerate_pairs"].dtype == torch.int64
    assert torch.isfinite(out["loss"])
    # The loss is the paper's over the 4 remaining pairs, with their gradients; the degenerate rows get none.
    ref = _ref_loss(feats, LossConfig().model_dump(), None, degenerate=(1, 4))
    torch.testing.assert_close(out["loss"], ref, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(out["loss"], list(feats.values()))
    ref_grads = torch.autograd.grad(ref, list(feats.values()))
    for ours, theirs in zip(grads, ref_grads):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
        assert (ours[[1, 4]] == 0).all()
    d, mask = difference_directions(feats["image_a"].detach(), feats["image_b"].detach())
    assert mask.tolist() == [False, True, False, False, True, False]
    assert (d[mask] == 0).all()
    torch.testing.assert_close(d[~mask].norm(dim=-1), torch.ones(4, dtype=torch.float64))


def test_all_pairs_degenerate_gives_zero_loss_and_zero_gradients():
    a = torch.randn(4, D, dtype=torch.float64)
    feats = {"image_a": a, "image_b": a.clone(), "diff_text": torch.randn(4, D, dtype=torch.float64)}
    feats = {k: v.requires_grad_() for k, v in feats.items()}
    out = pc_clip_loss(feats, LossConfig(), logit_scale=None, rank=0, world_size=1)
    assert out["loss"].item() == 0 and out["degenerate_pairs"].item() == 4
    out["loss"].backward()  # still part of the graph: the train loop's backward must not fail
    assert all((f.grad == 0).all() for f in feats.values())


@pytest.mark.parametrize(
    "dtype,expected", [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)]
)
def test_difference_directions_dtype(dtype, expected):
    a, b = torch.randn(4, D).to(dtype), torch.randn(4, D).to(dtype)
    d, mask = difference_directions(a, b)
    assert d.dtype == expected and d.shape == (4, D) and not mask.any()
    ref = _unit(_unit(a.double()) - _unit(b.double()))
    torch.testing.assert_close(d.double(), ref, rtol=1e-5, atol=1e-6)


def test_missing_keys_and_scale_raise():
    feats = _case_features(0, 4, 4)
    with pytest.raises(KeyError, match=r"difference group.*diff_text"):
        pc_clip_loss(
            {k: v for k, v in feats.items() if k != "diff_text"}, LossConfig(), logit_scale=None, rank=0, world_size=1
        )
    with pytest.raises(KeyError, match=r"clip group.*caption"):
        pc_clip_loss(
            {k: v for k, v in feats.items() if k != "caption"},
            LossConfig(clip_weight=1.0),
            logit_scale=torch.tensor(0.0),
            rank=0,
            world_size=1,
        )
    with pytest.raises(ValueError, match="logit_scale"):
        pc_clip_loss(feats, LossConfig(clip_weight=1.0), logit_scale=None, rank=0, world_size=1)
    # Features of a disabled group are not required.
    out = pc_clip_loss(
        {"image": feats["image"], "caption": feats["caption"]},
        LossConfig(diff_weight=0, clip_weight=1.0),
        logit_scale=torch.tensor(0.0),
        rank=0,
        world_size=1,
    )
    assert out["diff_loss"] == 0 and out["degenerate_pairs"] == 0


def test_without_process_group_gather_is_identity_and_world_mismatch_raises():
    x = torch.randn(3, D)
    assert gather_with_grad(x) is x
    with pytest.raises(RuntimeError, match="process group"):
        contrastive_loss(_unit(x), _unit(x), 1.0, rank=0, world_size=2)
