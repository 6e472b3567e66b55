"""The generate stage: pairs -> difference texts (``diffs``) and the outputs the filter dropped (``rejects``).

A streaming Ray Data job that can be killed at any point and re-run (``pcd_ray.sink`` does the writing, committing,
resuming and progress):

1. the pairs already committed to ``diffs`` or ``rejects`` by a run with the same settings (``identity``) are
   removed from the input;
2. an actor pool of fixed size runs the engine (built once per actor: an LLM loads once) and the paper's filter
   (``actor.GenerateActor``);
3. Ray tasks write each block of results as one diffs shard and one rejects shard, and the driver commits them into
   both manifests every ``commit_every_s`` seconds.

A pair is committed with the shard that holds it, and only once: shards of a killed run were never committed and are
deleted by the next run, which regenerates their pairs. At the end every pair of the input is in exactly one of the
two artifacts (checked, not assumed), and a summary is written into both manifests and ``<diffs>/_summary.json``.

Imports numpy, pyarrow and ray only (no torch): see ``base.py``.
"""

from __future__ import annotations

import logging
from typing import Any

from pcd_ray.generate.actor import GenerateActor

log = logging.getLogger(__name__)

INPUT_COLUMNS = ["pair_id", "caption_a", "caption_b", "attributes_a", "attributes_b"]
DIFF_COLUMNS = ["pair_id", "text", "raw", "engine", "prompt_version"]
REJECT_COLUMNS = ["pair_id", "raw", "reason", "engine", "prompt_version"]
SUMMARY_FILE = "_summary.json"
ROWS_PER_SHARD = 4096
"""Rows per written shard (both artifacts): few enough files at millions of pairs, small enough to commit often."""


def identity(cfg, pairs_manifest: dict, storage) -> dict[str, Any]:
    """What makes two runs' outputs interchangeable: only then may a run resume the other's committed rows."""
    c = cfg.model_dump(mode="json")
    return {
        "input": storage.resolve(cfg.input),
        "input_attempt": pairs_manifest.get("attempt"),
        **{k: c[k] for k in ("engine", "prompt_version", "seed")},
        # The rule engine ignores the LLM and sampling settings; changing them must not discard its output.
        **({k: c[k] for k in ("llm", "sampling")} if cfg.engine != "rule" else {}),
    }


def actor_resources(cfg) -> dict[str, float]:
    """Ray resources of one engine actor: vLLM holds llm.tensor_parallel_size GPUs; the driver asks for none."""
    gpus = cfg.num_gpus_per_actor
    if gpus is None:
        gpus = float(cfg.llm.tensor_parallel_size) if cfg.engine == "vllm" else 0.0
    return {"num_cpus": cfg.num_cpus_per_actor, "num_gpus": gpus}


def block_tokens(table) -> dict[str, int]:
    """Per-block stats (run in the write tasks): tokens the engine generated."""
    import pyarrow.compute as pc

    return {"tokens": int(pc.sum(table.column("tokens")).as_py() or 0)}


def _check_cpus(cfg) -> None:
    """Warn when the engine actors would take every CPU of the cluster."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    if cfg.num_actors * cfg.num_cpus_per_actor >= cpus:
        # Without an autoscaler to add nodes, the actors would hold every CPU and Ray Data's read and write tasks
        # would never run: the job would hang, not fail.
        log.warning("generate: %d actors x %s CPUs take all %s CPUs of the cluster; read/write tasks need some "
                    "left (lower generate.num_cpus_per_actor or add nodes)", cfg.num_actors, cfg.num_cpus_per_actor,
                    cpus)


def _check_unique(ds, pairs_manifest: dict, uri: str) -> None:
    """Exactly once needs unique pair ids. pcd-ray's sampler guarantees them (and says so in its manifest);
    a pairs artifact from elsewhere is checked with a distributed group-by."""
    if pairs_manifest.get("summary", {}).get("unique_pair_ids"):
        return
    dups = ds.select_columns(["pair_id"]).groupby("pair_id").count().filter(
        lambda r: r["count()"] > 1).take(5)
    if dups:
        raise RuntimeError(f"{uri}: duplicate pair ids, e.g. {[d['pair_id'] for d in dups]}; every pair must have "
                           f"its own id (pcd-ray pairs writes sha1 ids of the ordered image ids)")


def _engines(todo, cfg):
    """Pairs -> one GenerateActor output row per pair, from a fixed pool of engine actors."""
    import ray.data

    # Blocks of a few batches, whatever the pairs artifact's file sizes: one big file would otherwise be one block,
    # i.e. one actor busy and the rest idle (a streaming split, no barrier).
    return todo.repartition(target_num_rows_per_block=cfg.batch_size * 4).map_batches(
        GenerateActor,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "in_worker": True},
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        udf_modifying_row_count=False,
        # Ray Data's actor pools restart a dead actor (a crashed LLM engine) and retry its batch by default
        # (max_restarts=-1, max_task_retries=-1); a row the engine rejects never fails the job (GenerateActor).
        **actor_resources(cfg),
    )


def _summary(t, cfg, storage, pairs_in: int) -> dict[str, Any]:
    """The stage's summary fields (the sink adds rejected, rejected_by_reason, wall_s, skipped, processed, resumed,
    complete). Startup vs steady state: for an LLM job of hours only the second matters, for a small job the first
    dominates; both are reported."""
    steady = t.steady_per_s()
    return {
        "pairs_in": pairs_in, "written": t.kept, "engine": cfg.engine, "prompt_version": cfg.prompt_version,
        "model": cfg.llm.model if cfg.engine != "rule" else None, "tokens": t.stats.get("tokens", 0),
        "pairs_per_s": round(t.per_s(t.processed), 2),
        "first_result_s": None if t.first is None else round(t.first[0], 3),
        "steady_pairs_per_s": None if steady is None else round(steady, 2),
        "tokens_per_s": round(t.per_s(t.stats.get("tokens", 0)), 1),
        "diffs": storage.resolve(cfg.output), "rejects": storage.resolve(cfg.rejects),
    }


def run_generate(job, storage) -> dict[str, Any]:
    """Write ``diffs`` and ``rejects`` for every pair of ``job.generate.input``, resuming a killed run; returns the
    stage summary.

    Summary keys: pairs_in, skipped (committed before this run), processed (this run), written and rejected (totals
    over the artifact), rejected_by_reason {reason: n} (totals), engine, prompt_version, model, tokens (this run),
    wall_s, pairs_per_s, first_result_s, steady_pairs_per_s and tokens_per_s (this run), resumed, complete, diffs,
    rejects (URIs).
    Raises ArtifactError if the pairs artifact is missing or empty, KeyError for an unknown engine or prompt version,
    RuntimeError if the output does not account for every pair exactly once.
    """
    from pcd_ray import artifacts
    from pcd_ray.runtime import init_ray
    from pcd_ray.sink import Output, Sink
    from pcd_ray.storage import join

    cfg = job.generate
    init_ray(job.ray)
    pairs = artifacts.read_manifest(storage, cfg.input, "pairs")
    pairs_in = int(pairs["num_rows"])
    # attributes_* are optional in a pairs artifact (real datasets have none); engines that need them reject the row.
    columns = [c for c in INPUT_COLUMNS if c in pairs["columns"]]
    ds = artifacts.read_dataset(storage, cfg.input, "pairs", columns=columns)
    _check_unique(ds, pairs, storage.resolve(cfg.input))
    _check_cpus(cfg)
    sink = Sink(storage, "generate", unit="pair", kept=Output(cfg.output, "diffs", DIFF_COLUMNS),
                rejected=Output(cfg.rejects, "rejects", REJECT_COLUMNS), config=cfg.model_dump(mode="json"),
                identity=identity(cfg, pairs, storage), resume=cfg.resume, key="pair_id",
                commit_every_s=cfg.commit_every_s)
    summary = sink.run(ds, lambda todo: _engines(todo, cfg), expected=pairs_in,
                       summary=lambda t: _summary(t, cfg, storage, pairs_in), stats=block_tokens, rates=("tokens",),
                       rows_per_shard=min(ROWS_PER_SHARD, max(cfg.batch_size, pairs_in // 16 + 1)), write_cpus=0.25)
    storage.write_json(join(sink.kept.base, SUMMARY_FILE), summary)
    return summary
