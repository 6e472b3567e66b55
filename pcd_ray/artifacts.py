"""Named artifacts between stages: Parquet datasets committed by a manifest.

An artifact is a directory ``<uri>/`` holding Parquet shards under ``data/<attempt>/`` and ``_manifest.json``, which
lists the committed shards with their row counts, the artifact kind, the config that made it and the stage summary.
The manifest is written last and atomically, so a reader sees either the previous committed artifact or the new
one: shards of a writer that died are never listed, hence never read. Old attempts are deleted after a commit.

Stages declare the columns they need (``SCHEMAS``) and a read fails with the missing column names and the URI.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from pcd_ray.storage import Storage, join

MANIFEST = "_manifest.json"

SCHEMAS: dict[str, list[str]] = {
    # image: PNG/JPEG bytes; attributes: JSON object (synthetic set) or null.
    "images": ["image_id", "split", "caption", "image", "attributes"],
    "pairs": ["pair_id", "image_id_a", "image_id_b", "caption_a", "caption_b"],
    "diffs": ["pair_id", "text", "raw", "engine", "prompt_version"],
    "rejects": ["pair_id", "raw", "reason"],
    "comparatives": ["pair_id", "dataset", "class_i", "class_j", "text"],
    "comparative_rejects": ["pair_id", "dataset", "class_i", "class_j", "reason"],
    "embeddings": ["image_id", "model", "embedding"],
}


class ArtifactError(RuntimeError):
    """An artifact is missing, uncommitted, of the wrong kind, or lacks columns a stage needs."""


def manifest_uri(storage: Storage, uri: str) -> str:
    return join(storage.resolve(uri), MANIFEST)


def read_manifest(storage: Storage, uri: str, kind: str | None = None) -> dict[str, Any]:
    path = manifest_uri(storage, uri)
    if not storage.exists(path):
        raise ArtifactError(
            f"{storage.resolve(uri)}: no committed artifact here (missing {MANIFEST}); "
            f"run the stage that writes it first"
        )
    manifest = storage.read_json(path)
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{storage.resolve(uri)}: expected a {kind!r} artifact, found {manifest.get('kind')!r}")
    return manifest


def exists(storage: Storage, uri: str) -> bool:
    return storage.exists(manifest_uri(storage, uri))


def _check_columns(kind: str, columns: list[str], uri: str) -> None:
    missing = [c for c in SCHEMAS.get(kind, []) if c not in columns]
    if missing:
        raise ArtifactError(f"{uri}: {kind} artifact lacks required columns {missing} (has {columns})")


def _new_attempt() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _commit(
    storage: Storage, uri: str, kind: str, attempt: str, files: list[str], config: Any, summary: dict | None
) -> dict[str, Any]:
    import pyarrow.parquet as pq

    base = storage.resolve(uri)
    entries, columns = [], None
    for f in files:
        fs, path = storage.fs(f)
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            if columns is None:
                columns = meta.schema.to_arrow_schema().names
        entries.append({"path": f[len(base.rstrip("/")) + 1 :], "rows": meta.num_rows})
    columns = columns or []
    if files:
        _check_columns(kind, columns, base)
    manifest = {
        "kind": kind,
        "attempt": attempt,
        "num_rows": sum(e["rows"] for e in entries),
        "columns": columns,
        "files": entries,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "summary": summary or {},
    }
    storage.write_json(join(base, MANIFEST), manifest)
    # Only after the commit: drop attempts the manifest no longer names.
    for d in storage.listdir(join(base, "data")):
        if not d.rstrip("/").endswith(attempt):
            storage.rm(d)
    return manifest


def write_dataset(
    ds,
    storage: Storage,
    uri: str,
    kind: str,
    *,
    config: Any = None,
    summary: dict | None = None,
    rows_per_file: int | None = None,
) -> dict[str, Any]:
    """Write a Ray Dataset as a committed artifact (replacing any previous one); returns the manifest."""
    attempt = _new_attempt()
    staging = join(storage.resolve(uri), "data", attempt)
    fs, path = storage.arrow_fs(staging)
    kwargs = {"min_rows_per_file": rows_per_file} if rows_per_file else {}
    ds.write_parquet(path, filesystem=fs, **kwargs)
    files = [f for f in storage.find(staging) if f.endswith(".parquet")]
    return _commit(storage, uri, kind, attempt, files, config, summary)


def write_table(
    table, storage: Storage, uri: str, kind: str, *, config: Any = None, summary: dict | None = None
) -> dict[str, Any]:
    """Write a pyarrow Table (driver-side, small artifacts) as a committed artifact."""
    import io

    import pyarrow.parquet as pq

    _check_columns(kind, table.column_names, storage.resolve(uri))
    attempt = _new_attempt()
    shard = join(storage.resolve(uri), "data", attempt, "part-00000.parquet")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(shard, buf.getvalue())
    return _commit(storage, uri, kind, attempt, [shard], config, summary)


def resumable(storage: Storage, uri: str, kind: str, identity: Any) -> bool:
    """True when ``uri`` holds a ``kind`` artifact an ``Appender`` with this identity would resume."""
    if not exists(storage, uri):
        return False
    old = read_manifest(storage, uri)
    return old.get("kind") == kind and old.get("identity") == identity


def put_shard(storage: Storage, table, directory: str) -> str:
    """Write ``table`` as one uniquely named Parquet shard under ``directory`` (atomically); returns its URI.

    Unique names: a retried Ray task writes a new shard instead of overwriting one a manifest may already list.
    """
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = join(directory, f"part-{uuid.uuid4().hex}.parquet")
    storage.write_bytes(uri, buf.getvalue())
    return uri


class Appender:
    """An artifact committed batch by batch, for jobs that must survive being killed (generation of millions of pairs);
    the streaming stages use it through ``pcd_ray.sink``, which pairs a kept and a rejected one.

    Workers write shards under ``data/<attempt>/``; the driver lists them here and ``commit()`` rewrites the manifest
    atomically with the new shards added. A kill loses only shards written since the last commit, and those are never
    read: they are not in the manifest, and the next run deletes them. ``identity`` is whatever makes two runs'
    outputs interchangeable (engine, model, prompt, seed, input): a run resumes a committed artifact only when it
    matches, else it starts over with an empty manifest. ``complete`` marks the artifact finished.
    """

    def __init__(
        self,
        storage: Storage,
        uri: str,
        kind: str,
        *,
        columns: list[str],
        config: Any,
        identity: Any,
        resume: bool = True,
    ):
        self.storage, self.kind, self.columns, self.config = storage, kind, columns, config
        self.base = storage.resolve(uri)
        self.attempt = _new_attempt()
        self.pending: list[dict[str, Any]] = []
        self.resumed = resume and resumable(storage, uri, kind, identity)
        if self.resumed:
            self.manifest = read_manifest(storage, uri)
        else:
            # Start over: an empty, incomplete manifest first, so a reader (or a later resume) never mixes the old
            # artifact with this run's shards.
            self.manifest = {
                "kind": kind,
                "identity": identity,
                "num_rows": 0,
                "columns": columns,
                "files": [],
                "config": config,
                "summary": {},
                "complete": False,
            }
            self._write(complete=False)
        self._drop_unlisted()

    @property
    def staging(self) -> str:
        return join(self.base, "data", self.attempt)

    @property
    def num_rows(self) -> int:
        """Rows committed."""
        return int(self.manifest["num_rows"])

    @property
    def total_rows(self) -> int:
        """Rows committed plus rows queued for the next commit."""
        return self.num_rows + sum(e["rows"] for e in self.pending)

    def paths(self) -> list[str]:
        """URIs of the committed shards."""
        return [join(self.base, *e["path"].split("/")) for e in self.manifest["files"]]

    def add(self, uri: str, rows: int) -> None:
        """Queue a finished shard (written under ``staging``) for the next commit."""
        if not uri.startswith(self.base.rstrip("/") + "/"):
            raise ValueError(f"{uri} is not inside the artifact {self.base}")
        self.pending.append({"path": uri[len(self.base.rstrip("/")) + 1 :], "rows": int(rows)})

    def commit(self, summary: dict | None = None, *, complete: bool = False) -> dict[str, Any]:
        self.manifest["files"] = self.manifest["files"] + self.pending
        self.manifest["num_rows"] = sum(e["rows"] for e in self.manifest["files"])
        self.pending = []
        if summary is not None:
            self.manifest["summary"] = summary
        self.manifest["config"] = self.config
        self._write(complete=complete)
        return self.manifest

    def drop_rows(self, column: str, predicate: Callable[[Any], bool]) -> int:
        """Remove the committed rows whose ``column`` value satisfies ``predicate``, and commit; returns how many.

        Only shards holding such rows are rewritten (into this attempt's directory, so the manifest never names a
        half-written file); the replaced shards go when a later run drops what no manifest lists.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        files, dropped = [], 0
        for entry in self.manifest["files"]:
            fs, path = self.storage.fs(join(self.base, *entry["path"].split("/")))
            with fs.open(path, "rb") as f:
                values = pq.read_table(f, columns=[column]).column(column).to_pylist()
            mask = [bool(predicate(v)) for v in values]
            if not any(mask):
                files.append(entry)
                continue
            with fs.open(path, "rb") as f:
                kept = pq.read_table(f).filter(pa.array([not m for m in mask]))
            dropped += len(mask) - kept.num_rows
            if kept.num_rows:
                uri = put_shard(self.storage, kept, self.staging)
                files.append({"path": uri[len(self.base.rstrip("/")) + 1 :], "rows": kept.num_rows})
        if dropped:
            self.manifest["files"] = files
            self.manifest["num_rows"] = sum(e["rows"] for e in files)
            self._write(complete=False)
        return dropped

    def _write(self, *, complete: bool) -> None:
        self.manifest.update(
            attempt=self.attempt,
            complete=complete,
            columns=self.columns,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        self.storage.write_json(join(self.base, MANIFEST), self.manifest)

    def _drop_unlisted(self) -> None:
        """Delete shards no manifest lists: leftovers of a killed run or of the artifact this run replaces."""
        listed = set(self.paths())
        for f in self.storage.find(join(self.base, "data")):
            if f not in listed:
                self.storage.rm(f)


def update_summary(storage: Storage, uri: str, **fields: Any) -> dict[str, Any]:
    """Add fields to a committed artifact's summary (a lazy Ray Data pipeline knows its wall time only after the
    write); rewrites the manifest atomically with the same shard list. Returns the new manifest."""
    manifest = read_manifest(storage, uri)
    manifest["summary"].update(fields)
    storage.write_json(manifest_uri(storage, uri), manifest)
    return manifest


def files(storage: Storage, uri: str, kind: str, manifest: dict | None = None) -> list[str]:
    manifest = manifest or read_manifest(storage, uri, kind)
    _check_columns(kind, manifest["columns"], storage.resolve(uri))
    return [join(storage.resolve(uri), *e["path"].split("/")) for e in manifest["files"]]


def _empty_or_error(manifest: dict, storage: Storage, uri: str, kind: str, columns: list[str] | None):
    """An appended artifact (generate) may commit zero shards: it is empty, not broken."""
    if manifest.get("complete") is None:
        raise ArtifactError(f"{storage.resolve(uri)}: the {kind} artifact is empty")
    return _empty_table(manifest["columns"], columns)


def read_dataset(storage: Storage, uri: str, kind: str, columns: list[str] | None = None):
    """The committed shards of an artifact as a Ray Dataset."""
    import ray.data

    manifest = read_manifest(storage, uri, kind)
    paths = files(storage, uri, kind, manifest)
    if not paths:
        return ray.data.from_arrow(_empty_or_error(manifest, storage, uri, kind, columns))
    fs, _ = storage.arrow_fs(paths[0])
    return ray.data.read_parquet([storage.fs(p)[1] for p in paths], filesystem=fs, columns=columns)


def read_table(storage: Storage, uri: str, kind: str, columns: list[str] | None = None, filters=None):
    """The committed shards of an artifact as one pyarrow Table (driver-side; small artifacts only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = read_manifest(storage, uri, kind)
    tables = []
    for p in files(storage, uri, kind, manifest):
        fs, path = storage.fs(p)
        with fs.open(path, "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns, filters=filters))
    if not tables:
        return _empty_or_error(manifest, storage, uri, kind, columns)
    return pa.concat_tables(tables)


def _empty_table(all_columns: list[str], columns: list[str] | None):
    import pyarrow as pa

    return pa.table({c: pa.array([], pa.string()) for c in (columns or all_columns)})
