"""Job configs the Ray Train tests share."""

from __future__ import annotations

from pcd_ray.config import JobConfig


def train_job(root: str, **train) -> JobConfig:
    return JobConfig.model_validate(
        {
            "storage": {"root": root},
            "data": {"synthetic": {"num_train": 192, "num_test": 8, "image_size": 32, "rows_per_shard": 96}},
            "pairs": {"num_pairs": 160},
            "train": {
                "model": {"name": "pcd-micro"},
                # full: logit_scale (a 0-dim parameter) trains too -- deepspeed 0.19.8 fails on exactly that.
                "trainable": "full",
                "batch_size": 16,
                "max_steps": 4,
                "log_every": 1,
                "checkpoint_every": 2,
                "loss": {"diff_weight": 1.0, "clip_weight": 0.5},
                "optimizer": {"lr": 1e-3},
                # Accumulating 2 micro batches of 4 per worker: steps count optimizer steps, not micro batches.
                "deepspeed": {"zero_stage": 2, "gradient_accumulation_steps": 2},
                "scaling": {"num_workers": 2, "cpus_per_worker": 1},
                **train,
            },
        }
    )
