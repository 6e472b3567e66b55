"""Every stage of the pipeline through `ray job submit --working-dir .` against a local head started with
`ray start --head` (its own temp dir and ports, 127.0.0.1 only), artifacts on s3:// (moto), then the head stopped
by killing only its own processes.

This is the cluster path minus the cloud: the same CLI entry point, the working_dir upload (local environments and
outputs excluded), drivers that join the cluster through RAY_ADDRESS and ask for no CPU or GPU, stages connected
only through artifacts at URIs. Sizes are tiny (tests/e2e/test_cli_pipeline.py's TINY). The stages are the ones
a cluster runs (data, pairs, generate, train, eval); the offline demo's base pretraining (`--section base_train`,
the same run_train path as train) is left out to keep CI time down: train starts from a random pcd-micro instead.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from cluster_helpers import RAY_BIN, LocalHead, local_env, other_ray_processes

from pcd_ray import artifacts
from pcd_ray.config import StorageConfig
from pcd_ray.storage import Storage, join

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]
REPO = Path(__file__).resolve().parents[2]

TINY = [
    "data.synthetic.num_train=240",
    "data.synthetic.num_test=90",
    "data.synthetic.image_size=32",
    "pairs.num_pairs=400",
    "train.batch_size=32",
    "train.max_steps=4",
    "train.scaling.cpus_per_worker=1",
    "eval.seeds=[0, 1]",
    "eval.pairs_per_attribute=30",
    # No base_train stage here: train and eval's baseline start from a random pcd-micro.
    "train.model.checkpoint=null",
    "train.model.name=pcd-micro",
    "train.embeddings=null",
    "eval.models.base.checkpoint=null",
    "eval.models.base.name=pcd-micro",
    "eval.templates=[paper]",
]
# What the job needs besides the working dir: local environments and outputs stay behind (.gitignore covers them
# too, since Ray honours it for working_dir uploads; this also holds for a checkout without it).
RUNTIME_ENV = {
    "excludes": [".venv", ".venv-ci", ".venv-vllm", "runs", ".git", ".hypothesis", ".pytest_cache"],
    "env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"},
}

STAGES = [  # (what the user types after `pcd-ray`, the line its driver prints when done)
    (["data"], None),
    (["pairs"], None),
    (["generate"], None),
    (["train"], "[train] done"),
    (["eval"], "Difference accuracy, hard pairs"),
]


@pytest.fixture
def head(s3_server):
    """A head of our own; the moto endpoint and dummy credentials are in its environment, so drivers inherit them."""
    h = LocalHead(num_cpus=4)
    others = other_ray_processes(h)
    h.start()
    try:
        yield h
    finally:
        h.stop()
        assert not h.leftovers(), f"processes of {h.temp_dir} left: {h.leftovers()}"
        # Only this head's processes were signalled: no other Ray on the machine (the test session's shared one,
        # other users') was touched.
        assert not (h.signalled & others), h.signalled & others


def submit(head: LocalHead, stage_args: list[str], root: str) -> tuple[str, str]:
    submission_id = f"pcd-{stage_args[0]}-{uuid.uuid4().hex[:8]}"
    cmd = [
        str(RAY_BIN),
        "job",
        "submit",
        "--address",
        head.dashboard_url,
        "--submission-id",
        submission_id,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(RUNTIME_ENV),
        "--",
        "pcd-ray",
        *stage_args,
        "--config",
        "jobs/local.yaml",
        f"storage.root={root}",
        *TINY,
    ]
    out = subprocess.run(
        cmd, cwd=REPO, env=local_env(RAY_ADDRESS=head.dashboard_url), capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, (
        f"{shlex.join(cmd[2:])} failed ({out.returncode}):\n{out.stdout[-6000:]}\n{out.stderr[-4000:]}"
    )
    return submission_id, out.stdout


def test_every_stage_through_ray_job_submit(head, s3_root):
    root = f"{s3_root}/run"
    for stage_args, done_line in STAGES:
        t0 = time.perf_counter()
        submission_id, logs = submit(head, stage_args, root)
        print(f"ray job submit -- pcd-ray {' '.join(stage_args)}: {time.perf_counter() - t0:.1f} s")
        assert f"Job '{submission_id}' succeeded" in logs, logs[-3000:]
        if done_line:
            assert done_line in logs, logs[-3000:]
        info = httpx.get(f"{head.dashboard_url}/api/jobs/{submission_id}", timeout=30).json()
        assert info["status"] == "SUCCEEDED" and info["type"] == "SUBMISSION"
        # The driver reserves nothing: GPUs (and CPUs) are for the stage's actors and train workers.
        assert not info.get("entrypoint_num_gpus") and not info.get("entrypoint_num_cpus")
        assert info["runtime_env"]["working_dir"].startswith("gcs://"), "the working dir was not uploaded"

    # The uploaded package, as unpacked on the head, holds the code and job files, not the local environments or
    # outputs.
    unpacked = list(Path(head.temp_dir).glob("session_*/runtime_resources/working_dir_files/*/"))
    assert unpacked, "no working_dir package on the head"
    for pkg in unpacked:
        assert (pkg / "pcd_ray" / "cli.py").is_file() and (pkg / "jobs" / "local.yaml").is_file()
        assert not any((pkg / d).exists() for d in RUNTIME_ENV["excludes"]), sorted(p.name for p in pkg.iterdir())

    storage = Storage(StorageConfig(root=root))
    assert artifacts.read_manifest(storage, "images", "images")["num_rows"] == 330
    pairs = artifacts.read_manifest(storage, "pairs", "pairs")["num_rows"]
    kept = artifacts.read_manifest(storage, "diffs", "diffs")["num_rows"]
    rejected = artifacts.read_manifest(storage, "rejects", "rejects")["num_rows"]
    assert pairs == 400 and kept + rejected == pairs and kept > 300
    assert storage.exists(join("train/export", "open_clip_model.safetensors"))
    assert storage.exists(join("train/export", "open_clip_config.json"))
    report = storage.read_json("eval/report.json")
    assert list(report["models"]) == ["base", "finetuned"]
    assert storage.exists("eval/report.md") and storage.read_bytes("eval/report.png")[:4] == b"\x89PNG"
