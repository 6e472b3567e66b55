"""The stages in order, and running them one by one or chained.

Each stage reads artifacts at URIs and writes artifacts at URIs, so ``pcd-ray <stage>`` runs it alone (also as
``ray job submit -- pcd-ray <stage> ...``) and ``pcd-ray pipeline`` chains them. A chained stage whose output is
already committed with the same config is skipped (re-running the demo resumes instead of starting over); once a
stage runs, every later stage runs too, since its inputs changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from pcd_ray import artifacts
from pcd_ray.config import JobConfig, dump
from pcd_ray.storage import Storage, join


def _data(job: JobConfig, storage: Storage) -> Any:
    from pcd_ray.data.readers import make_images_artifact

    return make_images_artifact(job, storage)


def _pairs(job: JobConfig, storage: Storage) -> Any:
    from pcd_ray.data.pairs import sample_pairs

    return sample_pairs(job, storage)


def _generate(job: JobConfig, storage: Storage) -> Any:
    from pcd_ray.generate.job import run_generate

    return run_generate(job, storage)


def _train(section: str) -> Callable[[JobConfig, Storage], Any]:
    def run(job: JobConfig, storage: Storage) -> Any:
        from pcd_ray.train.trainer import run_train

        return run_train(job, storage, section)

    return run


def _embed(job: JobConfig, storage: Storage) -> Any:
    from pcd_ray.embed.job import run_embed

    return run_embed(job, storage)


def _eval(job: JobConfig, storage: Storage) -> Any:
    from pcd_ray.eval.job import run_eval

    return run_eval(job, storage)


@dataclass(frozen=True)
class Stage:
    name: str  # also the job-file section it reads
    run: Callable[[JobConfig, Storage], Any]

    def section(self, job: JobConfig):
        return getattr(job, self.name)

    def up_to_date(self, job: JobConfig, storage: Storage) -> bool:
        """True when this stage's output is committed and was made by exactly this section's config."""
        cfg = self.section(job)
        if self.name in ("base_train", "train"):
            done = join(cfg.output, "config.yaml")
            return storage.exists(join(cfg.output, "export", "open_clip_config.json")) and \
                storage.exists(done) and storage.read_text(done) == dump(cfg)
        if self.name == "eval":
            return False  # cheap, and its inputs (models) may have changed under the same URIs
        uri = cfg.output
        if not artifacts.exists(storage, uri):
            return False
        manifest = artifacts.read_manifest(storage, uri)
        # An artifact committed piece by piece (generate) is up to date only once finished; a re-run resumes it.
        return manifest.get("complete", True) and manifest.get("config") == cfg.model_dump(mode="json")


# embed sits between base_train (whose export it may embed with) and train (which reads it); like base_train it
# runs only when the job has its section.
STAGES = [Stage("data", _data), Stage("pairs", _pairs), Stage("generate", _generate),
          Stage("base_train", _train("base_train")), Stage("embed", _embed), Stage("train", _train("train")),
          Stage("eval", _eval)]


def run_pipeline(job: JobConfig, storage: Storage, *, force: bool = False,
                 only: list[str] | None = None) -> dict[str, Any]:
    """Run every stage of the job in order (those with a section); returns {stage: result or "skipped"}."""
    from pcd_ray.runtime import init_ray

    init_ray(job.ray)
    results: dict[str, Any] = {}
    dirty = force
    storage.write_text("job.yaml", dump(job))
    for stage in STAGES:
        if stage.section(job) is None or (only and stage.name not in only):
            continue
        t0 = time.perf_counter()
        if not dirty and stage.up_to_date(job, storage):
            print(f"== {stage.name}: up to date, skipped", flush=True)
            results[stage.name] = "skipped"
            continue
        dirty = True
        print(f"== {stage.name} ...", flush=True)
        results[stage.name] = stage.run(job, storage)
        print(f"== {stage.name}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    return results
