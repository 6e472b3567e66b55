"""``pcd-ray doctor``: is this environment able to run this job? One row per check, before anything is submitted.

A job that lacks a GPU, a compiled DeepSpeed op, a package pin or a writable bucket fails late: after the cluster
scaled up, the data stage ran, or the first train step compiled for minutes. Each check here is cheap, names what
it found, and on failure the command or config key that fixes it. Only what the given config needs can fail (a
missing vLLM fails only a vllm generate engine); everything else is at most a warning. The checks import what
they probe lazily (torch, DeepSpeed only for ops the config needs, Ray only to join a configured cluster), so the
doctor never starts Ray and never loads vLLM unless the job would.

Checks, one module each: ``packages`` (Python, pins, vLLM), ``gpu`` (driver vs torch's CUDA, NCCL), ``ops``
(DeepSpeed ops), ``resources`` (stages vs cluster), ``storage`` (probe write under storage.root).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from pcd_ray.config import JobConfig
from pcd_ray.doctor import gpu, ops, packages, resources, storage
from pcd_ray.doctor.rows import FAIL, OK, SKIP, WARN, Row, failed, format_rows, one_line

__all__ = ["FAIL", "OK", "SKIP", "WARN", "Row", "failed", "format_rows", "run_doctor", "write_json"]


def _guarded(group: str, run: Callable[[], list[Row]]) -> list[Row]:
    """A check that crashes is reported as its own failure; the other checks still run."""
    try:
        return run()
    except Exception as e:  # the doctor must finish and say what broke
        return [Row(group, FAIL, f"the check itself crashed: {one_line(e)}", "report this with the output above")]


def run_doctor(job: JobConfig) -> list[Row]:
    requests = resources.stage_requests(job)
    gpu_stages = resources.needs_gpus(requests)
    gpu_train = [name for name, cfg in ops.train_sections(job) if cfg.scaling.use_gpu]
    facts = gpu.gather()
    return [
        *_guarded("packages", lambda: packages.check(job)),
        gpu.gpu_row(facts, bool(gpu_stages), "no stage asks for GPUs"),
        gpu.nccl_row(facts, bool(gpu_train), "no train section uses GPUs"),
        *_guarded(ops.CHECK, lambda: ops.check(job)),
        *_guarded("cluster", lambda: resources.check(job, requests, facts.device_count)),
        *_guarded(storage.CHECK, lambda: storage.check(job.storage)),
    ]


def write_json(rows: list[Row], path: str | Path, config: str) -> None:
    """The rows as JSON, for scripts: {"config", "checks", "failed", "rows": [{check, verdict, detail, fix}]}."""
    doc = {"config": config, "checks": len(rows), "failed": len(failed(rows)), "rows": [r.to_dict() for r in rows]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
