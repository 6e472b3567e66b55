"""Exactly-once resume of the generate stage: a re-run skips committed pairs, never duplicates one, ignores and
deletes shards a killed run left uncommitted, and starts over when the settings that shape the text change.

The last test kills a real `pcd-ray generate` process (SIGKILL, part-way) and re-runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from pcd_ray import artifacts
from pcd_ray.config import JobConfig
from pcd_ray.data.pairs import sample_pairs
from pcd_ray.data.synthetic import make_images
from pcd_ray.generate.job import run_generate
from pcd_ray.storage import Storage, join

REPO = Path(__file__).resolve().parents[2]


def _job(root: str, **generate) -> JobConfig:
    return JobConfig.model_validate(
        {
            "storage": {"root": root},
            "data": {"synthetic": {"num_train": 120, "num_test": 10, "image_size": 32, "seed": 3}},
            "pairs": {"num_pairs": 900, "seed": 0},
            "generate": {"batch_size": 50, "commit_every_s": 0, **generate},
        }
    )


def _ids(storage: Storage) -> Counter:
    ids: Counter = Counter()
    for uri, kind in (("diffs", "diffs"), ("rejects", "rejects")):
        ids.update(artifacts.read_table(storage, uri, kind, columns=["pair_id"])["pair_id"].to_pylist())
    return ids


def _pair_ids(storage: Storage) -> set[str]:
    return set(artifacts.read_table(storage, "pairs", "pairs", columns=["pair_id"])["pair_id"].to_pylist())


@pytest.fixture(scope="module")
def pairs_root(ray_local, tmp_path_factory):
    """images + pairs made once; each test copies the pairs artifact into its own root."""
    root = str(tmp_path_factory.mktemp("pairs") / "run")
    job = _job(root)
    storage = Storage(job.storage)
    make_images(job, storage)
    sample_pairs(job, storage)
    return root


def _fresh(pairs_root: str, tmp_path, **generate) -> tuple[JobConfig, Storage]:
    import shutil

    root = str(tmp_path / "run")
    shutil.copytree(Path(pairs_root) / "pairs", Path(root) / "pairs")
    job = _job(root, **generate)
    return job, Storage(job.storage)


def test_rerun_skips_everything_committed(pairs_root, tmp_path):
    job, storage = _fresh(pairs_root, tmp_path)
    first = run_generate(job, storage)
    assert first["complete"] and first["processed"] == first["pairs_in"] == 900 and first["skipped"] == 0
    assert len(artifacts.read_manifest(storage, "diffs")["files"]) > 1  # committed shard by shard
    again = run_generate(job, storage)
    assert again["resumed"] and again["skipped"] == 900 and again["processed"] == 0
    assert (again["written"], again["rejected"], again["rejected_by_reason"]) == (
        first["written"],
        first["rejected"],
        first["rejected_by_reason"],
    )
    ids = _ids(storage)
    assert set(ids) == _pair_ids(storage) and max(ids.values()) == 1
    assert storage.read_json(join("diffs", "_summary.json")) == again


def test_partial_commit_and_orphan_shards_resume_exactly_once(pairs_root, tmp_path):
    """State a kill leaves: manifests listing part of the shards, and shards written but never committed."""
    job, storage = _fresh(pairs_root, tmp_path)
    full = run_generate(job, storage)
    for uri in ("diffs", "rejects"):
        manifest = artifacts.read_manifest(storage, uri)
        keep = manifest["files"][: len(manifest["files"]) // 2]
        manifest.update(files=keep, num_rows=sum(f["rows"] for f in keep), complete=False)
        storage.write_json(join(uri, "_manifest.json"), manifest)
    before = _ids(storage)
    # An uncommitted shard holding rows of committed pairs: must never be read, and is deleted by the re-run.
    orphan = join(storage.resolve("diffs"), "data", "dead-attempt", "part-orphan.parquet")
    dup = artifacts.read_table(storage, "diffs", "diffs")
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(dup, buf)
    storage.write_bytes(orphan, buf.getvalue())

    resumed = run_generate(job, storage)
    assert resumed["resumed"] and resumed["skipped"] == sum(before.values()) > 0
    assert resumed["processed"] == 900 - resumed["skipped"] > 0
    assert not storage.exists(orphan)
    ids = _ids(storage)
    assert set(ids) == _pair_ids(storage) and max(ids.values()) == 1
    # The rule engine is deterministic per pair, so the resumed artifact holds exactly the full run's rows.
    assert (resumed["written"], resumed["rejected_by_reason"]) == (full["written"], full["rejected_by_reason"])


def test_changed_seed_starts_over_and_resume_false_too(pairs_root, tmp_path):
    job, storage = _fresh(pairs_root, tmp_path)
    run_generate(job, storage)
    other = run_generate(job.model_copy(update={"generate": job.generate.model_copy(update={"seed": 1})}), storage)
    assert not other["resumed"] and other["skipped"] == 0 and other["processed"] == 900
    assert artifacts.read_manifest(storage, "diffs")["config"]["seed"] == 1
    # Batch size and actor count do not change the text: resuming across them is allowed.
    bigger = job.generate.model_copy(update={"seed": 1, "batch_size": 300})
    assert run_generate(job.model_copy(update={"generate": bigger}), storage)["skipped"] == 900
    fresh = job.generate.model_copy(update={"seed": 1, "resume": False})
    assert run_generate(job.model_copy(update={"generate": fresh}), storage)["skipped"] == 0
    ids = _ids(storage)
    assert set(ids) == _pair_ids(storage) and max(ids.values()) == 1


def test_duplicate_pair_ids_in_the_input_fail_loudly(ray_local, tmp_path):
    job = _job(str(tmp_path))
    storage = Storage(job.storage)
    attrs = (
        '{"kind": "circle", "colour": "red", "size": "large", "brightness": "bright", "count": 1, "position": "left"}'
    )
    rows = [
        {
            "pair_id": "p-same",
            "image_id_a": "a",
            "image_id_b": "b",
            "caption_a": "x",
            "caption_b": "y",
            "attributes_a": attrs,
            "attributes_b": attrs,
        }
    ] * 2
    artifacts.write_table(pa.Table.from_pylist(rows), storage, "pairs", "pairs")
    with pytest.raises(RuntimeError, match="duplicate pair ids"):
        run_generate(job, storage)


@pytest.mark.integration
def test_killed_generate_process_resumes_with_every_pair_once(ray_local, tmp_path):
    """SIGKILL a real `pcd-ray generate` after its first commit, re-run it, and count every pair id."""
    root = tmp_path / "run"
    job = JobConfig.model_validate(
        {
            "storage": {"root": str(root)},
            "data": {"synthetic": {"num_train": 400, "num_test": 10, "image_size": 32, "seed": 5}},
            "pairs": {"num_pairs": 40000, "seed": 0},
            "generate": {"batch_size": 32, "commit_every_s": 0},
        }
    )
    storage = Storage(job.storage)
    make_images(job, storage)
    sample_pairs(job, storage)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json", exclude={"base_train"})))
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "pcd_ray", "generate", "--config", str(config)]

    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    manifest = storage.resolve(join("diffs", "_manifest.json"))
    deadline = time.time() + 300
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        if storage.exists(manifest):
            m = storage.read_json(manifest)
            committed = m["num_rows"]
            if committed and not m["complete"]:
                break
        time.sleep(0.05)
    assert proc.poll() is None, f"generate ended before it could be killed:\n{proc.stdout.read().decode()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert committed > 0
    killed = storage.read_json(manifest)
    assert not killed["complete"] and killed["num_rows"] < 40000

    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = storage.read_json(join("diffs", "_summary.json"))
    assert summary["complete"] and summary["resumed"] and summary["skipped"] >= committed
    assert summary["skipped"] + summary["processed"] == summary["pairs_in"] == 40000
    ids = _ids(storage)
    assert set(ids) == _pair_ids(storage) and max(ids.values()) == 1 and sum(ids.values()) == 40000
