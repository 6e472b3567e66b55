"""Assembling the Ray Train TorchTrainer for a train section (``train`` or ``base_train``) of a job.

The driver builds the Ray Dataset (joins + preprocessing run on Ray Data workers), hands it to the trainer
(``get_dataset_shard`` splits it across workers), and points Ray Train's storage at ``<output>/<run_name>-<hash>``
on the job's storage (local or s3://). Re-running the same config on the same inputs resumes from its latest
checkpoint.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pcd_ray.config import JobConfig, TrainConfig, dump
from pcd_ray.metrics import require_sinks, tensorboard_command
from pcd_ray.runtime import init_ray
from pcd_ray.storage import Storage, is_remote, join
from pcd_ray.train.engine import worker_env_vars

log = logging.getLogger(__name__)


# Fields that may change between a run and its resumption (train longer, checkpoint more often, ...).
RESUMABLE_FIELDS = {
    "epochs",
    "max_steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "max_failures",
    "embeddings",
    "wise_ft_alpha",
    "metrics",
}


def run_dir_name(cfg: TrainConfig, inputs: dict[str, str | None] | None = None) -> str:
    """``<run_name>-<fingerprint>``: re-running the same config on the same inputs resumes its latest checkpoint;
    changing anything that shapes the model (lr, loss, ...) or any input (new diffs, a new base export: ``inputs``
    maps each input the stage declares to its commit id, as the pipeline passes them) starts a new run beside the
    old one instead of resuming a run that trained on something else."""
    import hashlib
    import json

    identity = {"config": cfg.model_dump(mode="json", exclude=RESUMABLE_FIELDS), "inputs": inputs or {}}
    return f"{cfg.run_name}-{hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]}"


def _run_config(cfg: TrainConfig, storage: Storage, name: str):
    import ray.train

    root = storage.resolve(cfg.output)
    fs, path = storage.arrow_fs(root)
    return ray.train.RunConfig(
        name=name,
        storage_path=path if is_remote(root) else root,
        storage_filesystem=fs if is_remote(root) else None,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        worker_runtime_env={"env_vars": worker_env_vars(cfg)},
    )


def _checkpoint_uri(checkpoint, output_uri: str) -> str | None:
    """A Ray Train checkpoint's location as a URI (on a remote filesystem Ray gives "bucket/key" without scheme)."""
    if checkpoint is None:
        return None
    if is_remote(output_uri) and "://" not in checkpoint.path:
        return f"{output_uri.split('://', 1)[0]}://{checkpoint.path}"
    return checkpoint.path


def resume_position(cfg: TrainConfig, storage: Storage, name: str) -> dict[str, Any] | None:
    """The data position saved in the run's most advanced checkpoint (the one Ray Train resumes), or None.

    Ray Train restores the checkpoint itself; the driver only needs the epoch, to start Ray Data's per-epoch
    shuffle seeds where the interrupted run left off.
    """
    from pcd_ray.train.loop import POSITION_FILE

    run = join(cfg.output, name)
    found = [u for u in storage.find(run) if u.endswith("/" + POSITION_FILE)]
    positions = [storage.read_json(u) for u in found]
    return max(positions, key=lambda p: p["step"], default=None)


def with_driver_sinks(cfg: TrainConfig) -> TrainConfig:
    """MLflow without a tracking URI means the driver's: MLFLOW_TRACKING_URI, else its default store where the
    command runs. Rank 0 logs from another process (another cwd, maybe another node and environment), where the
    same default would land in a Ray temp directory; so it gets the URI the driver resolves."""
    m = cfg.metrics
    if not m.mlflow_experiment or m.mlflow_tracking_uri:
        return cfg
    import mlflow

    return cfg.model_copy(update={"metrics": m.model_copy(update={"mlflow_tracking_uri": mlflow.get_tracking_uri()})})


def run_train(
    job: JobConfig, storage: Storage, section: str = "train", inputs: dict[str, str | None] | None = None
) -> dict[str, Any]:
    """Train one section of the job; returns a summary (also written to <output>/summary.json). ``inputs``: the
    commit id of each input (``stages.py`` passes them), part of the run directory's fingerprint."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pcd_ray.train.data import build_train_dataset, start_at_epoch
    from pcd_ray.train.loop import train_loop_per_worker

    cfg: TrainConfig | None = getattr(job, section)
    if cfg is None:
        raise ValueError(f"job has no {section!r} section")
    require_sinks(cfg.metrics)  # a configured W&B / MLflow without its package stops here, before any work
    cfg = with_driver_sinks(cfg)
    init_ray(job.ray)
    t0 = time.perf_counter()
    print(f"[{section}] building the training set ({cfg.data}) ...", flush=True)
    ds, rows, precomputed = build_train_dataset(cfg, storage)
    print(
        f"[{section}] {rows} rows; {cfg.epochs} epoch(s) of {rows // cfg.batch_size} steps at batch "
        f"{cfg.batch_size} on {cfg.scaling.num_workers} worker(s); image tower "
        f"{'embedded once up front (frozen)' if precomputed else 'runs on pixels every step'}",
        flush=True,
    )
    name = run_dir_name(cfg, inputs)
    run_uri = storage.resolve(join(cfg.output, name))
    if cfg.metrics.tensorboard:
        log.info("[%s] training curves: %s", section, tensorboard_command(run_uri))
    position = resume_position(cfg, storage, name)
    if position:
        print(
            f"[{section}] resuming {name} at step {position['step']} (epoch {position['epoch']}, "
            f"{position['batches_in_epoch']} batches into it)",
            flush=True,
        )
        start_at_epoch(ds, position["epoch"])  # epoch e of the resumed run gets the order epoch e had
    scaling = cfg.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "storage": storage.portable_cfg().model_dump(mode="json"),
            "rows": rows,
            "precomputed": precomputed,
            "run_dir_name": name,
            "section": section,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        # gloo on CPU workers; nccl when each worker holds a GPU.
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=_run_config(cfg, storage, name),
        datasets={"train": ds},
    )
    result = trainer.fit()
    summary = {
        "section": section,
        "rows": rows,
        "final_metrics": result.metrics,
        "checkpoint": _checkpoint_uri(result.checkpoint, storage.resolve(cfg.output)),
        "export": storage.resolve(join(cfg.output, "export")),
        "run_dir": run_uri,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    storage.write_json(join(cfg.output, "summary.json"), summary)
    storage.write_text(join(cfg.output, "config.yaml"), dump(cfg))
    print(f"[{section}] done in {summary['wall_s']} s; export at {summary['export']}", flush=True)
    return summary
