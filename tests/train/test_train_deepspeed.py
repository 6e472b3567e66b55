"""Ray Train + DeepSpeed end to end on CPU: 2 workers (gloo), checkpoints, exports plain open_clip loads, resume from
S3. (A relaunch after a worker kill, with FailureConfig, is test_fault_tolerance.py.)"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch
from train_helpers import train_job as _job

from pcd_ray.storage import Storage

pytestmark = pytest.mark.integration


def test_two_worker_deepspeed_run_checkpoints_and_exports(prepared):
    import open_clip

    from pcd_ray.model.factory import load_model
    from pcd_ray.train.trainer import run_dir_name, run_train

    job = _job(prepared)
    storage = Storage(job.storage)
    summary = run_train(job, storage)
    assert summary["final_metrics"]["step"] == 4
    ckpt = Path(summary["checkpoint"])
    assert ckpt.parent.name == run_dir_name(job.train)
    # DeepSpeed's own format, merged from both ranks: model states once, one ZeRO optimizer shard per rank.
    files = {p.name for p in ckpt.rglob("*.pt")}
    assert "mp_rank_00_model_states.pt" in files
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files
    assert (Path(prepared) / "train" / "metrics.csv").read_text().count("\n") == 5  # header + 4 steps
    assert (Path(prepared) / "train" / "training_curve.png").read_bytes()[:4] == b"\x89PNG"

    # Plain open_clip loads the export (no pcd-ray code involved) and it matches what pcd-ray loads.
    export = Path(prepared) / "train" / "export"
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    ours = load_model(job.train.model.model_copy(update={"checkpoint": str(export)}), storage).model
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ours.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # Training moved the weights away from the (seeded) random init, the 0-dim logit_scale included.
    torch.manual_seed(job.train.seed)
    init = load_model(job.train.model, storage).model.state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, init[k])]
    assert "logit_scale" in changed and any(k.startswith("visual.") for k in changed)


def test_zero3_checkpoints_and_exports_round_trip_through_s3(prepared, s3_root):
    """ZeRO-3 (+ activation checkpointing) with the run directory and exports on the local S3 server: sharded
    checkpoints land on S3, a relaunch resumes from them, and the export is the training model's weights."""
    import open_clip
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pcd_ray.model.factory import load_model
    from pcd_ray.train.loop import DS_TAG
    from pcd_ray.train.trainer import run_dir_name, run_train

    out = f"{s3_root}/train-z3"
    settings = {
        "output": out,
        "checkpoint_every": 2,
        "wise_ft_alpha": 0.5,
        "deepspeed": {"zero_stage": 3, "activation_checkpointing": True},
    }
    job = _job(prepared, max_steps=3, **settings)
    storage = Storage(job.storage)
    summary = run_train(job, storage)
    assert summary["final_metrics"]["step"] == 3
    ckpt = summary["checkpoint"]
    assert ckpt.startswith(f"{out}/{run_dir_name(job.train)}/")
    names = {u.rsplit("/", 1)[-1] for u in storage.find(ckpt)}
    # ZeRO-3: parameters are sharded too, so every rank writes its own model and optimizer states.
    assert {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")} <= names
    assert "pcd_position.json" in names

    # The export (downloaded from S3) in plain open_clip gives the training model's embeddings; the training model
    # is DeepSpeed's consolidation of the ZeRO-3 shards in the final checkpoint.
    with storage.local_dir(f"{out}/export") as export:
        exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    with storage.local_dir(ckpt) as local:
        trained = get_fp32_state_dict_from_zero_checkpoint(str(local), tag=DS_TAG)
    reference = load_model(job.train.model, storage).model
    missing, unexpected = reference.load_state_dict(
        {k.removeprefix("clip."): v for k, v in trained.items()}, strict=False
    )
    assert not unexpected and all(not k.endswith(("weight", "bias")) for k in missing), (missing, unexpected)
    gen = torch.Generator().manual_seed(0)
    images, texts = torch.rand(4, 3, 32, 32, generator=gen), torch.randint(1, 60, (4, 16), generator=gen)
    with torch.no_grad():
        for m in (exported, reference):
            m.eval()
        torch.testing.assert_close(exported.encode_image(images), reference.encode_image(images))
        torch.testing.assert_close(exported.encode_text(texts), reference.encode_text(texts))

    # WiSE-FT: the second export is the halfway average of the finetuned and the (seeded random) base weights.
    torch.manual_seed(job.train.seed)
    base = load_model(job.train.model, storage).model.state_dict()
    with storage.local_dir(f"{out}/export-wiseft") as wise:
        averaged, _, _ = open_clip.create_model_and_transforms(f"local-dir:{wise}")
    for k, v in averaged.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.5 * exported.state_dict()[k] + 0.5 * base[k])

    # Relaunched longer: resumes from the ZeRO-3 checkpoint on S3.
    resumed = run_train(_job(prepared, max_steps=4, **settings), storage)
    assert resumed["final_metrics"]["step"] == 4 and resumed["final_metrics"]["resumed_from_step"] == 3
    # The resumed run appends to the first run's metrics on S3: every step once, with the columns the plot reads.
    rows = list(csv.DictReader(io.StringIO(storage.read_text(f"{out}/metrics.csv"))))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {"lr", "samples_per_s", "data_wait_frac", "skipped_steps", "masked_pairs"} <= set(rows[0])
