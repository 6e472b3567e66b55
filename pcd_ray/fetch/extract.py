"""A downloaded file into a staging folder: tar (any compression) and zip members under ``into``, or the file copied.

Extraction is also the integrity check of downloads that have no published checksum: a truncated or garbled archive
fails here (gzip's CRC, zip's per-member CRC, a tar header that does not parse) with ``ArchiveError``. Members are
written with tarfile's ``data`` filter and the same rules for zip (no absolute paths, no ``..``, no links leaving the
folder), so an archive cannot write outside the staging folder.
"""

from __future__ import annotations

import fnmatch
import gzip
import lzma
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from pcd_ray.errors import StageError
from pcd_ray.fetch.specs import Source


class ArchiveError(StageError):
    """A downloaded archive is damaged or not what its source says it is."""


def _wanted(name: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _clean(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def unpack(source: Source, archive: Path, staging: Path, progress: bool = True) -> int:
    """Write ``source``'s contents below ``staging/source.into``; returns the number of files written.

    Raises ArchiveError naming the archive when it is damaged, unsafe, or has no member matching ``members``.
    """
    dest = staging.joinpath(*source.into.split("/")) if source.into else staging
    dest.mkdir(parents=True, exist_ok=True)
    if source.unpack == "file":
        shutil.copyfile(archive, dest / source.name)
        return 1
    from tqdm import tqdm

    with tqdm(desc=f"extract {source.name}", unit=" files", disable=not progress, leave=False) as bar:
        try:
            if source.unpack == "tar":
                count = _untar(archive, dest, source.members, bar)
            else:
                count = _unzip(archive, dest, source.members, bar)
        except (
            tarfile.TarError,
            zipfile.BadZipFile,
            zlib.error,
            gzip.BadGzipFile,
            lzma.LZMAError,
            EOFError,
            ValueError,
        ) as e:
            raise ArchiveError(
                f"{archive}: damaged or not a {source.unpack} archive ({type(e).__name__}: {e})"
            ) from None
    if not count:
        what = f"members matching {list(source.members)}" if source.members else "files"
        raise ArchiveError(f"{archive}: no {what} in the archive")
    return count


def _untar(archive: Path, dest: Path, patterns: tuple[str, ...], bar) -> int:
    count = 0
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if not (member.isfile() or member.issym() or member.islnk()) or not _wanted(_clean(member.name), patterns):
                continue
            tar.extract(member, dest, filter="data")
            count += 1
            bar.update()
    return count


def _unzip(archive: Path, dest: Path, patterns: tuple[str, ...], bar) -> int:
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = _clean(info.filename)
            if info.is_dir() or not _wanted(name, patterns):
                continue
            parts = PurePosixPath(name).parts
            if name.startswith("/") or ".." in parts or "\\" in name or (parts and ":" in parts[0]):
                raise ValueError(f"member {info.filename!r} would be written outside the target folder")
            out = dest.joinpath(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            count += 1
            bar.update()
    return count
