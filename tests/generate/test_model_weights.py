"""Where the LLM's weights come from (pcd_ray/generate/weights.py): local directories, s3:// (the session's moto
server) downloaded once per node under a file lock, and the hub (a fake /api/models on 127.0.0.1) with its
not-found, gated, revision and unreachable answers, checked before any actor starts."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pcd_ray.generate.weights import ModelUnavailableError, _cache_names, check_model, local_model
from pcd_ray.storage import Storage

FILES = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}", "weights/model.safetensors": b"w" * 4096}


# ------------------------------------------------------------------------------------------------------ local
def _model_dir(path: Path, files: dict[str, bytes] = FILES) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def test_local_directory_passes_and_resolves_to_absolute(tmp_path, monkeypatch):
    _model_dir(tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    # An existing directory wins over the hub id it also looks like, as in transformers.
    check_model("org/name", Storage())
    assert local_model("org/name", Storage()) == str(tmp_path / "org" / "name")
    assert local_model(f"file://{tmp_path}/org/name", Storage()) == str(tmp_path / "org" / "name")
    assert local_model("./org/name", Storage()) == str(tmp_path / "org" / "name")


def test_hub_id_is_returned_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_model("meta-llama/Llama-2-13b-chat-hf", Storage()) == "meta-llama/Llama-2-13b-chat-hf"
    assert local_model("gpt2", Storage()) == "gpt2"


@pytest.mark.parametrize("model", ["./missing", "models/llama/7b", "/nonexistent/model"])
def test_missing_local_directory_fails(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelUnavailableError, match=r"generate\.llm\.model: .*is neither a directory"):
        check_model(model, Storage())


def test_local_directory_without_config_fails(tmp_path):
    _model_dir(tmp_path / "m", {"model.safetensors": b"w"})
    with pytest.raises(ModelUnavailableError, match=rf"generate\.llm\.model: {tmp_path}/m has no config\.json"):
        check_model(str(tmp_path / "m"), Storage())
    # A tokenizer directory needs the tokenizer's files, not the model's config.
    _model_dir(tmp_path / "tok", {"tokenizer.json": b"{}"})
    check_model(str(tmp_path / "tok"), Storage(), what="generate.llm.tokenizer")
    with pytest.raises(ModelUnavailableError, match="generate.llm.tokenizer: .* has no tokenizer_config.json"):
        check_model(str(tmp_path / "m"), Storage(), what="generate.llm.tokenizer")


# --------------------------------------------------------------------------------------------------------- s3
def _upload(storage: Storage, uri: str, files: dict[str, bytes] = FILES) -> None:
    for rel, data in files.items():
        storage.write_bytes(f"{uri}/{rel}", data)


def _files_below(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_s3_model_downloads_once_and_again_when_replaced(s3_root, tmp_path):
    storage, uri, cache = Storage(), f"{s3_root}/llm", tmp_path / "cache"
    _upload(storage, uri)
    check_model(uri, storage)
    first = Path(local_model(uri, storage, str(cache)))
    assert first.parent == cache and _files_below(first) == FILES
    inode = first.stat().st_ino
    assert local_model(uri + "/", storage, str(cache)) == str(first) and first.stat().st_ino == inode
    storage.write_bytes(f"{uri}/weights/model.safetensors", b"v" * 4096)  # same size, new content
    second = Path(local_model(uri, storage, str(cache)))
    assert second != first
    assert (second / "weights" / "model.safetensors").read_bytes() == b"v" * 4096
    assert (first / "weights" / "model.safetensors").read_bytes() == b"w" * 4096  # a running actor may read it
    assert not list(cache.glob(".tmp-*"))


def test_s3_model_cache_dir_from_environment(s3_root, tmp_path, monkeypatch):
    storage, uri = Storage(), f"{s3_root}/llm"
    _upload(storage, uri, {"config.json": b"{}"})
    monkeypatch.setenv("PCD_RAY_CACHE", str(tmp_path / "env-cache"))
    assert Path(local_model(uri, storage)).parent == tmp_path / "env-cache"


def test_s3_download_killed_midway_leaves_nothing_that_looks_complete(s3_root, tmp_path, monkeypatch):
    storage, uri, cache = Storage(), f"{s3_root}/llm", tmp_path / "cache"
    _upload(storage, uri)
    fs, _ = storage.fs(uri)
    real_get = fs.get

    def dies_midway(rpaths, lpaths, **kw):
        Path(lpaths[0]).write_bytes(b"partial")
        raise ConnectionError("connection reset")

    monkeypatch.setattr(fs, "get", dies_midway)
    with pytest.raises(ConnectionError):
        local_model(uri, storage, str(cache))
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    # What a SIGKILLed download leaves: a temporary directory, which the next download of the URI removes.
    stem, _ = _cache_names(uri, {})
    _model_dir(cache / f".tmp-{stem}-deadbeef", {"config.json": b"{"})
    monkeypatch.setattr(fs, "get", real_get)
    path = Path(local_model(uri, storage, str(cache)))
    assert _files_below(path) == FILES and not list(cache.glob(".tmp-*"))


def test_s3_model_rewritten_during_its_download_is_downloaded_again(s3_root, tmp_path, monkeypatch):
    storage, uri, cache = Storage(), f"{s3_root}/llm", tmp_path / "cache"
    _upload(storage, uri)
    fs, _ = storage.fs(uri)
    real_get, calls = fs.get, []

    def upload_lands_midway(rpaths, lpaths, **kw):
        real_get(rpaths, lpaths, **kw)
        calls.append(len(rpaths))
        if len(calls) == 1:
            storage.write_bytes(f"{uri}/config.json", b'{"model_type": "llama", "v": 2}')

    monkeypatch.setattr(fs, "get", upload_lands_midway)
    path = Path(local_model(uri, storage, str(cache)))
    assert calls == [3, 3] and (path / "config.json").read_bytes() == b'{"model_type": "llama", "v": 2}'
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [path.name]


def _local_model_in_a_process(uri: str, cache: str, counter: str, barrier, results) -> None:
    """Counts every file it fetches (one line each, O_APPEND) and fetches slowly, so both processes overlap."""
    import s3fs

    real = s3fs.S3FileSystem._get_file

    async def counting(self, rpath, lpath, **kwargs):
        with open(counter, "a") as f:
            f.write(rpath + "\n")
        await asyncio.sleep(0.3)
        return await real(self, rpath, lpath, **kwargs)

    s3fs.S3FileSystem._get_file = counting
    barrier.wait(timeout=60)
    try:
        results.put(local_model(uri, Storage(), cache))
    except BaseException as e:  # reported, so that a failure reads as one and not as a 90 s queue timeout
        results.put(f"failed: {type(e).__name__}: {e}")


def test_s3_concurrent_processes_download_once(s3_root, tmp_path):
    storage, uri, cache, counter = Storage(), f"{s3_root}/llm", tmp_path / "cache", tmp_path / "fetched.txt"
    _upload(storage, uri)
    ctx = mp.get_context("spawn")  # as Ray's actors are: separate interpreters, no shared state but the disk
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_local_model_in_a_process, args=(uri, str(cache), str(counter), barrier, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    try:
        paths = [results.get(timeout=90) for _ in procs]
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert paths[0] == paths[1] and [p.exitcode for p in procs] == [0, 0] and _files_below(Path(paths[0])) == FILES
    assert sorted(counter.read_text().split()) == sorted(f"{uri[5:]}/{rel}" for rel in FILES)  # each file once


def test_s3_check_names_a_missing_or_incomplete_uri(s3_root):
    storage = Storage()
    with pytest.raises(ModelUnavailableError, match=rf"generate\.llm\.model: {s3_root}/nothing has no config\.json"):
        check_model(f"{s3_root}/nothing", storage)
    _upload(storage, f"{s3_root}/weights-only", {"model.safetensors": b"w"})
    with pytest.raises(ModelUnavailableError, match=rf"{s3_root}/weights-only has no config\.json"):
        check_model(f"{s3_root}/weights-only", storage)
    with pytest.raises(ModelUnavailableError, match=rf"{s3_root}/nothing: no files under this URI"):
        local_model(f"{s3_root}/nothing", storage)


def test_s3_access_denied_is_reported(s3_root):
    class DeniedFS:
        def exists(self, path):
            raise PermissionError("Access Denied")

    class DeniedStorage(Storage):
        def fs(self, uri):
            return DeniedFS(), uri[5:]

    with pytest.raises(ModelUnavailableError, match=rf"generate\.llm\.model: access to {s3_root}/m denied"):
        check_model(f"{s3_root}/m", DeniedStorage())


# -------------------------------------------------------------------------------------------------------- hub
class _Hub(BaseHTTPRequestHandler):
    routes: dict[tuple[str, str], tuple[int, dict[str, str], dict | None]] = {}
    seen: list[tuple[str, str, str | None]] = []

    def _answer(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        self.seen.append((self.command, path, self.headers.get("Authorization")))
        status, headers, payload = self.routes.get((self.command, path), (404, {}, None))
        data = json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self):
        self._answer(body=True)

    def do_HEAD(self):
        self._answer(body=False)

    def log_message(self, *args):
        pass


def _point_hub_at(monkeypatch, endpoint: str, cache: Path) -> None:
    """What setting HF_ENDPOINT / HF_HUB_CACHE and unsetting HF_HUB_OFFLINE before start-up does: huggingface_hub
    reads them into constants when imported (conftest has set HF_HUB_OFFLINE=1 for the session by then)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    # Telemetry: huggingface_hub's user agent fetches {ENDPOINT}/api/agent-harnesses once per process and caches it
    # in HF_HOME; neither belongs in these requests or in the home directory.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake hub on 127.0.0.1; set ``hub.routes[(method, path)] = (status, headers, json)``."""
    handler = type("Hub", (_Hub,), {"routes": {}, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    _point_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "hf-cache")
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _cache_config(cache: Path, repo: str, revision: str = "main") -> None:
    """The HF cache's layout: refs/<branch> names a snapshot, which holds the files."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / revision).write_text("0123abcd")
    _model_dir(root / "snapshots" / "0123abcd", {"config.json": b"{}"})


def test_hub_model_found(hub):
    hub.routes[("GET", "/api/models/org/name")] = (200, {}, {"id": "org/name", "gated": False})
    check_model("org/name", Storage())
    assert hub.seen == [("GET", "/api/models/org/name", "Bearer hf_test_token")]  # HF_TOKEN, read by the library


def test_hub_model_not_found(hub):
    hub.routes[("GET", "/api/models/org/typo")] = (404, {"X-Error-Code": "RepoNotFound"}, {"error": "not found"})
    with pytest.raises(ModelUnavailableError, match=r"generate\.llm\.model: 'org/typo' not found .*set HF_TOKEN"):
        check_model("org/typo", Storage())


@pytest.mark.parametrize("status", [401, 403])
def test_hub_model_gated(hub, status):
    hub.routes[("GET", "/api/models/org/gated")] = (status, {"X-Error-Code": "GatedRepo"}, {"error": "gated"})
    with pytest.raises(ModelUnavailableError, match=r"'org/gated' is gated or forbidden.*accept the licence"):
        check_model("org/gated", Storage())


def test_hub_forbidden_without_error_code_is_reported_as_gated(hub):
    hub.routes[("GET", "/api/models/org/gated")] = (403, {}, {"error": "forbidden"})
    with pytest.raises(ModelUnavailableError, match="gated or forbidden.*HF_TOKEN"):
        check_model("org/gated", Storage())


def test_hub_gated_model_checks_file_access(hub):
    """The hub lists a gated repo's metadata to anyone; only its files tell whether the token was granted access."""
    hub.routes[("GET", "/api/models/org/gated")] = (200, {}, {"id": "org/gated", "gated": "manual"})
    hub.routes[("HEAD", "/org/gated/resolve/main/config.json")] = (401, {"X-Error-Code": "GatedRepo"}, None)
    with pytest.raises(ModelUnavailableError, match="'org/gated' is gated or forbidden"):
        check_model("org/gated", Storage())
    hub.routes[("HEAD", "/org/gated/resolve/main/config.json")] = (
        200,
        {"ETag": '"abc"', "X-Repo-Commit": "0" * 40},
        None,
    )
    check_model("org/gated", Storage())


def test_hub_revision_not_found(hub):
    hub.routes[("GET", "/api/models/org/name/revision/v9")] = (404, {"X-Error-Code": "RevisionNotFound"}, None)
    with pytest.raises(ModelUnavailableError, match="revision 'v9' of 'org/name' not found"):
        check_model("org/name", Storage(), revision="v9")


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("down", ["connection_refused", "offline", "server_error"])
def test_hub_unreachable_uses_the_local_cache(hub, monkeypatch, tmp_path, down):
    from huggingface_hub import constants

    if down == "connection_refused":
        _point_hub_at(monkeypatch, f"http://127.0.0.1:{_refused_port()}", tmp_path / "hf-cache")
    elif down == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        hub.routes[("GET", "/api/models/org/name")] = (503, {}, {"error": "overloaded"})
    with pytest.raises(
        ModelUnavailableError, match=r"'org/name' is not in the local Hugging Face cache and the hub is unreachable"
    ):
        check_model("org/name", Storage())
    _cache_config(tmp_path / "hf-cache", "org/name")
    check_model("org/name", Storage())
    if down == "offline":
        assert hub.seen == []  # offline means no request at all
