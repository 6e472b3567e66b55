"""Where a fetch lands: a local folder or an s3:// prefix, filled from a staging folder and marked by a manifest.

A part is extracted into a staging folder and reaches the target only once every source of the part is in it and the
layout check passed. Locally the staging folder is a hidden folder inside the target (same filesystem), and
committing renames its top-level entries into place (merging into folders other parts already filled, as COCO's
three parts share the root); on s3:// the staging folder is local (under the cache) and its files are uploaded. The
fetch manifest ``_fetch_<dataset>.json`` is written after the part's files: it is what says a part is there, what was
downloaded (URL, bytes, md5, sha256, what was verified) and when. A failed part leaves no staging folder behind; a
killed one leaves at most a hidden ``.fetch-staging-*`` folder, removed by the next fetch of that dataset.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pcd_ray.errors import StageError
from pcd_ray.storage import Storage, is_remote, join

STAGING_PREFIX = ".fetch-staging-"


def manifest_name(dataset: str) -> str:
    return f"_fetch_{dataset}.json"


class Target:
    def __init__(self, storage: Storage, uri: str, scratch: Path):
        """``scratch``: a local folder for staging when the target is remote."""
        self.storage = storage
        self.uri = storage.resolve(uri)
        self.remote = is_remote(self.uri)
        self.scratch = scratch

    def __str__(self) -> str:
        return self.uri

    # -------------------------------------------------------------------------------------------------- manifest
    def read_manifest(self, dataset: str) -> dict[str, Any] | None:
        """The target's fetch manifest of ``dataset``, None when there is none; StageError when the target cannot
        be read (no credentials, no such bucket, no permission)."""
        uri = join(self.uri, manifest_name(dataset))
        try:
            return self.storage.read_json(uri) if self.storage.exists(uri) else None
        except Exception as e:  # botocore's credential and endpoint errors are not OSErrors
            raise StageError(
                f"{self.uri}: cannot read the target ({type(e).__name__}: {e}); s3:// credentials come "
                f"from the AWS chain (environment, profile, instance role), the endpoint from "
                f"--endpoint-url or AWS_ENDPOINT_URL"
            ) from None

    def write_manifest(self, dataset: str, manifest: dict[str, Any]) -> None:
        self.storage.write_json(join(self.uri, manifest_name(dataset)), manifest)

    # --------------------------------------------------------------------------------------------------- staging
    def _staging_parent(self) -> Path:
        return self.scratch if self.remote else Path(self.uri)

    def remove_stale_staging(self, dataset: str) -> None:
        parent = self._staging_parent()
        if parent.is_dir():
            for d in parent.glob(f"{STAGING_PREFIX}{dataset}-*"):
                shutil.rmtree(d, ignore_errors=True)

    @contextmanager
    def staging(self, dataset: str, part: str) -> Iterator[Path]:
        """A fresh local folder for one part, removed on exit; a local target created only for it is removed too
        when the part fails."""
        parent = self._staging_parent()
        created = not parent.exists()
        parent.mkdir(parents=True, exist_ok=True)
        path = parent / f"{STAGING_PREFIX}{dataset}-{part}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        ok = False
        try:
            yield path
            ok = True
        finally:
            shutil.rmtree(path, ignore_errors=True)
            if created and not ok and not self.remote and not any(parent.iterdir()):
                parent.rmdir()

    # ---------------------------------------------------------------------------------------------------- commit
    def commit(self, staging: Path) -> tuple[int, int]:
        """Move (local) or upload (s3) everything below ``staging`` into the target; returns (files, bytes)."""
        files = [p for p in sorted(staging.rglob("*")) if p.is_file() or p.is_symlink()]
        size = sum(p.lstat().st_size for p in files)
        if self.remote:
            fs, root = self.storage.fs(self.uri)
            # One batched call: s3fs uploads the files concurrently (a dataset can be 100k files).
            fs.put([str(p) for p in files], [f"{root.rstrip('/')}/{p.relative_to(staging).as_posix()}" for p in files])
        else:
            _merge(staging, Path(self.uri))
        return len(files), size


def _merge(src: Path, dst: Path) -> None:
    """Rename ``src``'s entries into ``dst``: a whole folder in one rename where ``dst`` lacks it, file by file
    where another part (or an earlier, killed commit) already made it."""
    for entry in sorted(src.iterdir()):
        out = dst / entry.name
        if not out.exists() and not out.is_symlink():
            os.replace(entry, out)
        elif entry.is_dir() and not entry.is_symlink() and out.is_dir():
            _merge(entry, out)
        else:
            if out.is_dir() and not out.is_symlink():
                shutil.rmtree(out)
            os.replace(entry, out)
