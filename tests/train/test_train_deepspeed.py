"""Ray Train + DeepSpeed end to end on CPU: 2 workers (gloo), a checkpoint, an export plain open_clip loads, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pcd_ray.config import JobConfig
from pcd_ray.storage import Storage

pytestmark = pytest.mark.slow


def _job(root: str, **train) -> JobConfig:
    return JobConfig.model_validate({
        "storage": {"root": root},
        "data": {"synthetic": {"num_train": 192, "num_test": 8, "image_size": 32, "rows_per_shard": 96}},
        "pairs": {"num_pairs": 160},
        "train": {
            "model": {"name": "pcd-micro"},
            # full: logit_scale (a 0-dim parameter) trains too -- deepspeed 0.19.8 fails on exactly that.
            "trainable": "full",
            "batch_size": 16, "max_steps": 4, "log_every": 1, "checkpoint_every": 2,
            "loss": {"diff_weight": 1.0, "clip_weight": 0.5},
            "optimizer": {"lr": 1e-3},
            # Accumulating 2 micro batches of 4 per worker: steps count optimizer steps, not micro batches.
            "deepspeed": {"zero_stage": 2, "gradient_accumulation_steps": 2},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1},
            **train,
        },
    })


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_local):
    from pcd_ray.data.pairs import sample_pairs
    from pcd_ray.data.synthetic import make_images
    from pcd_ray.generate.job import run_generate

    root = str(tmp_path_factory.mktemp("train-run"))
    job = _job(root)
    storage = Storage(job.storage)
    make_images(job, storage)
    sample_pairs(job, storage)
    run_generate(job, storage)
    return root


def test_two_worker_deepspeed_run_checkpoints_exports_and_resumes(prepared):
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

    # Same config, more steps: resumes from the step-4 checkpoint instead of starting over.
    longer = _job(prepared, max_steps=6)
    assert run_dir_name(longer.train) == run_dir_name(job.train)
    resumed = run_train(longer, storage)
    assert resumed["final_metrics"]["step"] == 6
    rows = (Path(prepared) / "train" / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [5, 6]
