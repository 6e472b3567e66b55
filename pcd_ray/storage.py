"""URIs to filesystems: the only module that knows about s3.

Every input and output of pcd-ray is a URI: a local path or ``s3://bucket/key``. Relative URIs resolve against
``storage.root``. S3 endpoint and region come from the config or the environment (AWS_ENDPOINT_URL,
AWS_DEFAULT_REGION); credentials only from AWS's own chain (environment, profile, instance role), never a file.

Atomicity: a local file is written to a temporary name beside it and renamed into place; an S3 object becomes
visible only when its upload completes. Readers of datasets go through a manifest (``artifacts.py``), so a file
from a killed writer is never read.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pcd_ray.config import StorageConfig


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts) if is_remote(uri) else str(Path(uri).joinpath(*parts))


class Storage:
    """Resolves URIs and hands out fsspec / pyarrow filesystems for them. Picklable (Ray ships it to workers)."""

    def __init__(self, cfg: StorageConfig | None = None):
        self.cfg = cfg or StorageConfig()
        self._fs: dict[str, Any] = {}

    def portable_cfg(self) -> StorageConfig:
        """The config with what this process resolved filled in (absolute root, S3 endpoint/region from its
        environment): what a worker, with another cwd and maybe without the driver's environment, needs to reach
        the same storage."""
        opts = self.s3_options()["client_kwargs"]
        s3 = self.cfg.s3.model_copy(update={"endpoint_url": opts.get("endpoint_url"), "region": opts["region_name"]})
        # A relative local root means "relative to where the user ran the command", not to a worker's cwd.
        return self.cfg.model_copy(update={"s3": s3, "root": self.root})

    def __getstate__(self):
        return {"cfg": self.portable_cfg()}

    def __setstate__(self, state):
        self.cfg = state["cfg"]
        self._fs = {}

    # ------------------------------------------------------------------------------------------------- naming
    @property
    def root(self) -> str:
        root = self.cfg.root
        if root.startswith("file://"):
            root = root[len("file://") :]
        return root if is_remote(root) else str(Path(root).expanduser().resolve())

    def resolve(self, uri: str) -> str:
        """Absolute URI: remote and absolute local paths pass through, relative ones land under storage.root."""
        if uri.startswith("file://"):
            uri = uri[len("file://") :]
        if is_remote(uri) or os.path.isabs(uri) or uri.startswith(("./", "../", "~")):
            return uri if is_remote(uri) else str(Path(uri).expanduser().resolve())
        return join(self.root, uri)

    # -------------------------------------------------------------------------------------------- filesystems
    def s3_options(self) -> dict[str, Any]:
        s3 = self.cfg.s3
        endpoint = s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = s3.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        client_kwargs: dict[str, Any] = {"region_name": region}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        # Listing caches make a reader miss what another process just wrote; artifacts are few and large.
        return {
            "anon": s3.anon,
            "client_kwargs": client_kwargs,
            "use_listings_cache": False,
            "skip_instance_cache": True,
        }

    def fs(self, uri: str):
        """(fsspec filesystem, path within it) for a URI."""
        uri = self.resolve(uri)
        if is_remote(uri):
            protocol, _, path = uri.partition("://")
            if protocol not in self._fs:
                import fsspec

                options = self.s3_options() if protocol in ("s3", "s3a") else {}
                self._fs[protocol] = fsspec.filesystem("s3" if protocol == "s3a" else protocol, **options)
            return self._fs[protocol], path
        if "file" not in self._fs:
            import fsspec

            self._fs["file"] = fsspec.filesystem("file")
        return self._fs["file"], uri

    def arrow_fs(self, uri: str):
        """(pyarrow filesystem, path) for Ray Data readers/writers and Ray Train's storage."""
        import pyarrow.fs as pafs

        fs, path = self.fs(uri)
        if not is_remote(self.resolve(uri)):
            return pafs.LocalFileSystem(), path
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path

    # --------------------------------------------------------------------------------------------- file ops
    def exists(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        return fs.exists(path)

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.fs(uri)
        with fs.open(path, "rb") as f:
            return f.read()

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode()

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Atomic: readers see the old object or the whole new one, never a prefix."""
        fs, path = self.fs(uri)
        if is_remote(self.resolve(uri)):
            fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode())

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())

    def listdir(self, uri: str) -> list[str]:
        """Full URIs of the entries directly under a directory ([] if it does not exist)."""
        fs, path = self.fs(uri)
        if not fs.exists(path):
            return []
        base = self.resolve(uri)
        return sorted(join(base, posixpath.basename(p.rstrip("/"))) for p in fs.ls(path, detail=False))

    def find(self, uri: str) -> list[str]:
        """Full URIs of every file below a directory."""
        fs, path = self.fs(uri)
        if not fs.exists(path):
            return []
        base = self.resolve(uri)
        prefix = path.rstrip("/") + "/"
        out = []
        for p in fs.find(path):
            rel = p[len(prefix) :] if p.startswith(prefix) else posixpath.basename(p)
            out.append(join(base, *rel.split("/")))
        return sorted(out)

    def rm(self, uri: str) -> None:
        """Delete a file or everything below a prefix (missing is fine)."""
        fs, path = self.fs(uri)
        if fs.isfile(path):
            fs.rm_file(path)
            return
        # By exact name: fs.rm() would glob-expand keys holding [, * or ?.
        for f in fs.find(path):
            fs.rm_file(f)
        if not is_remote(self.resolve(uri)) and os.path.isdir(path):
            shutil.rmtree(path)

    def put_dir(self, local_dir: str | Path, uri: str) -> None:
        """Copy a local directory's files to a URI (a local copy goes through a sibling temp dir + rename)."""
        local_dir = Path(local_dir)
        target = self.resolve(uri)
        if not is_remote(target):
            parent = Path(target).parent
            parent.mkdir(parents=True, exist_ok=True)
            tmp = parent / f".tmp-{uuid.uuid4().hex[:8]}-{Path(target).name}"
            shutil.copytree(local_dir, tmp)
            if Path(target).exists():
                old = parent / f".old-{uuid.uuid4().hex[:8]}-{Path(target).name}"
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            return
        for f in sorted(local_dir.rglob("*")):
            if f.is_file():
                self.write_bytes(join(target, *f.relative_to(local_dir).parts), f.read_bytes())

    @contextmanager
    def local_dir(self, uri: str) -> Iterator[Path]:
        """A local directory with the contents of a URI (the directory itself when it is local)."""
        target = self.resolve(uri)
        if not is_remote(target):
            if not Path(target).is_dir():
                raise FileNotFoundError(f"{target}: no such directory")
            yield Path(target)
            return
        files = self.find(target)
        if not files:
            raise FileNotFoundError(f"{target}: no such directory (or it is empty)")
        with tempfile.TemporaryDirectory(prefix="pcd-ray-") as tmp:
            for f in files:
                dest = Path(tmp).joinpath(*f[len(target.rstrip("/")) + 1 :].split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(self.read_bytes(f))
            yield Path(tmp)
