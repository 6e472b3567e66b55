"""``pcd-ray fetch DATASET --to URI``: download, verify, extract and commit a dataset's parts, one part at a time.

For each part not yet in the target's fetch manifest: every source is downloaded into the cache
(``<cache>/<dataset>/<file>``, resumable) and checked against its checksum before anything is extracted; the part is
extracted into staging, its layout checked (``Part.expect``), committed into the target, and the manifest rewritten
with the part added. A part already in the manifest is skipped, so a re-run after success does nothing and a re-run
after a failure resumes the download where it stopped. A fetch holds a file lock per dataset in the cache, so two
fetches of one dataset wait for each other instead of writing the same partial files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pcd_ray.errors import StageError
from pcd_ray.fetch.download import Downloaded, download
from pcd_ray.fetch.extract import ArchiveError, unpack
from pcd_ray.fetch.specs import DatasetSpec
from pcd_ray.fetch.target import Target, manifest_name
from pcd_ray.storage import Storage, is_remote, join


def default_cache_dir() -> Path:
    return Path(os.path.expanduser("~")) / ".cache" / "pcd-ray" / "datasets"


def source_urls(spec: DatasetSpec, base_url: str | None = None, urls: dict[str, str] | None = None) -> dict[str, str]:
    """File name -> URL to download it from: ``urls`` by file name first, else ``base_url/<name>``, else the
    publisher's. Raises KeyError when ``urls`` names a file the dataset does not have."""
    names = [s.name for p in spec.parts.values() for s in p.sources]
    urls = dict(urls or {})
    unknown = [n for n in urls if n not in names]
    if unknown:
        raise KeyError(f"{spec.name} has no file {unknown[0]!r} (files: {', '.join(names)})")
    out = {}
    for part in spec.parts.values():
        for s in part.sources:
            out[s.name] = urls.get(s.name) or (f"{base_url.rstrip('/')}/{s.name}" if base_url else s.url)
    return out


def fetch(
    spec: DatasetSpec,
    to: str,
    *,
    only: list[str] | None = None,
    cache_dir: str | Path | None = None,
    base_url: str | None = None,
    urls: dict[str, str] | None = None,
    storage: Storage | None = None,
    force: bool = False,
    dry_run: bool = False,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    progress: bool = True,
    clean_cache: bool = False,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fetch ``spec``'s parts (``only``, default all) to ``to``; returns the target's fetch manifest (the plan on a
    dry run). Raises KeyError for an unknown part or file name, StageError when a download or archive fails."""
    storage = storage or Storage()
    if not is_remote(to):  # a command-line path: relative to where it was typed, not to storage.root
        to = str(Path(to.removeprefix("file://")).expanduser().resolve())
    parts = spec.select(only)
    resolved = source_urls(spec, base_url, urls)
    cache = Path(cache_dir or default_cache_dir()).expanduser().resolve() / spec.name
    target = Target(storage, to, scratch=cache)
    if dry_run:
        try:
            done = (target.read_manifest(spec.name) or {}).get("parts", {})
        except StageError as e:  # a plan is still worth printing where the target cannot be read from here
            done, unread = {}, str(e)
        else:
            unread = None
        todo = [p for p in parts if force or p not in done]
        out(format_plan(spec, target, parts, todo, resolved, cache, unread))
        return {"dataset": spec.name, "target": target.uri, "todo": todo}
    manifest = target.read_manifest(spec.name) or _new_manifest(spec)
    if not force and all(p in manifest["parts"] for p in parts):
        return _already(spec, target, manifest, parts, out)
    from filelock import FileLock

    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".lock")):
        # Again under the lock: a fetch of the same dataset that held it may have committed parts meanwhile.
        manifest = target.read_manifest(spec.name) or _new_manifest(spec)
        todo = [p for p in parts if force or p not in manifest["parts"]]
        if not todo:
            return _already(spec, target, manifest, parts, out)
        target.remove_stale_staging(spec.name)
        for name in todo:
            manifest["parts"][name] = _fetch_part(
                spec,
                name,
                target,
                resolved,
                cache,
                retries=retries,
                backoff_s=backoff_s,
                timeout_s=timeout_s,
                progress=progress,
                out=out,
            )
            manifest["complete"] = all(p in manifest["parts"] for p in spec.parts)
            target.write_manifest(spec.name, manifest)  # last: the part counts as fetched from here on
            if clean_cache:
                for s in spec.parts[name].sources:
                    for f in (cache / s.name, cache / f"{s.name}.json"):
                        f.unlink(missing_ok=True)
    return manifest


def _fetch_part(
    spec: DatasetSpec,
    name: str,
    target: Target,
    urls: dict[str, str],
    cache: Path,
    *,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    progress: bool,
    out: Callable[[str], None],
) -> dict[str, Any]:
    """Download, verify, extract and commit one part; returns its manifest entry."""
    started = time.time()
    sources = spec.parts[name].sources
    got = []
    for s in sources:
        out(f"{spec.name}: {name}: {s.name} <- {urls[s.name]}")
        got.append(
            download(
                urls[s.name],
                cache / s.name,
                checksum=s.checksum,
                retries=retries,
                backoff_s=backoff_s,
                timeout_s=timeout_s,
                progress=progress,
            )
        )
    files, size = _stage_and_commit(spec, name, got, target, progress)
    out(f"{spec.name}: {name}: {files} files ({_human(size)}) at {target} in {time.time() - started:.0f}s")
    return {
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        "bytes": size,
        "sources": [
            {
                "name": s.name,
                "url": d.url,
                "bytes": d.bytes,
                "md5": d.md5,
                "sha256": d.sha256,
                "checksum": d.checksum + (f" ({s.checksum_note})" if s.checksum_note else ""),
            }
            for s, d in zip(sources, got)
        ],
    }


def _already(
    spec: DatasetSpec, target: Target, manifest: dict[str, Any], parts: list[str], out: Callable[[str], None]
) -> dict[str, Any]:
    when = ", ".join(f"{p} {manifest['parts'][p]['fetched_at']}" for p in parts)
    out(f"{spec.name}: already fetched at {target} ({when}); --force fetches again")
    return manifest


def _new_manifest(spec: DatasetSpec) -> dict[str, Any]:
    return {
        "dataset": spec.name,
        "title": spec.title,
        "homepage": spec.homepage,
        "terms": spec.terms,
        "reader": spec.reader,
        "complete": False,
        "parts": {},
    }


def _stage_and_commit(
    spec: DatasetSpec, part: str, got: list[Downloaded], target: Target, progress: bool
) -> tuple[int, int]:
    with target.staging(spec.name, part) as staging:
        for source, d in zip(spec.parts[part].sources, got):
            try:
                unpack(source, d.path, staging, progress)
            except ArchiveError as e:
                if source.checksum is None:
                    # Nothing vouched for these bytes: most likely a damaged download, so fetch it again next time.
                    d.path.unlink(missing_ok=True)
                    d.path.with_name(d.path.name + ".json").unlink(missing_ok=True)
                    raise ArchiveError(
                        f"{e}; the download was deleted, so the next run downloads it again; "
                        f"nothing was written to {target}"
                    ) from None
                raise ArchiveError(
                    f"{e}; its {source.checksum[0]} matched the published one, so the file itself "
                    f"is like this; nothing was written to {target}"
                ) from None
        missing = [p for p in spec.parts[part].expect if not staging.joinpath(*p.split("/")).exists()]
        if missing:
            names = ", ".join(s.name for s in spec.parts[part].sources)
            raise StageError(
                f"{spec.name}: {part}: the downloads ({names}) did not contain {', '.join(missing)}; "
                f"the files may have changed on the server "
                f"(delete them from {got[0].path.parent} if they are wrong); nothing was written to "
                f"{target}"
            )
        return target.commit(staging)


# ---------------------------------------------------------------------------------------------------- reporting
def _human(n: int | None) -> str:
    if n is None:
        return "size not published"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _cache_state(path: Path) -> str:
    if path.exists():
        return f"in cache ({_human(path.stat().st_size)})"
    part = path.with_name(path.name + ".part")
    if part.exists():
        return f"partial in cache ({_human(part.stat().st_size)}, resumes)"
    return "not in cache"


def format_plan(
    spec: DatasetSpec,
    target: Target,
    parts: list[str],
    todo: list[str],
    urls: dict[str, str],
    cache: Path,
    unread: str | None = None,
) -> str:
    lines = [f"{spec.name} -> {target} (dry run: nothing is downloaded or written)"]
    if unread:
        lines.append(f"  target not checked: {unread}")
    for name in parts:
        part = spec.parts[name]
        if name not in todo:
            lines.append(f"  {name}: already fetched")
            continue
        lines.append(f"  {name}: {part.description or spec.title}; writes {', '.join(part.expect)}")
        for s in part.sources:
            check = f"{s.checksum[0]} {s.checksum[1]}" if s.checksum else "no published checksum"
            size = f"~{_human(s.approx_bytes)}" if s.approx_bytes is not None else _human(None)
            lines.append(f"    {s.name}  {size}  {check}  {_cache_state(cache / s.name)}")
            lines.append(f"      {urls[s.name]}")
    lines.append(f"  manifest: {join(target.uri, manifest_name(spec.name))}; terms of use: {spec.terms}")
    return "\n".join(lines)


def format_list(datasets: dict[str, DatasetSpec]) -> str:
    rows = [("dataset", "download", "parts", "checksums", "layout")]
    for spec in datasets.values():
        sources = [s for p in spec.parts.values() for s in p.sources]
        checked = sum(s.checksum is not None for s in sources)
        size = spec.approx_bytes
        known = sum(s.approx_bytes or 0 for s in sources)
        rows.append(
            (
                spec.name,
                f"~{_human(size)}" if size is not None else f"~{_human(known)} + unpublished",
                ",".join(spec.parts),
                f"{checked}/{len(sources)} files",
                " ".join(sorted({e.split("/")[0] + "/" for p in spec.parts.values() for e in p.expect})),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)
