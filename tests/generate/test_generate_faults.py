"""Engine faults through the real CLI: a fault never becomes a reject, a transient one costs no pair, a persistent
one stops the job with its cause and loses nothing committed, and a killed actor's batch is done again, once.

Each test runs `python -m pcd_ray generate` in its own process, which starts its own local Ray, so the actors
import the failing engines of ``fault_engines.py`` from PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from pcd_ray import artifacts
from pcd_ray.config import JobConfig
from pcd_ray.data.pairs import sample_pairs
from pcd_ray.data.synthetic import make_images
from pcd_ray.storage import Storage

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PAIRS = 240
CLI_ARGS = [
    "data.synthetic.num_train=120",
    "data.synthetic.num_test=10",
    "data.synthetic.image_size=32",
    f"pairs.num_pairs={PAIRS}",
    "generate.engine=fault_engines:FaultyEngine",
    "generate.batch_size=16",
    "generate.num_actors=1",
    "generate.commit_every_s=0",
    "generate.faults.backoff_s=0",
    "generate.faults.batch_attempts=2",
    "generate.faults.actor_restarts=2",
    "generate.faults.batch_retries=2",
]


@pytest.fixture
def pairs_root(tmp_path, ray_local) -> Path:
    """A storage root holding images and pairs (made in this process's Ray; the CLI only generates)."""
    root = tmp_path / "run"
    job = JobConfig.model_validate(
        {
            "storage": {"root": str(root)},
            "data": {"synthetic": {"num_train": 120, "num_test": 10, "image_size": 32, "seed": 3}},
            "pairs": {"num_pairs": PAIRS, "seed": 0},
        }
    )
    storage = Storage(job.storage)
    make_images(job, storage)
    sample_pairs(job, storage)
    return root


def _generate(root: Path, mode: str, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(REPO)]),
        "PCD_FAULT_MODE": mode,
        "PCD_FAULT_DIR": str(root.parent / "fault-state"),
        "PCD_FAULT_TRIES": "2",
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pcd_ray",
            "generate",
            "--config",
            "jobs/local.yaml",
            f"storage.root={root}",
            "ray.num_cpus=4",
            *CLI_ARGS,
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _committed(root: Path) -> tuple[Counter, list[str]]:
    """(how often each pair id is committed across diffs and rejects, the reject reasons)."""
    storage = Storage()
    diffs = artifacts.read_table(storage, str(root / "diffs"), "diffs", columns=["pair_id"])
    rejects = artifacts.read_table(storage, str(root / "rejects"), "rejects", columns=["pair_id", "reason"])
    ids = Counter(diffs.column("pair_id").to_pylist() + rejects.column("pair_id").to_pylist())
    return ids, rejects.column("reason").to_pylist()


def _faults(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "diffs" / "_faults").glob("*.json"))]


def test_transient_faults_lose_no_pair(pairs_root):
    out = _generate(pairs_root, "transient")
    assert out.returncode == 0, out.stderr[-5000:]
    ids, reasons = _committed(pairs_root)
    assert len(ids) == PAIRS and set(ids.values()) == {1}
    assert not [r for r in reasons if "engine" in r or "error" in r]
    faults = _faults(pairs_root)
    # Both kinds happened: faults retried inside the actor, and batches whose tries ran out in one process
    # (a fault marked final: the actor ended its process and Ray sent the batch again).
    assert any(not f["final"] for f in faults) and any(f["final"] for f in faults)
    assert all("simulated" in f["message"] and f["engine"] == "faulty" for f in faults)
    summary = artifacts.read_manifest(Storage(), str(pairs_root / "diffs"))["summary"]
    assert summary["engine_faults"] == len(faults) and summary["complete"] is True


def test_persistent_fault_stops_with_its_cause_and_a_rerun_completes_once(pairs_root):
    out = _generate(pairs_root, "always")
    assert out.returncode != 0
    assert out.returncode == 1, out.stderr[-5000:]
    # One line says it all: the engine, the cause, what to do.
    errors = [line for line in out.stderr.splitlines() if line.startswith("pcd-ray: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    error = errors[0]
    assert error.startswith("pcd-ray: generate: the faulty engine kept failing"), out.stderr[-3000:]
    assert "illegal memory access" in error and "re-run the same command to resume" in error
    ids, reasons = _committed(pairs_root)
    assert not ids and not reasons  # nothing was committed as an engine error
    out = _generate(pairs_root, "none")
    assert out.returncode == 0, out.stderr[-5000:]
    ids, reasons = _committed(pairs_root)
    assert len(ids) == PAIRS and set(ids.values()) == {1}


def test_killed_actor_batch_is_done_again_once(pairs_root):
    out = _generate(pairs_root, "kill")
    assert out.returncode == 0, out.stderr[-5000:]
    assert (pairs_root.parent / "fault-state" / "kill.0").exists()  # the actor really died mid-batch
    ids, reasons = _committed(pairs_root)
    assert len(ids) == PAIRS and set(ids.values()) == {1}
    assert not [r for r in reasons if "engine" in r or "error" in r]


def test_rejects_committed_as_engine_errors_are_generated_again(ray_local, pairs_root):
    """Rejects an older version committed for engine faults (``engine_error: ...``) are taken back on resume."""
    from pcd_ray.generate.job import run_generate

    job = JobConfig.model_validate({"storage": {"root": str(pairs_root)}, "generate": {"batch_size": 32}})
    storage = Storage(job.storage)
    first = run_generate(job, storage)
    # Rewrite the artifacts as an older version would have left them: 10 pairs rejected as engine errors.
    diffs = artifacts.read_table(storage, "diffs", "diffs")
    moved = diffs.slice(0, 10)
    identity = artifacts.read_manifest(storage, "diffs")["identity"]
    rejects = artifacts.read_table(storage, "rejects", "rejects")
    legacy = pa.table(
        {
            "pair_id": moved.column("pair_id"),
            "raw": pa.array([""] * 10),
            "reason": pa.array(["engine_error: OutOfMemoryError"] * 10),
            "engine": moved.column("engine"),
            "prompt_version": moved.column("prompt_version"),
        }
    )
    for uri, kind, table in (
        ("diffs", "diffs", diffs.slice(10)),
        ("rejects", "rejects", pa.concat_tables([rejects.select(legacy.column_names), legacy])),
    ):
        app = artifacts.Appender(
            storage, uri, kind, columns=table.column_names, config={}, identity=identity, resume=False
        )
        app.add(artifacts.put_shard(storage, table, app.staging), table.num_rows)
        app.commit({}, complete=True)
    second = run_generate(job, storage)
    assert second["redone"] == 10 and second["processed"] == 10
    ids, reasons = _committed(pairs_root)
    assert len(ids) == PAIRS and set(ids.values()) == {1}
    assert not [r for r in reasons if r.startswith("engine_error")]
    assert second["written"] == first["written"]
