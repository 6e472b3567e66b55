"""The stages: what each reads and writes, as declared here, and how to run it.

Each stage is a job-file section (``data``, ``pairs``, ...) with a run function and two declarations computed from
that section: its inputs (artifacts, exports, files and models it reads) and its outputs. The pipeline derives
everything else from them: the order (a stage follows every stage whose output it reads), staleness (provenance.py
compares what an output's record says it was made from with what the stage would read now) and the plan that
``pcd-ray status`` and ``pcd-ray pipeline --dry-run`` print. No stage is special-cased by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pcd_ray.config import EvalConfig, JobConfig, ModelSpec, TrainConfig
from pcd_ray.provenance import Ref
from pcd_ray.storage import Storage, join


def model_ref(name: str, spec: ModelSpec) -> Ref:
    """A model input: an export (its weights id) or a model loaded by name (its name and pretrained tag)."""
    if spec.checkpoint:
        return Ref(name, spec.checkpoint, "export")
    return Ref(name, f"{spec.name}:{spec.pretrained or 'random-init'}", "model")


# ------------------------------------------------------------------------------------- inputs and outputs
def _data_io(job: JobConfig) -> tuple[list[Ref], list[Ref]]:
    # The sources outside pcd-ray (COCO JSON, shards, folders) are named by the config, which the record holds.
    d = job.data
    return [], [Ref("images", d.output, "artifact"), Ref("image_rejects", d.rejects, "artifact")]


def _pairs_io(job: JobConfig) -> tuple[list[Ref], list[Ref]]:
    p = job.pairs
    return [Ref("images", p.input, "artifact")], [Ref("pairs", p.output, "artifact")]


def _generate_io(job: JobConfig) -> tuple[list[Ref], list[Ref]]:
    g = job.generate
    return [Ref("pairs", g.input, "artifact")], [
        Ref("diffs", g.output, "artifact"),
        Ref("rejects", g.rejects, "artifact"),
    ]


def _comparatives_io(job: JobConfig) -> tuple[list[Ref], list[Ref]]:
    from pcd_ray.generate.comparatives import REJECTS_KIND, SYNTHETIC, requested

    c, e = job.comparatives, job.eval
    # The eval datasets' roots are outside pcd-ray (named by eval.datasets, as for eval); the synthetic set is the
    # images artifact.
    names, _ = requested(job)
    inputs = [Ref("images", e.images, "artifact")] if SYNTHETIC in names and e.images is not None else []
    if c.select == "confused":
        name, spec = next(iter(e.models.items()))
        inputs.append(model_ref(f"models.{name}", spec))
    return inputs, [Ref("comparatives", c.output, "artifact"), Ref(REJECTS_KIND, c.rejects, "artifact")]


def _embed_io(job: JobConfig) -> tuple[list[Ref], list[Ref]]:
    e = job.embed
    return [Ref("images", e.input, "artifact"), model_ref("model", e.model)], [Ref("embeddings", e.output, "artifact")]


def _train_io(cfg: TrainConfig) -> tuple[list[Ref], list[Ref]]:
    from pcd_ray.train.data import image_features_precomputed

    inputs = [Ref("images", cfg.images, "artifact")]
    if cfg.data == "pairs":
        inputs += [Ref("pairs", cfg.pairs, "artifact"), Ref("diffs", cfg.diffs, "artifact")]
    if cfg.embeddings and image_features_precomputed(cfg):
        inputs.append(Ref("embeddings", cfg.embeddings, "artifact"))
    inputs.append(model_ref("model", cfg.model))
    outputs = [Ref("export", join(cfg.output, "export"), "export")]
    if cfg.wise_ft_alpha is not None:
        outputs.append(Ref("export-wiseft", join(cfg.output, "export-wiseft"), "export"))
    return inputs, outputs


def _eval_io(job: JobConfig) -> tuple[list[Ref], list[Ref]]:
    cfg: EvalConfig = job.eval
    inputs = [Ref("images", cfg.images, "artifact")] if cfg.images is not None else []
    inputs += [model_ref(f"models.{name}", spec) for name, spec in cfg.models.items()]
    from pcd_ray.eval.pair_texts import names_artifact

    for name, ds in cfg.datasets.items():
        # The datasets' own files are named by the config; what pcd-ray made or users edit beside them is tracked.
        # A diffs artifact (CUB's differences) is an artifact input: its commit id, and its stage before eval.
        inputs += [
            Ref(
                f"datasets.{name}.{key}",
                getattr(ds, key),
                "artifact" if key == "differences" and names_artifact(ds.differences) else "file",
            )
            for key in ("differences", "comparatives")
            if getattr(ds, key)
        ]
    if job.comparatives is not None and cfg.comparatives is not None:
        # Eval reads the artifact whenever it is there; the job's own stage makes it an input to keep current.
        inputs.append(Ref("comparatives", cfg.comparatives, "artifact"))
    return inputs, [Ref("report", cfg.output, "report")]


# ----------------------------------------------------------------------------------------------------- runners
def _run_data(job: JobConfig, storage: Storage) -> dict[str, Any]:
    from pcd_ray.data.readers import make_images_artifact

    return make_images_artifact(job, storage)


def _run_pairs(job: JobConfig, storage: Storage) -> dict[str, Any]:
    from pcd_ray.data.pairs import sample_pairs

    return sample_pairs(job, storage)


def _run_generate(job: JobConfig, storage: Storage) -> dict[str, Any]:
    from pcd_ray.generate.job import run_generate

    return run_generate(job, storage)


def _run_comparatives(job: JobConfig, storage: Storage) -> dict[str, Any]:
    from pcd_ray.generate.comparatives import run_comparatives

    return run_comparatives(job, storage)


def _comparatives_config(job: JobConfig) -> dict[str, Any]:
    from pcd_ray.generate.comparatives import stage_config

    return stage_config(job)


def _run_embed(job: JobConfig, storage: Storage) -> dict[str, Any]:
    from pcd_ray.embed.job import run_embed

    return run_embed(job, storage)


def _run_train(section: str) -> Callable[[JobConfig, Storage], dict[str, Any]]:
    def run(job: JobConfig, storage: Storage) -> dict[str, Any]:
        from pcd_ray.provenance import commit_id
        from pcd_ray.train.trainer import run_train

        # New inputs mean a new Ray Train run directory, never a resume of a run that trained on the old ones.
        inputs = {r.name: commit_id(storage, r) for r in BY_NAME[section].inputs(job)}
        return run_train(job, storage, section, inputs=inputs)

    return run


def _run_eval(job: JobConfig, storage: Storage) -> dict[str, Any]:
    from pcd_ray.eval.job import run_eval

    return run_eval(job, storage)


@dataclass(frozen=True)
class Stage:
    name: str
    """Also the job-file section it reads."""
    run: Callable[[JobConfig, Storage], dict[str, Any]]
    io: Callable[[JobConfig], tuple[list[Ref], list[Ref]]]
    """(inputs, outputs) declared from the job; called only when the job has the section."""
    record: Callable[[JobConfig], dict[str, Any]] | None = None
    """The config its outputs record and are compared with; default: its section. A stage that runs another
    section's engine records the settings of it that decide its output too."""

    def section(self, job: JobConfig):
        return getattr(job, self.name)

    def config(self, job: JobConfig) -> dict[str, Any]:
        if self.record is not None:
            return self.record(job)
        return self.section(job).model_dump(mode="json")

    def inputs(self, job: JobConfig) -> list[Ref]:
        return self.io(job)[0]

    def outputs(self, job: JobConfig) -> list[Ref]:
        return self.io(job)[1]


STAGES = [
    Stage("data", _run_data, _data_io),
    Stage("pairs", _run_pairs, _pairs_io),
    Stage("generate", _run_generate, _generate_io),
    Stage("comparatives", _run_comparatives, _comparatives_io, _comparatives_config),
    Stage("base_train", _run_train("base_train"), lambda job: _train_io(job.base_train)),
    Stage("embed", _run_embed, _embed_io),
    Stage("train", _run_train("train"), lambda job: _train_io(job.train)),
    Stage("eval", _run_eval, _eval_io),
]
"""In an order that respects every dependency (``ordered`` checks it against the declarations)."""

BY_NAME = {s.name: s for s in STAGES}


def present(job: JobConfig) -> list[Stage]:
    """The stages this job has a section for."""
    return [s for s in STAGES if s.section(job) is not None]


def upstream(job: JobConfig, storage: Storage) -> dict[str, set[str]]:
    """{stage: the stages of this job whose outputs it reads}, matched by resolved URI."""
    stages = present(job)
    made_by = {storage.resolve(o.uri): s.name for s in stages for o in s.outputs(job)}
    return {
        s.name: {
            made_by[u]
            for u in (storage.resolve(i.uri) for i in s.inputs(job) if i.kind != "model")
            if u in made_by and made_by[u] != s.name
        }
        for s in stages
    }


def ordered(job: JobConfig, storage: Storage) -> list[Stage]:
    """The job's stages, every stage after the ones it reads from (STAGES' order among independent ones).

    Raises ValueError for a cycle (a job whose stages read each other's outputs).
    """
    deps = upstream(job, storage)
    done: list[str] = []
    pending = [s.name for s in present(job)]
    while pending:
        ready = next((n for n in pending if deps[n] <= set(done)), None)
        if ready is None:
            raise ValueError(f"the job's stages read each other's outputs in a cycle: {pending}")
        done.append(ready)
        pending.remove(ready)
    return [BY_NAME[n] for n in done]
