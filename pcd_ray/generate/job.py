"""The generate stage: pairs -> difference texts (``diffs``) and the outputs the filter dropped (``rejects``).

A Ray Data job: the pairs artifact is read in parallel, an actor pool runs the engine (built once per actor) and the
paper's filter over batches, and the result is materialized once, so the engine runs exactly once per pair however
many consumers read it. Every pair ends in exactly one of the two artifacts; both manifests carry the summary.

Imports numpy, pyarrow and ray only (no torch): see ``engines.py``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from pcd_ray.generate.engines import GenerateActor

log = logging.getLogger(__name__)

INPUT_COLUMNS = ["pair_id", "caption_a", "caption_b", "attributes_a", "attributes_b"]
DIFF_COLUMNS = ["pair_id", "text", "raw", "engine", "prompt_version"]
REJECT_COLUMNS = ["pair_id", "raw", "reason"]


def _reason_counts(table) -> Any:
    """map_batches UDF: a block of generate output -> (reason, n) rows; reason "" stands for kept."""
    import pyarrow as pa

    counts = Counter(r or "" for r in table.column("reason").to_pylist())
    return pa.table({"reason": pa.array(list(counts), pa.string()), "n": pa.array(list(counts.values()), pa.int64())})


def _count(out) -> tuple[int, dict[str, int]]:
    """(kept, {reason: rejected}) over a materialized generate output; counted in parallel, summed here."""
    totals: Counter = Counter()
    for row in out.map_batches(_reason_counts, batch_format="pyarrow").take_all():
        totals[row["reason"]] += row["n"]
    kept = totals.pop("", 0)
    return kept, dict(sorted(totals.items()))


def _empty(columns: list[str]):
    import pyarrow as pa

    return pa.table({c: pa.array([], pa.string()) for c in columns})


def _write(ds, n: int, storage, uri: str, kind: str, columns: list[str], config, summary) -> dict[str, Any]:
    """Commit ``ds`` (already filtered to this artifact's rows) as ``kind``; an empty table when there are none."""
    from pcd_ray import artifacts

    if n == 0:
        # Readers need a committed artifact with the right columns even when nothing was rejected (or kept).
        return artifacts.write_table(_empty(columns), storage, uri, kind, config=config, summary=summary)
    return artifacts.write_dataset(ds.select_columns(columns), storage, uri, kind, config=config, summary=summary)


def run_generate(job, storage) -> dict[str, Any]:
    """Write ``diffs`` and ``rejects`` for every pair of ``job.generate.input``; returns the stage summary.

    Summary keys: pairs_in, written, rejected, rejected_by_reason {reason: n}, engine, prompt_version, wall_s
    (reading + generation + filtering, not the final Parquet writes), pairs_per_s, diffs, rejects (URIs).
    Raises ArtifactError if the pairs artifact is missing or empty, KeyError for an unknown engine or prompt version,
    RuntimeError if the output does not account for every pair exactly once.
    """
    import ray.data
    from ray.data.expressions import col

    from pcd_ray import artifacts
    from pcd_ray.runtime import init_ray

    cfg = job.generate
    init_ray(job.ray)
    start = time.time()
    manifest = artifacts.read_manifest(storage, cfg.input, "pairs")
    pairs_in = int(manifest["num_rows"])
    # attributes_* are optional in a pairs artifact (real datasets have none); engines that need them reject the row.
    columns = [c for c in INPUT_COLUMNS if c in manifest["columns"]]
    ds = artifacts.read_dataset(storage, cfg.input, "pairs", columns=columns)
    out = ds.map_batches(
        GenerateActor,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "in_worker": True},
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=1,
        udf_modifying_row_count=False,
    ).materialize()
    written, by_reason = _count(out)
    rejected = sum(by_reason.values())
    if written + rejected != pairs_in:
        raise RuntimeError(f"generate: {written} kept + {rejected} rejected != {pairs_in} pairs in "
                           f"{storage.resolve(cfg.input)}")
    wall = time.time() - start
    summary = {
        "pairs_in": pairs_in,
        "written": written,
        "rejected": rejected,
        "rejected_by_reason": by_reason,
        "engine": cfg.engine,
        "prompt_version": cfg.prompt_version,
        "wall_s": round(wall, 3),
        "pairs_per_s": round(pairs_in / max(wall, 1e-9), 1),
        "diffs": storage.resolve(cfg.output),
        "rejects": storage.resolve(cfg.rejects),
    }
    config = cfg.model_dump(mode="json")
    _write(out.filter(expr=col("text").is_not_null()), written, storage, cfg.output, "diffs", DIFF_COLUMNS,
           config, summary)
    _write(out.filter(expr=col("text").is_null()), rejected, storage, cfg.rejects, "rejects", REJECT_COLUMNS,
           config, summary)
    log.info("generate: %d pairs -> %d diffs, %d rejects %s in %.1f s (%.0f pairs/s)", pairs_in, written, rejected,
             by_reason, wall, summary["pairs_per_s"])
    return summary
