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

Engine faults are never rejects (``actor.py``): actors retry, Ray restarts them and sends their batches again, and
a job whose retries run out stops with ``EngineFailure``, naming the engine and the cause from the fault records
under ``<diffs>/_faults/``. Rejects an older version committed for engine errors are generated again on resume.

``generate_rows`` is all of this for any rows shaped like pairs: the comparatives stage (``comparatives.py``) runs
its class pairs through it.

Imports numpy, pyarrow and ray only (no torch): see ``base.py``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pcd_ray.generate.actor import LLM_ENGINES, EngineFailure, GenerateActor, engine_class
from pcd_ray.generate.weights import check_model

if TYPE_CHECKING:
    from pcd_ray.config import JobConfig
    from pcd_ray.storage import Storage

log = logging.getLogger(__name__)

INPUT_COLUMNS = ["pair_id", "caption_a", "caption_b", "attributes_a", "attributes_b"]
DIFF_COLUMNS = ["pair_id", "text", "raw", "engine", "prompt_version"]
REJECT_COLUMNS = ["pair_id", "raw", "reason", "engine", "prompt_version"]
SUMMARY_FILE = "_summary.json"
FAULTS_DIR = "_faults"
LEGACY_ENGINE_ERROR = "engine_error"
"""Reject reasons starting with this were engine faults committed as rejects by older versions: done again."""
ROWS_PER_SHARD = 4096
"""Rows per written shard (both artifacts): few enough files at millions of pairs, small enough to commit often."""


def identity(cfg, pairs_manifest: dict, storage) -> dict[str, Any]:
    """What makes two runs' outputs interchangeable: only then may a run resume the other's committed rows."""
    c = cfg.model_dump(mode="json")
    return {
        "input": storage.resolve(cfg.input),
        "input_attempt": pairs_manifest.get("attempt"),
        # The filter decides which texts are kept and what they read: a run under another filter starts over.
        **{k: c[k] for k in ("engine", "prompt_version", "seed", "filter")},
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
        log.warning(
            "generate: %d actors x %s CPUs take all %s CPUs of the cluster; read/write tasks need some "
            "left (lower generate.num_cpus_per_actor or add nodes)",
            cfg.num_actors,
            cfg.num_cpus_per_actor,
            cpus,
        )


def _check_unique(ds, pairs_manifest: dict, uri: str) -> None:
    """Exactly once needs unique pair ids. pcd-ray's sampler guarantees them (and says so in its manifest);
    a pairs artifact from elsewhere is checked with a distributed group-by."""
    if pairs_manifest.get("summary", {}).get("unique_pair_ids"):
        return
    dups = ds.select_columns(["pair_id"]).groupby("pair_id").count().filter(lambda r: r["count()"] > 1).take(5)
    if dups:
        raise RuntimeError(
            f"{uri}: duplicate pair ids, e.g. {[d['pair_id'] for d in dups]}; every pair must have "
            f"its own id (pcd-ray pairs writes sha1 ids of the ordered image ids)"
        )


def _engines(todo, cfg, storage, faults_uri: str):
    """Pairs -> one GenerateActor output row per pair, from a fixed pool of engine actors."""
    import ray.data

    # An engine with an async interface keeps batches_in_flight batches in flight per actor; Ray Data runs up to
    # four batches of one block concurrently in an async actor, so that many blocks per actor at once.
    concurrent_blocks = math.ceil(cfg.batches_in_flight / 4) if hasattr(engine_class(cfg), "agenerate") else 1
    with warnings.catch_warnings():
        # Ray 2.60 deprecates remote args passed as keywords but names no parameter for an actor pool's restarts
        # and task retries yet; without them a persistent fault would restart actors forever (Ray Data's default).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        # Blocks of a few batches, whatever the pairs artifact's file sizes: one big file would otherwise be one
        # block, i.e. one actor busy and the rest idle (a streaming split, no barrier).
        return todo.repartition(target_num_rows_per_block=cfg.batch_size * 4).map_batches(
            GenerateActor,
            fn_constructor_kwargs={
                "cfg": cfg.model_dump(mode="json"),
                "in_worker": True,
                "storage": storage.cfg.model_dump(mode="json"),
                "faults_uri": faults_uri,
            },
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors, max_concurrent_calls_per_actor=concurrent_blocks),
            batch_size=cfg.batch_size,
            batch_format="numpy",
            udf_modifying_row_count=False,
            # An actor whose batch failed every try ends its process; Ray restarts it (a fresh engine) and sends
            # the batch again, within these bounds, after which the job fails instead of retrying forever.
            max_restarts=cfg.faults.actor_restarts,
            max_task_retries=cfg.faults.batch_retries,
            **actor_resources(cfg),
        )


def read_faults(storage, uri: str, since: float) -> list[dict[str, Any]]:
    """The engine fault records under ``uri`` made after ``since`` (epoch seconds), oldest first."""
    if not storage.exists(uri):
        return []
    records = [storage.read_json(f) for f in storage.find(uri) if f.endswith(".json")]
    return sorted((r for r in records if r.get("time", 0) >= since), key=lambda r: r["time"])


def _failure(
    cfg, faults: list[dict[str, Any]], faults_uri: str, error: BaseException, label: str = "generate"
) -> EngineFailure:
    """The error a job stops with when its engine kept failing: the engine, the cause, where the records are."""
    final = [f for f in faults if f.get("final")] or faults
    engine = faults[-1]["engine"] if faults else cfg.engine
    if cfg.engine in LLM_ENGINES:
        engine += f" ({cfg.llm.model})"
    if final:
        last = final[-1]
        cause = f"{last['error']}: {last['message']}"
        where = f"{len(faults)} fault(s) this run, records in {faults_uri}"
    else:
        cause = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        where = "no fault was recorded: the actors died (out of host memory? killed?); see the Ray logs"
    return EngineFailure(
        f"{label}: the {engine} engine kept failing and its retries are spent (faults.batch_attempts="
        f"{cfg.faults.batch_attempts}, actor_restarts={cfg.faults.actor_restarts}, batch_retries="
        f"{cfg.faults.batch_retries}): {cause} ({where}). Every committed pair is kept; fix the cause and re-run "
        f"the same command to resume."
    )


def engine_fields(t, cfg) -> dict[str, Any]:
    """The engine's summary fields, shared by every stage that runs it. Startup vs steady state: for an LLM job of
    hours only the second matters, for a small job the first dominates; both are reported."""
    steady = t.steady_per_s()
    return {
        "engine": cfg.engine,
        "prompt_version": cfg.prompt_version,
        "model": cfg.llm.model if cfg.engine != "rule" else None,
        "tokens": t.stats.get("tokens", 0),
        "pairs_per_s": round(t.per_s(t.processed), 2),
        "first_result_s": None if t.first is None else round(t.first[0], 3),
        "steady_pairs_per_s": None if steady is None else round(steady, 2),
        "tokens_per_s": round(t.per_s(t.stats.get("tokens", 0)), 1),
    }


def _summary(t, cfg, storage, pairs_in: int) -> dict[str, Any]:
    """The stage's summary fields (the sink adds rejected, rejected_by_reason, wall_s, skipped, processed, resumed,
    complete)."""
    return {
        "pairs_in": pairs_in,
        "written": t.kept,
        **engine_fields(t, cfg),
        "diffs": storage.resolve(cfg.output),
        "rejects": storage.resolve(cfg.rejects),
    }


def check_engine_model(cfg, storage) -> None:
    """Before any actor starts (and Ray reserves GPUs for it): a misspelt, missing or gated model fails here."""
    if cfg.engine in LLM_ENGINES:
        check_model(cfg.llm.model, storage, revision=cfg.llm.revision)
        if cfg.llm.tokenizer:
            check_model(cfg.llm.tokenizer, storage, revision=cfg.llm.revision, what="generate.llm.tokenizer")


def run_generate(job: JobConfig, storage: Storage) -> dict[str, Any]:
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
    from pcd_ray.sink import Output

    cfg = job.generate
    check_engine_model(cfg, storage)
    init_ray(job.ray)
    pairs = artifacts.read_manifest(storage, cfg.input, "pairs")
    pairs_in = int(pairs["num_rows"])
    # attributes_* are optional in a pairs artifact (real datasets have none); engines that need them reject the row.
    columns = [c for c in INPUT_COLUMNS if c in pairs["columns"]]
    ds = artifacts.read_dataset(storage, cfg.input, "pairs", columns=columns)
    _check_unique(ds, pairs, storage.resolve(cfg.input))
    return generate_rows(
        ds,
        cfg,
        storage,
        label="generate",
        unit="pair",
        kept=Output(cfg.output, "diffs", DIFF_COLUMNS),
        rejected=Output(cfg.rejects, "rejects", REJECT_COLUMNS),
        config=cfg.model_dump(mode="json"),
        identity=identity(cfg, pairs, storage),
        expected=pairs_in,
        summary=lambda t: _summary(t, cfg, storage, pairs_in),
    )


def generate_rows(
    ds,
    cfg,
    storage,
    *,
    label: str,
    unit: str,
    kept,
    rejected,
    config: Any,
    identity: Any,
    expected: int,
    summary: Callable[[Any], dict[str, Any]],
    then: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Run ``cfg``'s engine and filter over ``ds`` into a kept and a rejected artifact (``sink.Output``), exactly
    once and resumable: what the generate stage does with pairs, for any rows shaped like them (pair_id, caption_a,
    caption_b, optional attributes_a/attributes_b; further columns reach the engine too). ``then`` maps the actor's
    output before it is written (columns the artifacts add); ``summary`` gives the stage's own fields from the
    sink's tally. Returns the final summary, also written to ``<kept>/_summary.json``.

    Raises EngineFailure when the engine kept failing, RuntimeError when the artifacts do not account for every row.
    """
    from pcd_ray.sink import Sink
    from pcd_ray.storage import join

    _check_cpus(cfg)
    sink = Sink(
        storage,
        label,
        unit=unit,
        kept=kept,
        rejected=rejected,
        config=config,
        identity=identity,
        resume=cfg.resume,
        key="pair_id",
        commit_every_s=cfg.commit_every_s,
        redo=lambda reason: reason.startswith(LEGACY_ENGINE_ERROR),
    )
    faults_uri, started = join(sink.kept.base, FAULTS_DIR), time.time()

    def fields(t) -> dict[str, Any]:
        # Faults the retries absorbed: counted at every commit, so a user sees the engine stumble while it runs.
        return {**summary(t), "redone": sink.redone, "engine_faults": len(read_faults(storage, faults_uri, started))}

    def transform(todo):
        out = _engines(todo, cfg, storage, faults_uri)
        return out if then is None else then(out)

    try:
        result = sink.run(
            ds,
            transform,
            expected=expected,
            summary=fields,
            stats=block_tokens,
            rates=("tokens",),
            rows_per_shard=min(ROWS_PER_SHARD, max(cfg.batch_size, expected // 16 + 1)),
            write_cpus=0.25,
        )
    except Exception as e:
        faults = read_faults(storage, faults_uri, started)
        if faults or _is_actor_death(e):
            raise _failure(cfg, faults, faults_uri, e, label) from e
        raise
    if result["engine_faults"]:
        log.warning("%s: %d engine fault(s) were retried; records in %s", label, result["engine_faults"], faults_uri)
    storage.write_json(join(sink.kept.base, SUMMARY_FILE), result)
    return result


def _is_actor_death(error: BaseException) -> bool:
    """Whether Ray Data failed because engine actors died (a crash, a kill, restarts spent)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    chain, seen = error, set()
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, (RayActorError, ActorDiedError, ActorUnavailableError)):
            return True
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    return False
