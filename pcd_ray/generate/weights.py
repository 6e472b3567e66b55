"""Where the generate stage's LLM weights come from: a Hugging Face hub id, a local directory, or a remote URI.

``generate.llm.model`` (and ``generate.llm.tokenizer``) takes the three forms ``transformers`` and vLLM know plus
one they do not: a remote URI (``s3://bucket/models/llama``, any fsspec URI ``Storage`` handles), for clusters whose
nodes cannot reach the hub or that keep their own copy of a model. Two functions:

- ``check_model`` runs once on the driver before any actor starts. A misspelt id, a gated model without a token or
  an empty prefix otherwise shows up minutes later, once per actor, as a stack trace from deep inside an engine's
  constructor (after Ray has scheduled GPUs for it); here it is one error naming the config key and what to do.
- ``local_model`` runs in each engine actor and turns the setting into what ``from_pretrained`` / ``vllm.LLM``
  accept. A remote directory is downloaded once per node into a cache shared by every process on it: several
  actors on one node start together, and a 26 GB model fetched by each of them would multiply the start-up time
  and the disk it needs.

The cache directory of a download is keyed by the URI and a fingerprint of the remote listing (names, sizes, ETags
or mtimes), so a model replaced under the same URI is fetched again rather than silently served stale. A download
goes to a temporary directory beside its target and is renamed into place when complete, under an inter-process
file lock per URI: a process killed mid-download leaves only a temporary directory (removed by the next download of
that URI), never one that looks complete, and concurrent callers wait for the first and get its path. Old versions
are not deleted (a running actor may still be reading them).

Hub ids and local paths are told apart as ``transformers`` does: an existing directory wins, else ``name`` or
``org/name`` is a hub id. Nothing heavy is imported at module level (the generate actor imports this module
whatever the engine).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pcd_ray.errors import StageError
from pcd_ray.storage import Storage, is_remote

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 5.0
"""Per request to the hub: the check must not hold up a job when the hub (or a proxy) hangs."""

MODEL_FILES: tuple[str, ...] = ("config.json",)
"""What makes a directory a loadable model for transformers and vLLM."""
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer_config.json", "tokenizer.json")
"""A tokenizer may live in a directory of its own, without the model's config.json."""

# huggingface_hub's REPO_ID_REGEX (no leading or trailing "." or "-", so "./x" is a path) and its extra refusals
# ("--", "..", ".git"), so that classifying a setting needs no huggingface_hub import.
_REPO_ID = re.compile(r"(\b[\w\-.]+\b/)?\b[\w\-.]{1,96}\b")

Listing = dict[str, tuple[int, str]]
"""relative file name -> (size, version tag) of a remote directory."""

_DOWNLOAD_ATTEMPTS = 3
_LOCK_LOG_EVERY_S = 60.0


class ModelUnavailableError(StageError):
    """The configured model cannot be loaded; the message names the config key, the model and what to do."""


# ----------------------------------------------------------------------------------------------- classification
def _strip_file_scheme(model: str) -> str:
    return model[len("file://") :] if model.startswith("file://") else model


def _is_hub_id(model: str) -> bool:
    return bool(_REPO_ID.fullmatch(model)) and "--" not in model and ".." not in model and not model.endswith(".git")


def _kind(model: str) -> Literal["remote", "local", "hub"]:
    if is_remote(model):
        return "remote"
    path = _strip_file_scheme(model)
    if model.startswith("file://") or os.path.isdir(os.path.expanduser(path)):
        return "local"
    return "hub" if _is_hub_id(path) else "local"


def _absolute(model: str) -> str:
    return str(Path(_strip_file_scheme(model)).expanduser().resolve())


def _default_files(what: str) -> tuple[str, ...]:
    return TOKENIZER_FILES if what.rsplit(".", 1)[-1] == "tokenizer" else MODEL_FILES


def default_cache_dir() -> str:
    return os.environ.get("PCD_RAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pcd-ray", "models")


# ------------------------------------------------------------------------------------------------- local_model
def local_model(model: str, storage: Storage, cache_dir: str | None = None) -> str:
    """What ``from_pretrained`` / ``vllm.LLM`` should load for ``model``: a remote URI's directory downloaded into
    this node's cache (once per node and remote version, whichever process asks first); a local directory as an
    absolute path; a hub id unchanged (the libraries fetch and cache it themselves)."""
    kind = _kind(model)
    if kind == "hub":
        return model
    if kind == "local":
        return _absolute(model)
    return str(_download(model.rstrip("/"), storage, Path(cache_dir or default_cache_dir()).expanduser().resolve()))


def _listing(fs: Any, path: str) -> Listing:
    """relative name -> (size, version tag) of every file below ``path``."""
    prefix = path.rstrip("/") + "/"
    out: Listing = {}
    for name, info in fs.find(path, detail=True).items():
        if info.get("type") == "directory" or not name.startswith(prefix):
            continue
        # Whatever the backend offers that changes when an object is rewritten: S3's ETag, GCS's md5 or
        # generation, else a modification time.
        tag = next(
            (
                info[k]
                for k in ("ETag", "etag", "md5Hash", "generation", "LastModified", "mtime", "updated", "last_modified")
                if info.get(k) is not None
            ),
            "",
        )
        out[name[len(prefix) :]] = (int(info.get("size") or 0), str(tag))
    return out


def _cache_names(uri: str, listing: Listing) -> tuple[str, str]:
    """(per-URI stem shared by the lock and temporary directories, directory name of this version)."""
    uri_hash = hashlib.sha256(uri.encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", uri.split("://", 1)[-1]).strip("-.")[-60:]
    stem = f"{readable}-{uri_hash}"
    fingerprint = hashlib.sha256(json.dumps(sorted(listing.items())).encode()).hexdigest()[:16]
    return stem, f"{stem}-{fingerprint}"


def _download(uri: str, storage: Storage, cache: Path) -> Path:
    fs, path = storage.fs(uri)
    listing = _remote_listing(fs, path, uri)
    stem, name = _cache_names(uri, listing)
    if (cache / name).is_dir():  # renamed into place only once complete: no lock needed to trust it
        return cache / name
    cache.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock, Timeout

    lock = FileLock(str(cache / f"{stem}.lock"))
    while True:
        try:
            lock.acquire(timeout=_LOCK_LOG_EVERY_S)
            break
        except Timeout:
            log.info("waiting for another process on this node to finish downloading %s", uri)
    try:
        # Holding the URI's lock, no live process is writing a temporary directory of it: any left is a killed one's.
        for stale in cache.glob(f".tmp-{stem}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for _ in range(_DOWNLOAD_ATTEMPTS):
            _, name = _cache_names(uri, listing)
            target = cache / name
            if target.is_dir():
                return target
            tmp = cache / f".tmp-{stem}-{uuid.uuid4().hex[:8]}"
            try:
                _fetch(fs, path, listing, tmp)
                after = _remote_listing(fs, path, uri)
                if after != listing:  # rewritten while we read it: the files may mix two versions
                    log.warning("%s changed during its download; downloading it again", uri)
                    listing = after
                    shutil.rmtree(tmp, ignore_errors=True)
                    continue
                try:
                    os.rename(tmp, target)
                except OSError:
                    if not target.is_dir():
                        raise
                    # Another process renamed the same version into place (a lock that does not hold across
                    # hosts sharing the cache): its copy is as good as ours.
                    shutil.rmtree(tmp, ignore_errors=True)
                    return target
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            # For whoever cleans the cache: which URI and version a directory holds.
            (cache / f"{name}.json").write_text(
                json.dumps({"uri": uri, "files": {k: list(v) for k, v in sorted(listing.items())}}, indent=1) + "\n"
            )
            log.info(
                "downloaded %s (%d files, %.1f MB) to %s",
                uri,
                len(listing),
                sum(s for s, _ in listing.values()) / 1e6,
                target,
            )
            return target
        raise ModelUnavailableError(
            f"{uri} kept changing while it was downloaded ({_DOWNLOAD_ATTEMPTS} attempts); "
            "load it once its upload has finished"
        )
    finally:
        lock.release()


def _remote_listing(fs: Any, path: str, uri: str) -> Listing:
    listing = _listing(fs, path)
    if not listing:
        raise ModelUnavailableError(
            f"{uri}: no files under this URI; upload the model directory there "
            "(config.json, tokenizer and weights) or fix the URI"
        )
    return listing


def _fetch(fs: Any, path: str, listing: Listing, tmp: Path) -> None:
    rpaths, lpaths = [], []
    for rel in sorted(listing):
        local = (tmp / rel).resolve()
        if not local.is_relative_to(tmp.resolve()):  # an object key with ".." would write outside the cache
            raise ModelUnavailableError(f"refusing to download {rel!r}: it would land outside {tmp}")
        local.parent.mkdir(parents=True, exist_ok=True)
        rpaths.append(f"{path.rstrip('/')}/{rel}")
        lpaths.append(str(local))
    tmp.mkdir(parents=True, exist_ok=True)
    fs.get(rpaths, lpaths)  # lists: the async backends (s3fs) fetch the files concurrently
    for rel, (size, _) in listing.items():
        got = (tmp / rel).stat().st_size
        if got != size:
            raise ModelUnavailableError(f"{path}/{rel}: downloaded {got} bytes, the listing said {size}")


# ------------------------------------------------------------------------------------------------- check_model
def check_model(
    model: str,
    storage: Storage,
    *,
    revision: str | None = None,
    what: str = "generate.llm.model",
    files: Sequence[str] | None = None,
) -> None:
    """Fail fast, on the driver, when ``model`` cannot be loaded: raises ``ModelUnavailableError`` naming ``what``
    (the config key), the model and the remedy. A few seconds at most (one or two hub requests, one S3 request
    per file). ``files``: at least one must exist in the model directory; default config.json, or the tokenizer's
    files when ``what`` names a tokenizer. ``revision`` applies to hub ids (directories have one version)."""
    need = tuple(files) if files else _default_files(what)
    kind = _kind(model)
    if kind == "local":
        _check_local(model, what, need)
    elif kind == "remote":
        _check_remote(model.rstrip("/"), storage, what, need)
    else:
        _check_hub(model, revision, what, need)


def _names(files: Sequence[str]) -> str:
    return " or ".join(files)


def _check_local(model: str, what: str, files: Sequence[str]) -> None:
    path = _absolute(model)
    if not os.path.isdir(path):
        raise ModelUnavailableError(
            f"{what}: {model!r} is neither a directory ({path} does not exist) nor a Hugging Face hub id; give a hub "
            "id (org/name), a local directory holding the model's config.json and weights, or an s3:// URI"
        )
    if not any(os.path.isfile(os.path.join(path, f)) for f in files):
        raise ModelUnavailableError(
            f"{what}: {path} has no {_names(files)}; point {what} at the directory that holds it "
            "(the model's config.json, tokenizer and weights)"
        )


def _check_remote(uri: str, storage: Storage, what: str, files: Sequence[str]) -> None:
    try:
        fs, path = storage.fs(uri)
        found = any(fs.exists(f"{path.rstrip('/')}/{f}") for f in files)
    except PermissionError as e:
        raise ModelUnavailableError(
            f"{what}: access to {uri} denied ({e}); give the job credentials that can read it (AWS's usual chain: "
            "AWS_* in the runtime_env, a profile, an instance role)"
        ) from None
    except Exception as e:  # no credentials, endpoint unreachable, unknown protocol: all mean "cannot load it"
        raise ModelUnavailableError(f"{what}: cannot read {uri}: {type(e).__name__}: {e}") from None
    if not found:
        raise ModelUnavailableError(
            f"{what}: {uri} has no {_names(files)}; upload the model directory there (config.json, tokenizer and "
            "weights) or fix the URI"
        )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)())


def _check_hub(repo_id: str, revision: str | None, what: str, files: Sequence[str]) -> None:
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def gated() -> ModelUnavailableError:
        return ModelUnavailableError(
            f"{what}: {repo_id!r} is gated or forbidden on the Hugging Face hub: accept the licence on the model's "
            "hub page with an account and set HF_TOKEN to that account's token in the job's environment "
            "(runtime_env env_vars or the cluster's environment)"
        )

    if _hub_offline():
        reason = "HF_HUB_OFFLINE is set"
    else:
        api = HfApi()
        try:
            # The token is huggingface_hub's own (HF_TOKEN, else a saved login). expand: only what we read.
            info = api.model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S, expand=["gated"])
            if info.gated:
                # A gated repo's metadata is public; only its files answer whether this token may load it.
                get_hf_file_metadata(
                    hf_hub_url(repo_id, files[0], revision=revision, endpoint=api.endpoint), timeout=HUB_TIMEOUT_S
                )
            return
        except RemoteEntryNotFoundError:
            return  # the files are readable; which ones the repo has is the engine's business
        except GatedRepoError:
            raise gated() from None
        except RepositoryNotFoundError as e:
            private = " or gated" if e.response is not None and e.response.status_code == 401 else ""
            raise ModelUnavailableError(
                f"{what}: {repo_id!r} not found on the Hugging Face hub (or private{private}: set HF_TOKEN to a token "
                f"that can read it); check the spelling, or, if you meant a local directory, {_absolute(repo_id)} does "
                "not exist"
            ) from None
        except RevisionNotFoundError:
            raise ModelUnavailableError(
                f"{what}: revision {revision!r} of {repo_id!r} not found on the Hugging Face hub; fix the revision "
                "(a branch, tag or commit of the repo)"
            ) from None
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                raise gated() from None
            if status is not None and status < 500 and status != 429:
                raise ModelUnavailableError(f"{what}: the Hugging Face hub refused {repo_id!r}: {e}") from None
            reason = f"the hub answered {status}"  # overloaded or down: the cache may still have it
        except Exception as e:  # connection refused, DNS, timeout, proxy: every way of not reaching the hub
            reason = f"{type(e).__name__}: {e}"
    if any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision), str) for f in files):
        log.warning("%s: the Hugging Face hub is unreachable (%s); %s is in the local cache", what, reason, repo_id)
        return
    raise ModelUnavailableError(
        f"{what}: {repo_id!r}{f' at revision {revision!r}' if revision else ''} is not in the local Hugging Face "
        f"cache and the hub is unreachable ({reason}); download it where the hub is reachable "
        f"(`hf download {repo_id}` into the HF cache the nodes use), or copy it to s3:// and set {what} to that URI"
    )
