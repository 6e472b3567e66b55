"""Storage and artifacts: local and s3:// (moto on 127.0.0.1) through the same calls; commits are atomic."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pcd_ray import artifacts
from pcd_ray.config import StorageConfig
from pcd_ray.storage import Storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, s3_root):
    root = str(tmp_path / "root") if request.param == "local" else s3_root
    return Storage(StorageConfig(root=root))


def _pairs_table(n: int) -> pa.Table:
    return pa.table(
        {
            "pair_id": [f"p{i}" for i in range(n)],
            "image_id_a": ["a"] * n,
            "image_id_b": ["b"] * n,
            "caption_a": ["x"] * n,
            "caption_b": ["y"] * n,
        }
    )


def test_resolve_relative_and_absolute(tmp_path):
    st = Storage(StorageConfig(root="s3://bucket/run"))
    assert st.resolve("images") == "s3://bucket/run/images"
    assert st.resolve("s3://other/x") == "s3://other/x"
    assert st.resolve(str(tmp_path)) == str(tmp_path)
    local = Storage(StorageConfig(root=str(tmp_path)))
    assert local.resolve("train/export") == str(tmp_path / "train" / "export")


def test_bytes_json_round_trip_and_listing(storage):
    storage.write_bytes("a/b.bin", b"\x00\x01")
    storage.write_json("a/c.json", {"k": [1, 2]})
    assert storage.read_bytes("a/b.bin") == b"\x00\x01"
    assert storage.read_json("a/c.json") == {"k": [1, 2]}
    assert [u.rsplit("/", 1)[-1] for u in storage.listdir("a")] == ["b.bin", "c.json"]
    assert storage.exists("a/b.bin") and not storage.exists("a/zzz")
    storage.rm("a")
    assert not storage.exists("a/b.bin")


def test_local_write_leaves_no_temp_files(tmp_path):
    st = Storage(StorageConfig(root=str(tmp_path)))
    for i in range(3):
        st.write_text("f.txt", f"v{i}")
    assert st.read_text("f.txt") == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_put_dir_and_local_dir_round_trip(storage, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(b"weights")
    (src / "sub" / "c.json").write_text("{}")
    storage.put_dir(src, "export")
    storage.put_dir(src, "export")  # replacing an existing directory works too
    with storage.local_dir("export") as d:
        assert (d / "w.bin").read_bytes() == b"weights"
        assert (d / "sub" / "c.json").read_text() == "{}"


def test_artifact_commit_read_and_replace(storage):
    m1 = artifacts.write_table(_pairs_table(5), storage, "pairs", "pairs", config={"seed": 1}, summary={"n": 5})
    assert m1["num_rows"] == 5 and m1["config"] == {"seed": 1}
    assert artifacts.read_table(storage, "pairs", "pairs").num_rows == 5
    m2 = artifacts.write_table(_pairs_table(7), storage, "pairs", "pairs")
    assert artifacts.read_table(storage, "pairs", "pairs").num_rows == 7
    # The replaced attempt is gone; only the committed one remains.
    assert [u.rsplit("/", 1)[-1] for u in storage.listdir("pairs/data")] == [m2["attempt"]]


def test_uncommitted_shards_are_invisible(storage):
    artifacts.write_table(_pairs_table(3), storage, "pairs", "pairs")
    # A writer that died after writing a shard but before committing its manifest:
    buf = pa.BufferOutputStream()
    import pyarrow.parquet as pq

    pq.write_table(_pairs_table(100), buf)
    storage.write_bytes("pairs/data/20990101-dead/part-0.parquet", buf.getvalue().to_pybytes())
    assert artifacts.read_table(storage, "pairs", "pairs").num_rows == 3


def test_missing_artifact_and_wrong_kind_and_missing_columns(storage):
    with pytest.raises(artifacts.ArtifactError, match="no committed artifact"):
        artifacts.read_table(storage, "nothing", "pairs")
    artifacts.write_table(_pairs_table(2), storage, "pairs", "pairs")
    with pytest.raises(artifacts.ArtifactError, match="expected a 'diffs' artifact, found 'pairs'"):
        artifacts.read_table(storage, "pairs", "diffs")
    with pytest.raises(artifacts.ArtifactError, match=r"lacks required columns \['caption_b'\]"):
        artifacts.write_table(_pairs_table(2).drop(["caption_b"]), storage, "bad", "pairs")


def test_ray_dataset_round_trip(storage, ray_local):
    import ray.data

    ds = ray.data.from_arrow(_pairs_table(50)).repartition(3)
    manifest = artifacts.write_dataset(ds, storage, "pairs", "pairs", config={"x": 1})
    assert manifest["num_rows"] == 50 and len(manifest["files"]) >= 1
    back = artifacts.read_dataset(storage, "pairs", "pairs")
    assert sorted(r["pair_id"] for r in back.take_all()) == sorted(f"p{i}" for i in range(50))
    on_disk = storage.read_json("pairs/_manifest.json")
    assert json.dumps(on_disk["files"]) == json.dumps(manifest["files"])


def test_storage_pickles_the_resolved_endpoint(s3_server, monkeypatch):
    import pickle

    st = Storage(StorageConfig(root="s3://b/x"))
    blob = pickle.dumps(st)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    # A worker without the driver's environment still talks to the same endpoint.
    assert pickle.loads(blob).s3_options()["client_kwargs"]["endpoint_url"] == s3_server


def test_relative_root_travels_as_an_absolute_path(tmp_path, monkeypatch):
    """Ray workers run in another cwd: a relative root must mean the driver's directory, not theirs."""
    import pickle

    monkeypatch.chdir(tmp_path)
    st = Storage(StorageConfig(root="./runs/local"))
    assert st.portable_cfg().root == str(tmp_path / "runs" / "local")
    blob = pickle.dumps(st)  # in the driver
    monkeypatch.chdir("/")
    worker = pickle.loads(blob)  # in a worker with another cwd
    assert worker.resolve("base/export") == str(tmp_path / "runs" / "local" / "base" / "export")
