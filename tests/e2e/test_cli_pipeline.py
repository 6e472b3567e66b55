"""The CLI end to end: `pcd-ray pipeline` on jobs/local.yaml with artifacts in an s3:// bucket, then `pcd-ray demo`
resuming it (every stage up to date) and printing the base-vs-finetuned table; then a researcher's iteration:
`pcd-ray generate ... generate.seed=7`, `pcd-ray status` naming what it made stale, and the pipeline re-running
exactly train and eval.

The CLI runs as a separate process that joins the test session's Ray, as it would join a cluster under
`ray job submit`; sizes are shrunk with overrides so the whole chain takes about two minutes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pcd_ray import artifacts
from pcd_ray.config import StorageConfig
from pcd_ray.storage import Storage, join

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

TINY = [
    "data.synthetic.num_train=240",
    "data.synthetic.num_test=90",
    "data.synthetic.image_size=32",
    "pairs.num_pairs=400",
    "base_train.model.name=pcd-micro",
    "base_train.epochs=1",
    "base_train.batch_size=32",
    "base_train.scaling.cpus_per_worker=1",
    "train.batch_size=32",
    "train.max_steps=4",
    "train.scaling.cpus_per_worker=1",
    "eval.seeds=[0, 1]",
    "eval.pairs_per_attribute=30",
]


def _cli(args: list[str], ray_address: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    out = subprocess.run(
        [sys.executable, "-m", "pcd_ray", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, f"pcd-ray {args[0]} failed:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    return out


def test_pipeline_on_s3_then_demo_resumes_and_prints_the_table(ray_local, s3_root):
    address = ray_local.get_runtime_context().gcs_address
    root = f"{s3_root}/run"
    out = _cli(["pipeline", "--config", "jobs/local.yaml", f"storage.root={root}", *TINY], address)
    ran = re.compile(r"^== (\w+): .*; ran in [0-9.]+ s$", re.M)  # a line over 120 columns goes on, indented by 4
    assert set(ran.findall(out.stdout.replace("\n    ", " "))) >= {
        "data",
        "pairs",
        "generate",
        "comparatives",
        "base_train",
        "train",
        "eval",
    }, out.stdout[-3000:]

    storage = Storage(StorageConfig(root=root))
    assert artifacts.read_manifest(storage, "images", "images")["num_rows"] == 330
    pairs = artifacts.read_manifest(storage, "pairs", "pairs")["num_rows"]
    kept = artifacts.read_manifest(storage, "diffs", "diffs")["num_rows"]
    rejected = artifacts.read_manifest(storage, "rejects", "rejects")["num_rows"]
    assert pairs == 400 and kept + rejected == pairs and kept > 300
    for export in ("base/export", "train/export"):
        assert storage.exists(join(export, "open_clip_model.safetensors"))
        assert storage.exists(join(export, "open_clip_config.json"))
    report = storage.read_json("eval/report.json")
    assert list(report["models"]) == ["base", "finetuned"]
    assert storage.exists("eval/report.md") and storage.read_bytes("eval/report.png")[:4] == b"\x89PNG"
    assert storage.exists("train/metrics.csv") and storage.exists("job.yaml")

    demo = _cli(["demo", f"storage.root={root}", *TINY], address)
    assert "Difference accuracy, hard pairs" in demo.stdout and "Zero-shot classification" in demo.stdout
    assert "finetuned" in demo.stdout and "easy pairs (" not in demo.stdout and "The whole report" in demo.stdout
    assert max(map(len, demo.stdout.splitlines())) <= 120
    for stage in ("data", "pairs", "generate", "comparatives", "base_train", "embed", "train", "eval"):
        assert f"== {stage}: up to date, skipped" in demo.stdout
    assert report["data"]["comparatives"]["commit"] == artifacts.read_manifest(storage, "comparatives")["attempt"]
    assert "Comparatives: " in demo.stdout

    seven = [f"storage.root={root}", *TINY, "generate.seed=7"]
    _cli(["generate", "--config", "jobs/local.yaml", *seven], address)
    status = _cli(["status", "--config", "jobs/local.yaml", *seven], address).stdout
    assert re.search(r"^generate\s+up to date", status, re.M), status
    assert re.search(r"^train\s+stale: input diffs changed", status, re.M), status
    assert re.search(r"^eval\s+stale: train runs first", status, re.M), status
    assert "pipeline would run: train, eval" in status
    again = _cli(["pipeline", "--config", "jobs/local.yaml", *seven], address).stdout
    for stage in ("data", "pairs", "generate", "comparatives", "base_train", "embed"):
        assert f"== {stage}: up to date, skipped" in again, again[-3000:]
    assert set(ran.findall(again.replace("\n    ", " "))) == {"train", "eval"}, again[-3000:]
