"""Losing a worker for real: a SIGKILLed Ray Train worker process, with and without FailureConfig.

1. max_failures=0: the kill stops the run; its checkpoints stay on storage.
2. The same config relaunched (max_failures=1) resumes from the stopped run's checkpoint, not from step 0; a second
   kill mid-way is absorbed by FailureConfig (the worker group restarts from its latest checkpoint) and the run ends
   at exactly max_steps, with every logged step in metrics.csv once.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from train_helpers import train_job

from pcd_ray.storage import Storage

pytestmark = pytest.mark.integration

MAX_STEPS, EVERY = 40, 5  # 4 epochs of 10 steps


def _job(root: str, max_failures: int):
    return train_job(
        root,
        output="train-ft",
        epochs=4,
        max_steps=MAX_STEPS,
        checkpoint_every=EVERY,
        log_every=EVERY,
        keep_checkpoints=3,
        max_failures=max_failures,
    )


def _checkpointed_steps(run_dir: Path) -> list[int]:
    steps = []
    for p in run_dir.rglob("pcd_position.json"):
        try:
            steps.append(json.loads(p.read_text())["step"])
        except (OSError, ValueError):  # being written right now
            pass
    return steps


class Killer(threading.Thread):
    """Waits for a checkpoint at or past ``step`` in ``run_dir``, then SIGKILLs one live Ray Train worker."""

    def __init__(self, run_dir: Path, step: int, timeout_s: float = 600):
        super().__init__(daemon=True)
        self.run_dir, self.step, self.timeout_s = run_dir, step, timeout_s
        self.killed_pid: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        import ray
        from ray.util.state import list_actors

        address = ray.get_runtime_context().gcs_address  # the test's own Ray, not another one on the machine
        deadline = time.time() + self.timeout_s
        while not self.stop.is_set() and time.time() < deadline:
            if any(s >= self.step for s in _checkpointed_steps(self.run_dir)):
                alive = list_actors(
                    address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
                )
                if alive:
                    self.killed_pid = alive[-1].pid
                    os.kill(self.killed_pid, signal.SIGKILL)
                    return
            time.sleep(0.05)


def test_killed_worker_stops_run_relaunch_resumes_and_failure_config_restarts(prepared):
    import ray.train

    from pcd_ray.train.trainer import resume_position, run_dir_name, run_train

    storage = Storage(_job(prepared, 0).storage)
    inputs = None  # run_train called directly: the run directory follows the config alone
    name = run_dir_name(_job(prepared, 0).train, inputs)
    run_dir = Path(prepared) / "train-ft" / name
    assert name == run_dir_name(_job(prepared, 1).train, inputs)  # max_failures does not change the run

    # 1. No retries: a killed worker ends the run.
    killer = Killer(run_dir, EVERY)
    killer.start()
    with pytest.raises(ray.train.TrainingFailedError):
        run_train(_job(prepared, 0), storage)
    killer.join(5)
    assert killer.killed_pid, "the run finished before a worker could be killed"
    stopped_at = resume_position(_job(prepared, 1).train, storage, name)["step"]
    assert EVERY <= stopped_at < MAX_STEPS

    # 2. Relaunch with one retry: resumes at stopped_at, survives a second kill, ends at exactly MAX_STEPS.
    # The kill waits for the second new checkpoint: a checkpoint directory appears while it uploads, before Ray
    # Train registers it, so killing at the first one could still restart from stopped_at.
    killer = Killer(run_dir, stopped_at + 2 * EVERY)
    killer.start()
    try:
        summary = run_train(_job(prepared, 1), storage)
    finally:
        killer.stop.set()
    assert killer.killed_pid, "the relaunched run finished before a worker could be killed"
    final = summary["final_metrics"]
    assert final["step"] == MAX_STEPS
    # The last start of the worker group (FailureConfig's restart) resumed from a checkpoint after stopped_at.
    assert stopped_at + EVERY <= final["resumed_from_step"] < MAX_STEPS
    with open(Path(prepared) / "train-ft" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == list(range(EVERY, MAX_STEPS + 1, EVERY))
    assert (Path(prepared) / "train-ft" / "export" / "open_clip_config.json").exists()
