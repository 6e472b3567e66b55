"""The CPU train workers' allocator settings (engine.CPU_WORKER_ENV) reach the worker processes: the trainer's
RunConfig puts them in Ray Train's worker runtime env, and glibc reads them at process start (so they cannot be set
from inside the loop). GPU workers get none. What they buy is measured by benchmarks/train_throughput.py
(``ray-ds`` against ``ray-ds-stock``, system CPU ms per sample)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pcd_ray.config import StorageConfig, TrainConfig
from pcd_ray.storage import Storage
from pcd_ray.train.engine import CPU_WORKER_ENV
from pcd_ray.train.trainer import _run_config, run_dir_name


def _record_env(config):
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps({k: os.environ.get(k) for k in CPU_WORKER_ENV}))


def test_gpu_workers_keep_the_default_allocator(tmp_path):
    cfg = TrainConfig.model_validate({"scaling": {"use_gpu": True}})
    run_config = _run_config(cfg, Storage(StorageConfig(root=str(tmp_path))), run_dir_name(cfg))
    assert run_config.worker_runtime_env == {"env_vars": {}}


def test_cpu_train_workers_start_with_the_allocator_env(ray_local, tmp_path):
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/ by name
    cfg = TrainConfig.model_validate({"output": "train", "scaling": {"num_workers": 2}})
    assert not any(os.environ.get(k) for k in CPU_WORKER_ENV), "the test's own process must not have them"
    out = tmp_path / "env.json"
    TorchTrainer(
        _record_env,
        train_loop_config={"out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=_run_config(cfg, Storage(StorageConfig(root=str(tmp_path))), run_dir_name(cfg)),
    ).fit()
    assert json.loads(out.read_text()) == CPU_WORKER_ENV
