"""The generate stage: pairs -> difference texts (``diffs``) and the outputs the filter dropped (``rejects``).

A streaming Ray Data job that can be killed at any point and re-run:

1. the pairs already committed to ``diffs`` or ``rejects`` by a run with the same settings are removed from the input
   (a left-anti join on pair_id, distributed, so millions of done ids never sit in the driver);
2. an actor pool of fixed size runs the engine (built once per actor: an LLM loads once) and the paper's filter;
3. a writer task writes each block of results as one diffs shard and one rejects shard under the artifacts'
   ``data/<attempt>/``;
4. the driver receives only shard names and counts, and commits them into both manifests every
   ``commit_every_s`` seconds (``artifacts.Appender``).

A pair is committed with the shard that holds it, and only once: shards of a killed run were never committed and are
deleted by the next run, which regenerates their pairs. At the end every pair of the input is in exactly one of the
two artifacts (checked, not assumed), and a summary is written into both manifests and ``<diffs>/_summary.json``.

Imports numpy, pyarrow and ray only (no torch): see ``engines.py``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from typing import Any

from pcd_ray.generate.engines import GenerateActor

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


def write_shards(table, storage, diffs_dir: str, rejects_dir: str):
    """map_batches UDF (tasks): one block of generate output -> a diffs shard and a rejects shard, each written
    atomically; returns one row naming them with the block's counts. Nothing here commits: the driver does."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pcd_ray.artifacts import put_shard

    kept_mask = pc.is_valid(table.column("text"))
    kept, rejected = table.filter(kept_mask), table.filter(pc.invert(kept_mask))
    diffs = put_shard(storage, kept.select(DIFF_COLUMNS), diffs_dir) if kept.num_rows else ""
    rejects = put_shard(storage, rejected.select(REJECT_COLUMNS), rejects_dir) if rejected.num_rows else ""
    reasons = Counter(rejected.column("reason").to_pylist())
    return pa.table({
        "diffs": [diffs], "diffs_rows": [kept.num_rows],
        "rejects": [rejects], "rejects_rows": [rejected.num_rows],
        "reasons": [json.dumps(reasons)],
        "tokens": [int(pc.sum(table.column("tokens")).as_py() or 0)],
    })


class _Progress:
    """A progress bar in a terminal; a log line every 30 s otherwise (job logs, CI)."""

    def __init__(self, total: int, done: int):
        self.total, self.start_done, self.t0, self.last = total, done, time.time(), 0.0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="pair", desc="generate", dynamic_ncols=True)

    def update(self, n: int, done: int, kept: int, tokens: int) -> None:
        dt = max(time.time() - self.t0, 1e-9)
        rate, tok_rate = (done - self.start_done) / dt, tokens / dt
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(kept=kept, tok_s=f"{tok_rate:.0f}")
        elif time.time() - self.last >= 30:
            self.last = time.time()
            log.info("generate: %d/%d pairs (%.1f%%), %d kept, %.1f pairs/s, %.0f tokens/s", done, self.total,
                     100 * done / max(self.total, 1), kept, rate, tok_rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _committed_ids(paths: list[str], storage):
    """The pair ids in committed shards, as a Ray Dataset of one column (None when there are none)."""
    import ray.data

    if not paths:
        return None
    fs, _ = storage.arrow_fs(paths[0])
    return ray.data.read_parquet([storage.fs(p)[1] for p in paths], filesystem=fs, columns=["pair_id"])


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


def run_generate(job, storage) -> dict[str, Any]:
    """Write ``diffs`` and ``rejects`` for every pair of ``job.generate.input``, resuming a killed run; returns the
    stage summary.

    Summary keys: pairs_in, skipped (committed before this run), processed (this run), written and rejected (totals
    over the artifact), rejected_by_reason {reason: n} (totals), engine, prompt_version, tokens (this run), wall_s,
    pairs_per_s and tokens_per_s (this run), resumed, complete, diffs, rejects (URIs).
    Raises ArtifactError if the pairs artifact is missing or empty, KeyError for an unknown engine or prompt version,
    RuntimeError if the output does not account for every pair exactly once.
    """
    import ray.data

    from pcd_ray import artifacts
    from pcd_ray.runtime import init_ray
    from pcd_ray.storage import join

    cfg = job.generate
    init_ray(job.ray)
    start = time.time()
    pairs_manifest = artifacts.read_manifest(storage, cfg.input, "pairs")
    pairs_in = int(pairs_manifest["num_rows"])
    ident = identity(cfg, pairs_manifest, storage)
    config = cfg.model_dump(mode="json")
    # Both or neither: the two artifacts describe one run, so one left by other settings means starting over.
    resume = cfg.resume and all(artifacts.resumable(storage, uri, kind, ident)
                                for uri, kind in ((cfg.output, "diffs"), (cfg.rejects, "rejects")))
    diffs = artifacts.Appender(storage, cfg.output, "diffs", columns=DIFF_COLUMNS, config=config, identity=ident,
                               resume=resume)
    rejects = artifacts.Appender(storage, cfg.rejects, "rejects", columns=REJECT_COLUMNS, config=config,
                                 identity=ident, resume=resume)
    skipped = diffs.num_rows + rejects.num_rows
    by_reason: Counter = Counter()
    if rejects.num_rows:
        # From the committed rows, not a summary: a kill between the two manifests' commits leaves their summaries
        # one commit apart.
        by_reason.update(artifacts.read_table(storage, cfg.rejects, "rejects", columns=["reason"])
                         .column("reason").to_pylist())
    if skipped:
        log.info("generate: resuming, %d of %d pairs already committed", skipped, pairs_in)

    # attributes_* are optional in a pairs artifact (real datasets have none); engines that need them reject the row.
    columns = [c for c in INPUT_COLUMNS if c in pairs_manifest["columns"]]
    ds = artifacts.read_dataset(storage, cfg.input, "pairs", columns=columns)
    _check_unique(ds, pairs_manifest, storage.resolve(cfg.input))
    done = _committed_ids(diffs.paths() + rejects.paths(), storage)
    if done is not None:
        ds = ds.join(done, join_type="left_anti", on=("pair_id",),
                     num_partitions=max(1, min(64, (pairs_in - skipped) // 50_000 + 1)))

    processed = tokens = 0
    # Startup (actors up, engines and models loaded) vs steady state: for an LLM job of hours only the second
    # matters, for a small job the first dominates; the summary reports both.
    first: tuple[float, int] | None = None  # (seconds to the first finished shard, its pairs)
    last_t = start
    summary: dict[str, Any] = {}
    progress = _Progress(pairs_in, skipped)

    def make_summary(complete: bool) -> dict[str, Any]:
        wall = time.time() - start
        rejected = sum(by_reason.values())
        return {
            "pairs_in": pairs_in, "skipped": skipped, "processed": processed,
            "written": diffs.total_rows, "rejected": rejected,
            "rejected_by_reason": dict(sorted(by_reason.items())),
            "engine": cfg.engine, "prompt_version": cfg.prompt_version,
            "model": cfg.llm.model if cfg.engine != "rule" else None,
            "tokens": tokens, "wall_s": round(wall, 3),
            "pairs_per_s": round(processed / max(wall, 1e-9), 2),
            "first_result_s": None if first is None else round(first[0], 3),
            "steady_pairs_per_s": None if first is None or processed == first[1] else
            round((processed - first[1]) / max(last_t - start - first[0], 1e-9), 2),
            "tokens_per_s": round(tokens / max(wall, 1e-9), 1),
            "resumed": diffs.resumed, "complete": complete,
            "diffs": diffs.base, "rejects": rejects.base,
        }

    def commit(complete: bool) -> None:
        nonlocal summary
        summary = make_summary(complete)
        # rejects first: a kill between the two commits leaves pairs that the next run regenerates, never twice.
        rejects.commit(summary, complete=complete)
        diffs.commit(summary, complete=complete)

    cpus = ray.cluster_resources().get("CPU", 0)
    if cfg.num_actors * cfg.num_cpus_per_actor >= cpus:
        # Without an autoscaler to add nodes, the actors would hold every CPU and Ray Data's read and write tasks
        # would never run: the job would hang, not fail.
        log.warning("generate: %d actors x %s CPUs take all %s CPUs of the cluster; read/write tasks need some "
                    "left (lower generate.num_cpus_per_actor or add nodes)", cfg.num_actors, cfg.num_cpus_per_actor,
                    cpus)

    if skipped < pairs_in:
        # Blocks of a few batches, whatever the pairs artifact's file sizes: one big file would otherwise be one
        # block, i.e. one actor busy and the rest idle (a streaming split, no barrier).
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size * 4)
        out = ds.map_batches(
            GenerateActor,
            fn_constructor_kwargs={"cfg": config, "in_worker": True},
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
            batch_size=cfg.batch_size,
            batch_format="numpy",
            udf_modifying_row_count=False,
            # Ray Data's actor pools restart a dead actor (a crashed LLM engine) and retry its batch by default
            # (max_restarts=-1, max_task_retries=-1); a row the engine rejects never fails the job (GenerateActor).
            **actor_resources(cfg),
        ).map_batches(
            write_shards,
            fn_args=(storage, diffs.staging, rejects.staging),
            batch_size=min(ROWS_PER_SHARD, max(cfg.batch_size, pairs_in // 16 + 1)),
            batch_format="pyarrow",
            num_cpus=0.25,
        )
        last_commit = time.time()
        try:
            for row in out.iter_rows():
                if row["diffs"]:
                    diffs.add(row["diffs"], row["diffs_rows"])
                if row["rejects"]:
                    rejects.add(row["rejects"], row["rejects_rows"])
                n = row["diffs_rows"] + row["rejects_rows"]
                processed += n
                last_t = time.time()
                if first is None:
                    first = (last_t - start, n)
                tokens += row["tokens"]
                by_reason.update(json.loads(row["reasons"]))
                progress.update(n, skipped + processed, diffs.total_rows, tokens)
                if time.time() - last_commit >= cfg.commit_every_s:
                    commit(complete=False)
                    last_commit = time.time()
        finally:
            progress.close()

    total = diffs.total_rows + rejects.total_rows
    if total != pairs_in:
        commit(complete=False)  # keep what was made; a re-run resumes and the check runs again
        raise RuntimeError(f"generate: {total} rows in diffs + rejects != {pairs_in} pairs in "
                           f"{storage.resolve(cfg.input)}")
    commit(complete=True)
    storage.write_json(join(diffs.base, SUMMARY_FILE), summary)
    log.info("generate: %d pairs -> %d diffs, %d rejects %s; this run %d pairs in %.1f s (%.1f pairs/s, "
             "%.0f tokens/s)", pairs_in, summary["written"], summary["rejected"], summary["rejected_by_reason"],
             processed, summary["wall_s"], summary["pairs_per_s"], summary["tokens_per_s"])
    return summary
