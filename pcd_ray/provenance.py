"""What every output was made from, and whether it still matches what its stage would read now.

A stage's *record* holds its config section and, for each input it declared (``stages.py``), the input's URI and
commit id: an artifact's manifest ``attempt`` (new on every write), an export's weights id (the sha256 of its
weights file), a plain file's fingerprint, or a model's name and pretrained tag. The record is written into the
output after the stage succeeds: an artifact's ``_manifest.json`` (key ``provenance``), an export's
``pcd_ray.json``, a report directory's ``_provenance.json``. An output is up to date iff it is committed, its record
exists, and the record's config and every input commit equal what the stage would read now; ``state`` says which
of those failed, naming the input or config key.

The record is taken before the stage runs and written after it, so an input replaced while the stage ran makes the
output stale, never falsely current; an output written but not yet stamped (a kill in between) has no record and
is stale too. Everything here reads manifests, small JSON files and file metadata only (an export's weights are
hashed once, when it is stamped, and again only when their size, mtime or ETag change), so ``pcd-ray status`` takes
seconds on local paths and on s3://.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from pcd_ray import artifacts
from pcd_ray.model.factory import EXPORT_META, EXPORT_WEIGHTS
from pcd_ray.storage import Storage, join

RECORD_FILE = "_provenance.json"
"""A report directory's record (artifacts and exports keep theirs in their own metadata)."""
REPORT_FILE = "report.json"


@dataclass(frozen=True)
class Ref:
    """One input or output of a stage: ``kind`` is artifact, export, report, file or model."""

    name: str
    """Its role in the stage, e.g. ``diffs`` or ``models.finetuned``: what a stale state names."""
    uri: str
    """As configured (relative to storage.root) or, for a model loaded by name, ``name:pretrained``."""
    kind: str


@dataclass(frozen=True)
class State:
    status: str
    """``up to date``, ``stale``, ``missing``, ``incomplete`` (resumable) or ``no section``."""
    reason: str = ""
    made: str | None = None
    rows: int | None = None

    @property
    def current(self) -> bool:
        return self.status == "up to date"


# ------------------------------------------------------------------------------------------------- commit ids
def _fingerprint(storage: Storage, uri: str) -> str | None:
    """What changes whenever the object is rewritten: size plus ETag (S3) or mtime and inode (local)."""
    fs, path = storage.fs(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    marker = info.get("ETag") or info.get("etag") or f"{info.get('mtime')}:{info.get('ino')}"
    return f"{info.get('size')}:{marker}"


def sha256_of(storage: Storage, uri: str) -> str:
    """First 16 hex digits of the sha256 of an object's bytes, read in chunks (weights can be gigabytes)."""
    h = hashlib.sha256()
    fs, path = storage.fs(uri)
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def weights_id(storage: Storage, export_uri: str) -> str | None:
    """The export's weights id (sha256 of its weights file), None when there is no export at the URI.

    The id recorded in ``pcd_ray.json`` is trusted only while the file's fingerprint is the one recorded with it;
    weights replaced under the same URI are hashed again, so whatever reads them sees a new id.
    """
    weights = join(storage.resolve(export_uri), EXPORT_WEIGHTS)
    fingerprint = _fingerprint(storage, weights)
    if fingerprint is None:
        return None
    meta = _export_meta(storage, export_uri)
    if meta.get("weights_id") and meta.get("weights_fingerprint") == fingerprint:
        return meta["weights_id"]
    return sha256_of(storage, weights)


def _export_meta(storage: Storage, export_uri: str) -> dict[str, Any]:
    path = join(storage.resolve(export_uri), EXPORT_META)
    return storage.read_json(path) if storage.exists(path) else {}


def commit_id(storage: Storage, ref: Ref) -> str | None:
    """What identifies the current content of an input or output; None when it does not exist (or, for an
    artifact, is not committed)."""
    if ref.kind == "model":
        return ref.uri
    if ref.kind == "artifact":
        if not artifacts.exists(storage, ref.uri):
            return None
        return artifacts.read_manifest(storage, ref.uri).get("attempt")
    if ref.kind == "export":
        return weights_id(storage, ref.uri)
    if ref.kind == "report":
        path = join(storage.resolve(ref.uri), REPORT_FILE)
        return sha256_of(storage, path) if storage.exists(path) else None
    return _fingerprint(storage, ref.uri)  # a plain file (comparatives, differences)


# ---------------------------------------------------------------------------------------------------- records
def take(storage: Storage, stage: str, config: dict[str, Any], inputs: list[Ref]) -> dict[str, Any]:
    """The record of a stage about to run: its config and its inputs' current commit ids."""
    return {
        "stage": stage,
        "config": config,
        "inputs": {
            r.name: {
                "uri": storage.resolve(r.uri) if r.kind != "model" else r.uri,
                "kind": r.kind,
                "commit": commit_id(storage, r),
            }
            for r in inputs
        },
    }


def stamp(storage: Storage, output: Ref, record: dict[str, Any]) -> None:
    """Write a finished stage's record into one of its outputs (atomically, beside what the stage wrote)."""
    record = dict(record, made=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if output.kind == "artifact":
        manifest = artifacts.read_manifest(storage, output.uri)
        manifest["provenance"] = record
        storage.write_json(artifacts.manifest_uri(storage, output.uri), manifest)
    elif output.kind == "export":
        meta = _export_meta(storage, output.uri)
        weights = join(storage.resolve(output.uri), EXPORT_WEIGHTS)
        # The id is hashed here once; readers trust it while the file keeps this fingerprint (weights_id).
        meta.update(
            weights_id=sha256_of(storage, weights),
            weights_fingerprint=_fingerprint(storage, weights),
            provenance=record,
        )
        storage.write_json(join(storage.resolve(output.uri), EXPORT_META), meta)
    else:
        storage.write_json(
            join(storage.resolve(output.uri), RECORD_FILE), dict(record, output_commit=commit_id(storage, output))
        )


def read(storage: Storage, output: Ref) -> dict[str, Any] | None:
    """The record stamped into an output, or None."""
    if output.kind == "artifact":
        return artifacts.read_manifest(storage, output.uri).get("provenance")
    if output.kind == "export":
        return _export_meta(storage, output.uri).get("provenance")
    path = join(storage.resolve(output.uri), RECORD_FILE)
    return storage.read_json(path) if storage.exists(path) else None


def _details(storage: Storage, output: Ref) -> tuple[str | None, bool, int | None]:
    """(commit id, complete, rows) of an output as it is now."""
    if output.kind == "artifact":
        if not artifacts.exists(storage, output.uri):
            return None, False, None
        manifest = artifacts.read_manifest(storage, output.uri)
        return manifest.get("attempt"), bool(manifest.get("complete", True)), int(manifest.get("num_rows", 0))
    return commit_id(storage, output), True, None


def config_changes(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted keys whose values differ between two config dumps."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            k
            for key in sorted(old.keys() | new.keys())
            for k in config_changes(old.get(key), new.get(key), f"{prefix}.{key}")
        ]
    return [] if old == new else [prefix]


def state(storage: Storage, stage: str, config: dict[str, Any], inputs: list[Ref], outputs: list[Ref]) -> State:
    """Whether a stage's outputs are what it would make now, and if not, why (the first reason found)."""
    made, rows = None, None
    for output in outputs:
        commit, complete, n = _details(storage, output)
        if commit is None:
            return State("missing", f"no {output.name} at {storage.resolve(output.uri)}")
        if not complete:
            return State("incomplete", f"{output.name} has {n} rows committed; a re-run resumes it", rows=n)
        record = read(storage, output)
        if record is None:
            return State(
                "stale",
                f"{output.name} records no provenance (made outside the pipeline or by an older pcd-ray)",
                rows=n,
            )
        if output.kind == "report" and record.get("output_commit") != commit:
            return State("stale", f"{output.name} changed after it was made", record.get("made"), n)
        changed = config_changes(record.get("config"), config, stage)
        if changed:
            more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
            return State("stale", f"config changed: {', '.join(changed[:3])}{more}", record.get("made"), n)
        recorded = record.get("inputs", {})
        for ref in inputs:
            now = commit_id(storage, ref)
            if now is None:
                return State(
                    "stale", f"input {ref.name} is missing ({storage.resolve(ref.uri)})", record.get("made"), n
                )
            if recorded.get(ref.name, {}).get("commit") != now:
                what = "model" if ref.kind in ("export", "model") else "input"
                return State("stale", f"{what} {ref.name} changed ({_where(storage, ref)})", record.get("made"), n)
        extra = sorted(recorded.keys() - {r.name for r in inputs})
        if extra:
            return State("stale", f"input {extra[0]} is no longer read", record.get("made"), n)
        made = max(made or "", record.get("made") or "") or None
        rows = n if rows is None else rows
    return State("up to date", made=made, rows=rows)


def _where(storage: Storage, ref: Ref) -> str:
    return ref.uri if ref.kind == "model" else storage.resolve(ref.uri)
