"""The streaming sink (pcd_ray/sink.py) on its own, with a toy stage: rows split by their reject code, both
manifests committed (rejects first), exactly-once resume by identity, manifest keys kept on resume and dropped on a
fresh start, the end-of-run count check, progress lines, and reject codes that survive pickling."""

from __future__ import annotations

import logging
import pickle
import sys

import pyarrow as pa
import pytest
from ray import cloudpickle

from pcd_ray import artifacts
from pcd_ray.config import StorageConfig
from pcd_ray.data.images import ImageDecodeError
from pcd_ray.sink import Output, RejectError, Sink
from pcd_ray.storage import Storage, join

KEPT = Output("kept", "toy", ["id", "value"])
REJECTED = Output("rejected", "toy_rejects", ["id", "reason"])
N = 60

# Ray workers cannot import this test module: ship the toy stage's functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _label(batch):
    """The toy stage's rows -> kept (even values) or rejected (odd: reason ``odd``)."""
    values = batch.column("value").to_pylist()
    return batch.append_column("reason", pa.array([None if v % 2 == 0 else "odd" for v in values], pa.string()))


def _count(batch) -> dict:
    return {"values": batch.num_rows, "label": "toy"}


def _sink(storage: Storage, identity="v1", **kw) -> Sink:
    return Sink(
        storage,
        "toy",
        unit="row",
        kept=KEPT,
        rejected=REJECTED,
        config={"c": 1},
        identity=identity,
        key="id",
        commit_every_s=0,
        **{"resume": True, **kw},
    )


def _run(sink: Sink, ds, transform=None) -> dict:
    transform = transform or (lambda rows: rows.map_batches(_label, batch_format="pyarrow", batch_size=7))
    return sink.run(ds, transform, expected=N, stats=_count, summary=lambda t: {"kept": t.kept, "seen": t.stats})


@pytest.fixture
def toy(ray_local, tmp_path):
    import ray.data

    storage = Storage(StorageConfig(root=str(tmp_path)))
    ds = ray.data.from_items([{"id": f"r-{k}", "value": k} for k in range(N)], override_num_blocks=4)
    return storage, ds


def _ids(storage: Storage) -> list[str]:
    return sorted(
        artifacts.read_table(storage, "kept", "toy")["id"].to_pylist()
        + artifacts.read_table(storage, "rejected", "toy_rejects")["id"].to_pylist()
    )


def test_rows_split_by_reason_and_both_manifests_commit_rejects_first(toy, monkeypatch):
    storage, ds = toy
    order = []
    real_commit = artifacts.Appender.commit
    monkeypatch.setattr(
        artifacts.Appender, "commit", lambda self, *a, **k: (order.append(self.kind), real_commit(self, *a, **k))[1]
    )
    summary = _run(_sink(storage), ds)
    assert order and order[::2] == ["toy_rejects"] * (len(order) // 2) and order[1::2] == ["toy"] * (len(order) // 2)
    assert summary["kept"] == N // 2 and summary["rejected"] == N // 2 and summary["rejected_by_reason"] == {"odd": 30}
    assert summary["complete"] and summary["processed"] == N and summary["skipped"] == 0 and not summary["resumed"]
    assert summary["seen"] == {"values": N, "label": ["toy"]}
    assert _ids(storage) == sorted(f"r-{k}" for k in range(N))
    for out in (KEPT, REJECTED):
        manifest = artifacts.read_manifest(storage, out.uri, out.kind)
        assert manifest["summary"] == summary and manifest["complete"] and manifest["identity"] == "v1"
        assert manifest["columns"] == out.columns and manifest["config"] == {"c": 1}


def test_resume_keeps_unknown_manifest_keys_and_a_fresh_start_drops_them(toy):
    storage, ds = toy
    _run(_sink(storage), ds)
    for out in (KEPT, REJECTED):  # what the pipeline stamps into a finished stage's outputs
        manifest = artifacts.read_manifest(storage, out.uri)
        storage.write_json(artifacts.manifest_uri(storage, out.uri), {**manifest, "provenance": {"stage": "toy"}})

    again = _run(_sink(storage), ds)
    assert again["resumed"] and again["skipped"] == N and again["processed"] == 0
    assert again["rejected_by_reason"] == {"odd": 30}  # from the committed rejects, not this run
    assert artifacts.read_manifest(storage, "kept")["provenance"] == {"stage": "toy"}

    other = _run(_sink(storage, identity="v2"), ds)
    assert not other["resumed"] and other["processed"] == N
    for out in (KEPT, REJECTED):
        manifest = artifacts.read_manifest(storage, out.uri)
        assert "provenance" not in manifest and manifest["identity"] == "v2"
    assert _run(_sink(storage, identity="v2", resume=False), ds)["skipped"] == 0
    assert _ids(storage) == sorted(f"r-{k}" for k in range(N))


def test_partial_commit_resumes_exactly_once(toy):
    """What a kill leaves: manifests listing part of the shards. The re-run does only the rest."""
    storage, ds = toy
    _run(_sink(storage), ds)
    for out in (KEPT, REJECTED):
        manifest = artifacts.read_manifest(storage, out.uri)
        keep = manifest["files"][:1]
        manifest.update(files=keep, num_rows=sum(f["rows"] for f in keep), complete=False)
        storage.write_json(join(out.uri, "_manifest.json"), manifest)
    resumed = _run(_sink(storage), ds)
    assert resumed["resumed"] and 0 < resumed["skipped"] < N and resumed["processed"] == N - resumed["skipped"]
    assert _ids(storage) == sorted(f"r-{k}" for k in range(N))


def test_lost_rows_fail_the_count_check_and_leave_the_artifacts_incomplete(toy):
    storage, ds = toy
    lossy = lambda rows: rows.filter(lambda r: r["value"] != 3).map_batches(_label, batch_format="pyarrow")  # noqa
    with pytest.raises(RuntimeError, match=r"toy: 30 toy \+ 29 toy_rejects rows != 60 input rows"):
        _run(_sink(storage), ds, lossy)
    assert not artifacts.read_manifest(storage, "kept")["complete"]
    assert artifacts.read_manifest(storage, "kept")["num_rows"] == 30  # kept what was made, for a resume


def test_progress_logs_without_a_terminal(toy, monkeypatch, caplog):
    import pcd_ray.sink

    storage, ds = toy
    monkeypatch.setattr(pcd_ray.sink, "LOG_EVERY_S", 0.0)
    with caplog.at_level("INFO", logger="pcd_ray.sink"):
        _run(_sink(storage), ds)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("toy: ") and f"/{N} (" in m and "kept" in m and "rows/s" in m for m in lines)


def test_reject_codes_are_values_that_survive_pickling():
    e = pickle.loads(pickle.dumps(RejectError("caption_too_long", "2000 characters")))
    assert (e.reason, e.detail, str(e)) == ("caption_too_long", "2000 characters", "2000 characters")
    big = pickle.loads(pickle.dumps(ImageDecodeError("image is 9x9, over the limit", "image_too_large")))
    assert isinstance(big, ValueError) and (big.reason, str(big)) == ("image_too_large", "image is 9x9, over the limit")
    assert ImageDecodeError("not a decodable image").reason == "corrupt_image"
