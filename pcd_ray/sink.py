"""Streaming rows into two committed artifacts, kept and rejected: the writer behind the data, generate and embed
stages.

A stage says only what is its own: how input rows become output rows (``transform``: blocks with a ``reason``
column, null for a kept row, a reject code otherwise), the two artifacts' kinds and columns, and its summary fields::

    from pcd_ray.sink import Output, Sink

    sink = Sink(storage, "generate", unit="pair", config=cfg.model_dump(mode="json"),
                kept=Output(cfg.output, "diffs", DIFF_COLUMNS), rejected=Output(cfg.rejects, "rejects", REJECT_COLUMNS),
                identity=identity, resume=cfg.resume, key="pair_id", commit_every_s=cfg.commit_every_s)
    summary = sink.run(pairs, lambda todo: todo.map_batches(GenerateActor, ...), expected=num_pairs,
                       summary=lambda t: {"pairs_in": num_pairs, "written": t.kept})

What the sink does for every stage:

- **Writes**: Ray tasks split each block (``split``, default ``split_by_reason``) and write one Parquet shard per
  artifact under its ``data/<attempt>/`` (``artifacts.put_shard``); the driver receives only shard names, row counts,
  reject reasons and the stage's per-block ``stats`` (e.g. tokens generated), never rows.
- **Commits**: both manifests are rewritten with the new shards every ``commit_every_s`` seconds and at the end,
  the rejected artifact first (``artifacts.Appender``). A kill loses at most the shards since the last commit; no
  manifest lists them, so no reader sees them, and the next run deletes them.
- **Resume** (stages that give a ``key``): a run resumes both committed artifacts only when both were written with
  the same ``identity`` (whatever makes two runs' outputs interchangeable), and removes the committed keys from its
  input with a distributed left-anti join; otherwise both start over, empty. A resumed manifest keeps every key it
  had (``provenance`` included); a fresh one carries nothing over.
- **Progress**: a tqdm bar in a terminal, a log line every ``LOG_EVERY_S`` seconds otherwise (job logs, CI).
- **Exactly once**: with ``expected`` (the input's row count), kept + rejected must equal it at the end, or the
  artifacts are committed incomplete and the run fails.

Reject reasons are codes, never parsed from messages: a check raises ``RejectError(reason, detail)`` (or returns the
code), and the stage puts ``reason`` and ``detail`` in their own columns.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pcd_ray import artifacts, console
from pcd_ray.storage import Storage

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0
"""Without a terminal, a progress line at most this often."""


class RejectError(ValueError):
    """An input row that cannot be used: ``reason`` is the code its reject row carries (``corrupt_image``),
    ``detail`` says why in words. ``str()`` is the detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return self.detail or self.reason


class Output(NamedTuple):
    """One artifact a sink writes."""

    uri: str
    kind: str
    columns: list[str]


def split_by_reason(table, kept_columns: list[str], rejected_columns: list[str]):
    """The default split: rows with a null ``reason`` are kept; (kept rows, rejected rows), each with its columns."""
    import pyarrow.compute as pc

    keep = pc.is_null(table.column("reason"))
    return table.filter(keep).select(kept_columns), table.filter(pc.invert(keep)).select(rejected_columns)


def _narrow(table):
    """Ray Data's join hands on large_string/large_binary columns: shards of one artifact must share one schema
    whichever run (fresh or resumed) wrote them, so those become string/binary (a shard is far under 2 GiB)."""
    import pyarrow as pa

    small = {pa.large_string(): pa.string(), pa.large_binary(): pa.binary()}
    schema = pa.schema([f.with_type(small.get(f.type, f.type)) for f in table.schema])
    return table if schema == table.schema else table.cast(schema)


def write_block(table, storage: Storage, kept_dir: str, rejected_dir: str, split: Callable, stats: Callable | None):
    """map_batches UDF (tasks): one block -> a kept shard and a rejected shard, each written atomically; returns one
    row naming them, with their counts, the reject reasons and the stage's stats. Nothing here commits."""
    import pyarrow as pa

    kept, rejected = (_narrow(t) for t in split(table))
    return pa.table(
        {
            "kept": [artifacts.put_shard(storage, kept, kept_dir) if kept.num_rows else ""],
            "kept_rows": [kept.num_rows],
            "rejected": [artifacts.put_shard(storage, rejected, rejected_dir) if rejected.num_rows else ""],
            "rejected_rows": [rejected.num_rows],
            "reasons": [json.dumps(Counter(rejected.column("reason").to_pylist()))],
            "stats": [json.dumps(stats(table) if stats else {})],
        }
    )


@dataclass
class Tally:
    """Where a sink's run stands; what a stage's ``summary`` callable reads."""

    expected: int | None
    """Input rows, when the stage knows them."""
    skipped: int
    """Rows committed by an earlier run (resumed)."""
    resumed: bool
    kept: int = 0
    """Rows in the kept artifact (committed and queued), earlier runs included; ``rejected`` likewise."""
    rejected: int = 0
    processed: int = 0
    """Rows this run wrote."""
    by_reason: Counter = field(default_factory=Counter)
    """Reject reasons over the whole rejected artifact."""
    stats: dict[str, Any] = field(default_factory=dict)
    """The stage's per-block stats over this run: numbers add up, other values are listed once each."""
    start: float = field(default_factory=time.time)
    first: tuple[float, int] | None = None
    """(seconds to the first finished block, its rows): startup (actors up, models loaded) vs steady state."""
    last: float = 0.0
    complete: bool = False

    @property
    def wall_s(self) -> float:
        return time.time() - self.start

    def per_s(self, n: float) -> float:
        """``n`` over this run's wall time."""
        return n / max(self.wall_s, 1e-9)

    def steady_per_s(self) -> float | None:
        """Rows per second after the first block, or None before a second block."""
        if self.first is None or self.processed == self.first[1]:
            return None
        return (self.processed - self.first[1]) / max(self.last - self.start - self.first[0], 1e-9)

    def add(self, row: dict[str, Any]) -> None:
        """Count one ``write_block`` result."""
        n = row["kept_rows"] + row["rejected_rows"]
        self.processed += n
        self.last = time.time()
        if self.first is None:
            self.first = (self.last - self.start, n)
        self.by_reason.update(json.loads(row["reasons"]))
        for key, value in json.loads(row["stats"]).items():
            if isinstance(value, (int, float)):
                self.stats[key] = self.stats.get(key, 0) + value
            elif value and value not in self.stats.setdefault(key, []):
                self.stats[key].append(value)

    def common(self, resumable: bool) -> dict[str, Any]:
        """The summary fields every stage has; resumable ones also say what this run did."""
        out = {
            "rejected": self.rejected,
            "rejected_by_reason": dict(sorted(self.by_reason.items())),
            "wall_s": round(self.wall_s, 3),
        }
        if resumable:
            out.update(skipped=self.skipped, processed=self.processed, resumed=self.resumed, complete=self.complete)
        return out


class Progress:
    """A progress bar in a terminal; a log line every ``LOG_EVERY_S`` otherwise. ``rates`` names numeric stats shown
    per second (generate: tokens)."""

    def __init__(self, label: str, unit: str, tally: Tally, rates: tuple[str, ...] = ()):
        self.label, self.unit, self.tally, self.rates = label, unit, tally, rates
        self.last = time.time()
        self.bar = None
        term = console.terminal()
        if term.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=tally.expected, initial=tally.skipped, unit=unit, desc=label, dynamic_ncols=True, file=term
            )

    def update(self, n: int) -> None:
        t = self.tally
        rates = {f"{k}/s": t.per_s(t.stats.get(k, 0)) for k in self.rates}
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(kept=t.kept, rejected=t.rejected, **{k: f"{v:.0f}" for k, v in rates.items()})
        elif time.time() - self.last >= LOG_EVERY_S:
            self.last = time.time()
            done = t.skipped + t.processed
            of = f"/{t.expected} ({100 * done / max(t.expected, 1):.1f}%)" if t.expected is not None else ""
            log.info(
                "%s: %d%s %ss, %d kept, %d rejected, %.1f %ss/s%s",
                self.label,
                done,
                of,
                self.unit,
                t.kept,
                t.rejected,
                t.per_s(t.processed),
                self.unit,
                "".join(f", {v:.0f} {k}" for k, v in rates.items()),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Sink:
    """Kept and rejected rows of one stage, streamed into two artifacts committed as they go (see the module).

    Args:
        storage: where the artifacts live.
        label: the stage's name in progress lines, logs and errors.
        unit: what a row is ("pair", "image").
        kept, rejected: the two artifacts (URI, kind, columns).
        config: the stage's config section, recorded in both manifests.
        identity: what makes two runs' outputs interchangeable; recorded, and compared when resuming.
        resume: resume committed artifacts of the same identity (needs ``key``).
        key: the input column that names a row in both outputs; committed keys are not processed again.
        commit_every_s: how often finished shards are committed: the most work a kill can lose.
        redo: reject reasons that a resumed run takes back and processes again (faults, not verdicts on the row).
    """

    def __init__(
        self,
        storage: Storage,
        label: str,
        *,
        unit: str,
        kept: Output,
        rejected: Output,
        config: Any,
        identity: Any = None,
        resume: bool = False,
        key: str | None = None,
        commit_every_s: float = 30.0,
        redo: Callable[[str], bool] | None = None,
    ):
        self.storage, self.label, self.unit, self.key, self.commit_every_s = storage, label, unit, key, commit_every_s
        # Both or neither: the two artifacts describe one run, so one left by other settings means starting over.
        resume = (
            resume
            and key is not None
            and all(artifacts.resumable(storage, o.uri, o.kind, identity) for o in (kept, rejected))
        )
        self.outputs = (kept, rejected)
        self.kept, self.rejected = (
            artifacts.Appender(
                storage, o.uri, o.kind, columns=o.columns, config=config, identity=identity, resume=resume
            )
            for o in self.outputs
        )
        self.redone = 0
        if resume and redo is not None and self.rejected.num_rows:
            # Rejects that were faults, not verdicts on their rows (written by an older version): their keys leave
            # the committed set, so this run processes those rows again.
            self.redone = self.rejected.drop_rows("reason", lambda r: r is not None and redo(r))
            if self.redone:
                log.info("%s: %d %ss rejected by a fault in an earlier run are done again", label, self.redone, unit)
        self.tally = Tally(expected=None, skipped=self.kept.num_rows + self.rejected.num_rows, resumed=resume)
        if self.rejected.num_rows:
            # From the committed rows, not a summary: a kill between the two manifests' commits leaves their
            # summaries one commit apart.
            self.tally.by_reason.update(
                artifacts.read_table(storage, rejected.uri, rejected.kind, columns=["reason"])
                .column("reason")
                .to_pylist()
            )

    def run(
        self,
        ds,
        transform: Callable,
        *,
        summary: Callable[[Tally], dict[str, Any]],
        expected: int | None = None,
        split: Callable | None = None,
        stats: Callable | None = None,
        rates: tuple[str, ...] = (),
        rows_per_shard: int | None = None,
        write_cpus: float | None = None,
        manifest: Callable[[Tally], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Stream ``ds`` through ``transform`` into the two artifacts; returns the final summary.

        Args:
            ds: the input rows (a Ray Dataset).
            transform: rows still to do -> a Dataset of blocks that ``split`` divides (default: by ``reason``).
            summary: the stage's own summary fields from the tally; the sink adds rejected, rejected_by_reason and
                wall_s (and skipped, processed, resumed, complete when resumable). Written at every commit.
            expected: the input's row count: the progress total, and what kept + rejected must add up to.
            split: block -> (kept rows, rejected rows), run in the write tasks (default ``split_by_reason``).
            stats: block -> {name: value} of the stage's per-block numbers or labels (``Tally.stats``), run in the
                write tasks; it may raise to stop the run before a wrong block is written.
            rates: stats shown per second in the progress.
            rows_per_shard: rows per written shard (default: one shard per block).
            write_cpus: CPUs per write task; Ray's default fuses the writes into a task-based transform.
            manifest: extra fields for the kept artifact's manifest, set at every commit.

        Raises RuntimeError when kept + rejected != ``expected``, after committing what was made (incomplete).
        """
        t = self.tally
        t.expected = expected
        if t.skipped:
            log.info("%s: resuming, %d of %s %ss already committed", self.label, t.skipped, expected, self.unit)
        self._fields, self._manifest = summary, manifest
        self._update_counts()
        if expected is None or t.skipped < expected:
            split = split or functools.partial(
                split_by_reason, kept_columns=self.outputs[0].columns, rejected_columns=self.outputs[1].columns
            )
            out = transform(self._todo(ds)).map_batches(
                write_block,
                fn_args=(self.storage, self.kept.staging, self.rejected.staging, split, stats),
                batch_size=rows_per_shard,
                batch_format="pyarrow",
                **({"num_cpus": write_cpus} if write_cpus is not None else {}),
            )
            try:
                self._drain(out.iter_rows(), Progress(self.label, self.unit, t, rates))
            except Exception:
                # Keep every finished shard before the error propagates: a re-run resumes from them.
                self._commit()
                raise
        total = self.kept.total_rows + self.rejected.total_rows
        if expected is not None and total != expected:
            self._commit()  # keep what was made; a resumable stage's re-run resumes and the check runs again
            raise RuntimeError(
                f"{self.label}: {self.kept.total_rows} {self.outputs[0].kind} + "
                f"{self.rejected.total_rows} {self.outputs[1].kind} rows != {expected} input rows"
            )
        t.complete = True
        result = self._commit()
        log.info(
            "%s: %d kept -> %s, %d rejected %s -> %s; this run %d %ss in %.1f s",
            self.label,
            t.kept,
            self.kept.base,
            t.rejected,
            result["rejected_by_reason"],
            self.rejected.base,
            t.processed,
            self.unit,
            t.wall_s,
        )
        return result

    def _commit(self) -> dict[str, Any]:
        """Commit both manifests with the shards queued so far; returns the summary written into them."""
        summary = {**self._fields(self.tally), **self.tally.common(resumable=self.key is not None)}
        if self._manifest is not None:
            self.kept.manifest.update(self._manifest(self.tally))
        # Rejects first: a kill between the two commits leaves rows that the next run makes again, never twice.
        self.rejected.commit(summary, complete=self.tally.complete)
        self.kept.commit(summary, complete=self.tally.complete)
        return summary

    def _update_counts(self) -> None:
        self.tally.kept, self.tally.rejected = self.kept.total_rows, self.rejected.total_rows

    def _drain(self, rows, progress: Progress) -> None:
        """Queue every written shard, committing every ``commit_every_s``."""
        last_commit = time.time()
        try:
            for row in rows:
                if row["kept"]:
                    self.kept.add(row["kept"], row["kept_rows"])
                if row["rejected"]:
                    self.rejected.add(row["rejected"], row["rejected_rows"])
                self.tally.add(row)
                self._update_counts()
                progress.update(row["kept_rows"] + row["rejected_rows"])
                if time.time() - last_commit >= self.commit_every_s:
                    self._commit()
                    last_commit = time.time()
        finally:
            progress.close()

    def _todo(self, ds):
        """``ds`` without the rows whose key is committed in either artifact (a distributed left-anti join)."""
        import ray.data

        paths = self.kept.paths() + self.rejected.paths()
        if self.key is None or not paths:
            return ds
        fs, _ = self.storage.arrow_fs(paths[0])
        done = ray.data.read_parquet([self.storage.fs(p)[1] for p in paths], filesystem=fs, columns=[self.key])
        left = (self.tally.expected or 0) - self.tally.skipped
        return ds.join(done, join_type="left_anti", on=(self.key,), num_partitions=max(1, min(64, left // 50_000 + 1)))
