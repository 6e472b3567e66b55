"""Running stages one by one or chained, and the plan that says which would run.

Every stage runs through ``run_stage``, whether ``pcd-ray <stage>`` (also under ``ray job submit``) or the
pipeline: it takes the provenance record of the stage's inputs, runs the stage, and stamps the record into each
output. ``pcd-ray pipeline`` runs the job's stages in dependency order and skips a stage whose outputs are up to
date: committed, made by this config, from inputs whose commit ids are the current ones. Since a stage that ran
gives its outputs new commit ids, the stages that read them are stale when their turn comes. ``plan`` predicts
the same without running anything: ``pcd-ray status`` and ``pcd-ray pipeline --dry-run``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pcd_ray import provenance
from pcd_ray.config import JobConfig, dump
from pcd_ray.console import say
from pcd_ray.provenance import State
from pcd_ray.stages import Stage, ordered, upstream
from pcd_ray.storage import Storage


def stage_state(stage: Stage, job: JobConfig, storage: Storage) -> State:
    if stage.section(job) is None:
        return State("no section")
    return provenance.state(storage, stage.name, stage.config(job), stage.inputs(job), stage.outputs(job))


def run_stage(stage: Stage, job: JobConfig, storage: Storage) -> Any:
    """Run one stage and record in its outputs what they were made from; returns the stage's result."""
    record = provenance.take(storage, stage.name, stage.config(job), stage.inputs(job))
    result = stage.run(job, storage)
    for output in stage.outputs(job):
        provenance.stamp(storage, output, record)
    return result


@dataclass(frozen=True)
class Step:
    stage: str
    outputs: list[str]
    state: State
    runs: bool
    """Whether the pipeline would run it now (its own state, or a stage it reads from runs first)."""


def plan(job: JobConfig, storage: Storage, *, force: bool = False, only: list[str] | None = None) -> list[Step]:
    """Each stage of the job in run order with its state, and whether ``run_pipeline`` would run it."""
    deps = upstream(job, storage)
    steps: list[Step] = []
    running: set[str] = set()
    for stage in ordered(job, storage):
        state = stage_state(stage, job, storage)
        selected = not only or stage.name in only
        before = sorted(deps[stage.name] & running)
        if state.current and before:
            state = State("stale", f"{before[0]} runs first and changes its input", state.made, state.rows)
        runs = selected and (force or not state.current)
        if runs:
            running.add(stage.name)
        steps.append(Step(stage.name, [storage.resolve(o.uri) for o in stage.outputs(job)], state, runs))
    return steps


def format_plan(steps: list[Step], *, verb: str = "would run") -> str:
    """The stage graph as a table: stage, state (and why), when made, rows, output; then what a pipeline run does."""
    head = ("stage", "state", "made", "rows", "output")
    rows = [
        (
            s.stage,
            s.state.status + (f": {s.state.reason}" if s.state.reason else ""),
            s.state.made or "-",
            "-" if s.state.rows is None else str(s.state.rows),
            ", ".join(s.outputs),
        )
        for s in steps
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths)) + "  " + r[4] for r in [head, *rows]]
    runs = [s.stage for s in steps if s.runs]
    lines.append(f"pipeline {verb}: {', '.join(runs) if runs else 'nothing (all up to date)'}")
    return "\n".join(lines)


def run_pipeline(
    job: JobConfig, storage: Storage, *, force: bool = False, only: list[str] | None = None
) -> dict[str, Any]:
    """Run every stage of the job that is not up to date, in dependency order; returns {stage: result or
    "skipped"}. ``force`` runs them all; ``only`` limits the run to those stages."""
    from pcd_ray.runtime import init_ray

    init_ray(job.ray)
    results: dict[str, Any] = {}
    storage.write_text("job.yaml", dump(job))
    for stage in ordered(job, storage):
        if only and stage.name not in only:
            continue
        t0 = time.perf_counter()
        # Judged now, not planned up front: a stage that ran gave its outputs new commit ids, so the stages that
        # read them find themselves stale.
        state = stage_state(stage, job, storage)
        if state.current and not force:
            say(f"== {stage.name}: up to date, skipped")
            results[stage.name] = "skipped"
            continue
        # One line per stage, once it ends: the stage's own lines (prefixed with its name) show it running.
        why = f"{state.status}{f' ({state.reason})' if state.reason else ''}"
        try:
            results[stage.name] = run_stage(stage, job, storage)
        except BaseException:
            say(f"== {stage.name}: {why}; failed after {time.perf_counter() - t0:.1f} s")
            raise
        say(f"== {stage.name}: {why}; ran in {time.perf_counter() - t0:.1f} s")
    return results
