"""One file from a URL into the local cache: resumable, retried, checksummed.

The bytes go to ``<name>.part`` and the file is renamed to ``<name>`` only once it is complete and its checksum
matches, so a file under its own name in the cache is always whole (one placed there by hand, e.g. a Google Drive
file downloaded in a browser, is used as is, and still checked). A later run resumes a ``.part`` with an HTTP Range
request; a server that ignores Range sends the whole file again and the partial is restarted. Transient failures (a
dropped connection, a timeout, HTTP 408/429/5xx, a body shorter than its Content-Length) are retried with exponential
backoff, and every attempt that received bytes resets the count, so a flaky multi-GB download keeps progressing. A
checksum mismatch deletes the file (the next run downloads it again) and raises ``ChecksumError`` naming the file,
the expected and the actual digest.

md5 and sha256 are computed while the bytes arrive; a ``<name>.json`` beside the file keeps them (with its size and
mtime) so that a re-used file is not read again to get them.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from pcd_ray.errors import StageError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "pcd-ray-fetch/1 (dataset download)"
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 60.0


class ChecksumError(StageError):
    """A downloaded file does not match its published checksum (the file was deleted)."""


class _Transient(Exception):
    """An attempt failed in a way a retry may fix."""


@dataclass
class Downloaded:
    path: Path
    url: str
    bytes: int
    md5: str
    sha256: str
    checksum: str
    """What was verified: "md5 verified", "sha256 verified" or "none published"."""


class _Partial:
    """The ``.part`` file and the digests of the bytes it holds."""

    def __init__(self, path: Path):
        self.path = path
        self.md5, self.sha256 = hashlib.md5(), hashlib.sha256()
        self.size = 0
        if path.exists():
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    self._update(chunk)

    def _update(self, chunk: bytes) -> None:
        self.md5.update(chunk)
        self.sha256.update(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        self.path.unlink(missing_ok=True)
        self.md5, self.sha256, self.size = hashlib.md5(), hashlib.sha256(), 0

    def append(self, f, chunk: bytes) -> None:
        f.write(chunk)
        self._update(chunk)


def download(
    url: str,
    dest: Path,
    *,
    checksum: tuple[str, str] | None,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    progress: bool = True,
) -> Downloaded:
    """``url`` -> ``dest`` (resumed from ``dest.part``), verified against ``checksum`` = (algorithm, hex).

    Raises ChecksumError on a mismatch (``dest`` deleted) and StageError when the server refuses the file (HTTP
    4xx, an HTML page instead of the file) or keeps failing after ``retries`` retries (the partial is kept).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        info = _cached_info(dest, url)
    else:
        info = _fetch(url, dest, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s, progress=progress)
    return _verify(info, checksum)


def _cached_info(dest: Path, url: str) -> Downloaded:
    sidecar = _sidecar(dest)
    st = dest.stat()
    if sidecar.exists():
        try:
            meta = json.loads(sidecar.read_text())
            if meta["bytes"] == st.st_size and meta["mtime_ns"] == st.st_mtime_ns:
                return Downloaded(dest, meta["url"], st.st_size, meta["md5"], meta["sha256"], "")
        except (ValueError, KeyError, TypeError):
            pass
    log.info("%s: in the cache; reading it to check it", dest)
    part = _Partial(dest)
    return _record(dest, url, part)


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".json")


def _record(dest: Path, url: str, part: _Partial) -> Downloaded:
    info = Downloaded(dest, url, part.size, part.md5.hexdigest(), part.sha256.hexdigest(), "")
    meta = {k: v for k, v in asdict(info).items() if k not in ("path", "checksum")}
    _sidecar(dest).write_text(json.dumps({**meta, "mtime_ns": dest.stat().st_mtime_ns}))
    return info


def _verify(info: Downloaded, checksum: tuple[str, str] | None) -> Downloaded:
    if checksum is None:
        info.checksum = "none published"
        return info
    algo, expected = checksum
    actual = getattr(info, algo)
    if actual != expected:
        info.path.unlink(missing_ok=True)
        _sidecar(info.path).unlink(missing_ok=True)
        raise ChecksumError(
            f"{info.path.name}: {algo} mismatch: expected {expected}, got {actual} ({info.bytes} "
            f"bytes from {info.url}); the file was deleted, so the next run downloads it again"
        )
    info.checksum = f"{algo} verified"
    return info


def _fetch(url: str, dest: Path, *, retries: int, backoff_s: float, timeout_s: float, progress: bool) -> Downloaded:
    part = _Partial(dest.with_name(dest.name + ".part"))
    if part.size:
        log.info("%s: resuming from byte %d of the partial download", dest.name, part.size)
    failures, last = 0, ""
    while True:
        before = part.size
        try:
            _attempt(url, part, timeout_s, progress, dest.name)
            break
        except _Transient as e:
            last = str(e)
        failures = 0 if part.size > before else failures + 1
        if failures > retries:
            raise StageError(
                f"{url}: gave up after {retries} retries without progress ({last}); the "
                f"{part.size} bytes received are kept in {part.path} and the next run resumes from them"
            )
        wait = min(MAX_BACKOFF_S, backoff_s * 2 ** max(failures - 1, 0))
        log.warning("%s: %s; retrying in %.1fs (from byte %d)", dest.name, last, wait, part.size)
        time.sleep(wait)
    os.replace(part.path, dest)
    return _record(dest, url, part)


def _attempt(url: str, part: _Partial, timeout_s: float, progress: bool, label: str) -> None:
    """One request, appending to ``part``; returns when the file is complete, raises _Transient or StageError."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if part.size:
        headers["Range"] = f"bytes={part.size}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and part.size:
            # Past the end: the partial is the whole file, or the file changed on the server.
            if _total(e.headers.get("Content-Range")) == part.size:
                return
            part.restart()
            raise _Transient("the server's file is shorter than the partial download; starting over") from None
        if e.code in TRANSIENT_HTTP:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise StageError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if isinstance(getattr(e, "reason", None), ssl.SSLCertVerificationError):
            raise StageError(f"{url}: the server's TLS certificate does not verify ({e.reason})") from None
        raise _Transient(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
    with resp:
        if resp.headers.get_content_type() == "text/html":
            raise StageError(
                f"{url}: the server sent an HTML page instead of {label} (a login or quota page, or "
                f"a moved file); download it in a browser into the cache as {part.path.with_suffix('')}"
            )
        if resp.status == 206 and _start(resp.headers.get("Content-Range")) != part.size:
            part.restart()
            raise _Transient("the server answered the Range request with another range; starting over")
        if resp.status != 206 and part.size:
            log.info("%s: the server ignores Range requests; downloading from the start", label)
            part.restart()
        length = resp.headers.get("Content-Length")
        total = part.size + int(length) if length is not None else None
        _stream(resp, part, total, progress, label)
    if total is not None and part.size != total:
        raise _Transient(f"connection closed at byte {part.size} of {total}")


def _stream(resp, part: _Partial, total: int | None, progress: bool, label: str) -> None:
    from tqdm import tqdm

    with (
        open(part.path, "ab") as f,
        tqdm(
            total=total,
            initial=part.size,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        try:
            while chunk := resp.read(CHUNK):
                part.append(f, chunk)
                bar.update(len(chunk))
        except (http.client.HTTPException, OSError) as e:
            raise _Transient(f"{type(e).__name__}: {e}") from None


def _start(content_range: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-", content_range or "")
    return int(m.group(1)) if m else None


def _total(content_range: str | None) -> int | None:
    m = re.search(r"/(\d+)\s*$", content_range or "")
    return int(m.group(1)) if m else None
