"""`pcd-ray doctor`: the check logic on injected facts, and the real command on this CPU machine.

Pure checks get their facts as arguments (a driver version, vLLM's requirements, a toolchain), so each verdict is
tested without the hardware it is about. The end-to-end runs use the real environment: the local job must pass
here, the paper's GPU job must fail on every stage that asks for GPUs, and storage is probed for real (a tmp dir,
the session's moto S3, a closed port).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from pcd_ray.cli import main
from pcd_ray.config import StorageConfig, load_job
from pcd_ray.doctor import FAIL, OK, SKIP, WARN, Row, format_rows, gpu, ops, packages, resources, storage
from pcd_ray.doctor.rows import quiet
from pcd_ray.train.engine import deepspeed_config

REPO = Path(__file__).resolve().parents[2]
S3_BUCKET = "pcd-test"


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch):
    # A developer's RAY_ADDRESS would make every run here judge against their cluster.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_here() -> bool:
    import torch

    return torch.cuda.is_available() or shutil.which("nvidia-smi") is not None


def _row(rows: list[dict], check: str) -> dict:
    return next(r for r in rows if r["check"] == check)


# ------------------------------------------------------------------------------------------- packages and vLLM
def test_python_outside_requires_python_fails():
    assert packages.python_row("3.11.7", ">=3.11,<3.13").verdict == OK
    row = packages.python_row("3.10.14", ">=3.11,<3.13")
    assert row.verdict == FAIL and ">=3.11,<3.13" in row.detail and row.fix


def test_packages_against_pins_only_the_extras_the_job_needs():
    reqs = ["torch==2.14.0", "deepspeed<0.19.8,>=0.19.0", 'vllm==0.33.0; extra == "gpu"', 'pytest>=8; extra == "dev"']
    installed = {"torch": "2.14.0+cu130", "deepspeed": "0.19.7"}.get
    assert packages.packages_row("0.1.0", reqs, (), installed).verdict == OK  # vllm and pytest not needed

    row = packages.packages_row("0.1.0", reqs, ("gpu",), installed)
    assert row.verdict == FAIL
    assert "vllm missing (needs ==0.33.0) [gpu extra]" in row.detail and "pytest" not in row.detail
    assert "pip install -e '.[gpu]'" in row.fix and "cluster/requirements-gpu.txt" in row.fix

    row = packages.packages_row("0.1.0", reqs, (), {"torch": "2.13.0", "deepspeed": "0.19.8"}.get)
    assert row.verdict == FAIL
    assert "torch 2.13.0 (needs ==2.14.0)" in row.detail and "deepspeed 0.19.8" in row.detail
    assert row.fix.startswith("pip install -e .")


def test_vllm_torch_pin_mismatch_fails():
    row = packages.vllm_row("vllm", "0.33.0", ["torch==2.13.0", 'pytest; extra == "test"'], "2.14.0", None)
    assert row.verdict == FAIL
    assert "torch==2.13.0" in row.detail and "2.14.0" in row.detail and "'.[gpu]'" in row.fix


def test_vllm_pin_ignores_local_build_label_and_is_skipped_unless_needed():
    assert packages.vllm_row("vllm", "0.33.0", ["torch==2.14.0"], "2.14.0+cu130", None).verdict == OK
    row = packages.vllm_row("vllm", "0.33.0", ["torch==2.14.0"], "2.14.0", "ImportError: libcudart.so.13")
    assert row.verdict == FAIL and "libcudart" in row.detail
    missing = packages.vllm_row("vllm", None, [], "2.14.0", None)
    assert missing.verdict == FAIL and "not installed" in missing.detail
    assert packages.vllm_row("rule", None, [], "2.14.0", None) == Row("vllm", SKIP, "not needed: generate.engine=rule")


# --------------------------------------------------------------------------------------------------- GPU stack
def test_driver_too_old_for_cuda13_fails_with_fix():
    facts = gpu.GpuFacts(
        torch_version="2.14.0+cu130",
        torch_cuda="13.0",
        nvidia_smi="/usr/bin/nvidia-smi",
        driver="570.133.20",
        cuda_warning="The NVIDIA driver on your system is too old",
    )
    row = gpu.gpu_row(facts, needed=True, why="")
    assert row.verdict == FAIL
    assert "570.133.20" in row.detail and "580.65.06" in row.detail and "CUDA 13" in row.detail
    assert "580.65.06" in row.fix
    # A job that asks for no GPU is only warned.
    assert gpu.gpu_row(facts, needed=False, why="no stage asks for GPUs").verdict == WARN


def test_driver_at_the_minimum_passes_and_no_gpu_is_skipped():
    ok = gpu.GpuFacts(
        torch_version="2.14.0+cu130",
        torch_cuda="13.0",
        cuda_available=True,
        device_count=8,
        nvidia_smi="/usr/bin/nvidia-smi",
        driver="580.65.06",
        nccl="2.27.7",
    )
    assert gpu.gpu_row(ok, True, "").verdict == OK
    assert gpu.nccl_row(ok, True, "").detail == "NCCL 2.27.7 (torch's)"
    cuda12 = gpu.GpuFacts(torch_cuda="12.8", cuda_available=True, nvidia_smi="nvidia-smi", driver="525.60.12")
    assert gpu.gpu_row(cuda12, True, "").verdict == FAIL
    none = gpu.GpuFacts(torch_version="2.14.0+cu130", torch_cuda="13.0")
    assert gpu.gpu_row(none, True, "").verdict == SKIP and gpu.nccl_row(none, True, "").verdict == SKIP


def test_cpu_torch_on_a_gpu_machine_fails():
    facts = gpu.GpuFacts(torch_version="2.14.0+cpu", torch_cuda=None, nvidia_smi="nvidia-smi", driver="580.95.05")
    row = gpu.gpu_row(facts, True, "")
    assert row.verdict == FAIL and "CPU build" in row.detail


# ------------------------------------------------------------------------------------------------ DeepSpeed ops
TOOLS = ops.Toolchain(deepspeed="0.19.7", cxx="/usr/bin/c++", ninja=True, nvcc="13.0", torch_cuda="13.0")
FUSED_ADAM = ops.OpFacts(implemented=True, compatible=True, cuda=True, build_var="DS_BUILD_FUSED_ADAM")


def _needs(overrides: list[str], section: str = "train"):
    cfg = getattr(load_job("local", overrides), section)
    ds = deepspeed_config(cfg, micro_batch=1, use_gpu=cfg.scaling.use_gpu)
    return ops.needed_ops(section, ds, cfg.scaling.use_gpu)


def test_default_gpu_config_needs_no_op():
    assert _needs(["train.scaling.use_gpu=true"]) == ([], None)
    assert _needs(["train.scaling.use_gpu=true", "train.deepspeed.offload_optimizer=true"]) == ([], None)
    job = load_job("train-paper-vitl14")
    [row] = ops.check(job)
    assert row.verdict == OK and row.detail.startswith("none needed: train (GPU workers)")


def test_gpu_optimizer_override_without_nvcc_fails():
    needs, refusal = _needs(["train.scaling.use_gpu=true", "train.deepspeed.overrides={optimizer: {type: Adam}}"])
    assert refusal is None
    [need] = needs
    assert (need.op, need.builder, need.device) == ("fused_adam", "FusedAdamBuilder", "cuda")
    no_nvcc = ops.Toolchain(
        deepspeed="0.19.7",
        cxx="/usr/bin/c++",
        ninja=True,
        nvcc=None,
        nvcc_error="CUDA_HOME does not exist",
        torch_cuda="13.0",
    )
    [row] = ops.rows_for([("train", True, needs, None)], {("fused_adam", "cuda"): FUSED_ADAM}, no_nvcc)
    assert row.verdict == FAIL and "no nvcc" in row.detail
    assert "drop `optimizer` from train.deepspeed.overrides" in row.fix
    assert "DS_BUILD_FUSED_ADAM=1 pip install" in row.fix
    # nvcc of another CUDA major is refused too; the same major builds; a prebuilt op needs nothing.
    cuda12 = ops.Toolchain(deepspeed="0.19.7", cxx="/usr/bin/c++", ninja=True, nvcc="12.8", torch_cuda="13.0")
    assert ops.op_row(need, ["train"], FUSED_ADAM, cuda12).verdict == FAIL
    assert ops.op_row(need, ["train"], FUSED_ADAM, TOOLS).verdict == OK
    prebuilt = ops.OpFacts(implemented=True, prebuilt=True, cuda=True)
    assert ops.op_row(need, ["train"], prebuilt, no_nvcc).verdict == OK


def test_offload_and_cpu_workers_ops():
    gpu_offload = ["train.scaling.use_gpu=true", "train.deepspeed.offload_optimizer=true"]
    [need], _ = _needs(gpu_offload + ["train.deepspeed.overrides={optimizer: {type: AdamW}}"])
    assert (need.op, need.builder) == ("cpu_adam", "CPUAdamBuilder")
    needs, refusal = _needs(gpu_offload + ["train.deepspeed.overrides={zero_force_ds_cpu_optimizer: true}"])
    assert needs == [] and "zero_force_ds_cpu_optimizer" in refusal
    [refused] = ops.rows_for([("train", True, needs, refusal)], {}, None)
    assert refused.verdict == FAIL and "train.deepspeed.overrides" in refused.fix

    # CPU workers load the shared-memory collectives: one row for both sections; DeepSpeed falls back to
    # torch.distributed where the builder is not compatible, but a compatible one without a compiler breaks.
    cpu = [(s, False, *_needs([], s)) for s in ("base_train", "train")]
    shm = ops.OpFacts(implemented=True, compatible=True, build_var="DS_BUILD_SHM_COMM")
    [row] = ops.rows_for(cpu, {("deepspeed_shm_comm", "cpu"): shm}, TOOLS)
    assert row.verdict == OK and "deepspeed_shm_comm for base_train, train" in row.detail
    no_cxx = ops.Toolchain(deepspeed="0.19.7", cxx=None, ninja=False)
    [row] = ops.rows_for(cpu, {("deepspeed_shm_comm", "cpu"): shm}, no_cxx)
    assert row.verdict == FAIL and "no C++ compiler" in row.detail and "no ninja" in row.detail
    incompatible = ops.OpFacts(implemented=True, compatible=False)
    [row] = ops.rows_for(cpu, {("deepspeed_shm_comm", "cpu"): incompatible}, no_cxx)
    assert row.verdict == OK and "torch.distributed" in row.detail


# -------------------------------------------------------------------------------------------- cluster resources
def _train(workers: int, gpu: bool = True, cpus: float = 10) -> resources.Request:
    return resources.Request(
        "train",
        workers,
        "worker",
        resources._bundle(1 if gpu else 0, cpus),
        "train.scaling.num_workers",
        "train.scaling.use_gpu",
        "train.scaling.cpus_per_worker",
        "train.scaling.use_gpu=false",
    )


def test_stage_requests_reuse_the_stages_own_resources():
    reqs = {r.stage: r for r in resources.stage_requests(load_job("train-paper-vitl14"))}
    assert (reqs["generate"].count, reqs["generate"].bundle) == (8, {"GPU": 1, "CPU": 4})
    assert (reqs["embed"].count, reqs["embed"].bundle) == (4, {"GPU": 1, "CPU": 4})
    assert (reqs["train"].count, reqs["train"].bundle) == (8, {"GPU": 1, "CPU": 10})
    assert (reqs["eval"].count, reqs["eval"].bundle) == (2, {"GPU": 1, "CPU": 1})
    assert reqs["serve"].bundle == {"CPU": 1} and "base_train" not in reqs
    local = {r.stage for r in resources.stage_requests(load_job("local"))}
    assert local == {"generate", "embed", "base_train", "train", "eval", "serve"}
    assert resources.needs_gpus(resources.stage_requests(load_job("local"))) == []


def test_gpu_stage_against_clusters():
    local = resources.local_cluster(None, 2, 0)
    row = resources.stage_row(_train(8), local)
    assert row.verdict == FAIL
    assert row.detail == "train: 8 workers x {GPU: 1, CPU: 10}; the cluster has 0 GPUs (local machine)"
    assert row.fix == "run on a GPU cluster (docs/CLUSTER.md) or set train.scaling.use_gpu=false"

    four = resources.Cluster("cluster at auto", [{"CPU": 16, "GPU": 0}, {"CPU": 48, "GPU": 4}])
    row = resources.stage_row(_train(8), four)
    assert row.verdict == FAIL and "8 GPUs at once; the cluster has 4 GPUs" in row.detail
    assert "lower train.scaling.num_workers to 4" in row.fix
    two_gpu_actor = resources.Request(
        "embed",
        1,
        "actor",
        {"GPU": 2, "CPU": 4},
        "embed.num_actors",
        "embed.num_gpus_per_actor",
        "embed.num_cpus_per_actor",
        "x",
    )
    ones = resources.Cluster("cluster at auto", [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}])
    row = resources.stage_row(two_gpu_actor, ones)
    assert row.verdict == FAIL and "no node has 2 GPUs" in row.detail and "embed.num_gpus_per_actor" in row.fix
    cramped = resources.Cluster("cluster at auto", [{"CPU": 8, "GPU": 8}])
    row = resources.stage_row(_train(8), cramped)
    assert row.verdict == FAIL and "no node has {GPU: 1, CPU: 10}" in row.detail

    # An autoscaler that may add one 8-GPU training node fits the 8 workers; CPU-only shortfalls there are warnings.
    scaling = resources.Cluster(
        "cluster at auto",
        [{"CPU": 8}],
        [resources.NodeType("head", {"CPU": 8}, 1, 1), resources.NodeType("gpu_train", {"CPU": 96, "GPU": 8}, 0, 1)],
    )
    assert resources.stage_row(_train(8), scaling).verdict == OK
    assert resources.stage_row(_train(20, gpu=False, cpus=8), scaling).verdict == WARN
    assert resources.stage_row(_train(3, gpu=False, cpus=2), local).verdict == FAIL  # 6 CPUs on 2


def test_autoscaler_node_types_from_rays_cluster_config():
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.name, group.min_count, group.max_count = "gpu_gen", 0, 4
    group.resources["GPU"], group.resources["CPU"] = 1, 8
    config.max_resources["GPU"] = 2
    types, caps = resources.node_types_from_config(config)
    assert types == [resources.NodeType("gpu_gen", {"GPU": 1.0, "CPU": 8.0}, 0, 4)] and caps == {"GPU": 2.0}
    cluster = resources.Cluster("cluster at auto", [], types, caps)
    assert cluster.autoscaling and cluster.total("GPU") == 2  # 4 nodes x 1 GPU, capped at 2


@pytest.mark.parametrize("launcher", ["aws.yaml", "gcp.yaml"])
def test_shipped_launcher_node_types_fit_every_shipped_job(launcher):
    raw = yaml.safe_load((REPO / "cluster" / launcher).read_text())
    types = resources.node_types_from_launcher(raw)
    head = next(t for t in types if t.name == raw["head_node_type"])
    assert (head.min_count, head.max_count) == (1, 1)
    cluster = resources.Cluster("cluster at auto", [head.resources], types)
    for job_file in sorted((REPO / "jobs").glob("*.yaml")):
        for req in resources.stage_requests(load_job(str(job_file))):
            row = resources.stage_row(req, cluster)
            assert row.verdict == OK, (job_file.name, row)


def test_autoscaler_types_fall_back_to_the_launcher_bootstrap_config(tmp_path):
    # No Ray connection here, so the GCS has nothing to say and the head's bootstrap file is read.
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(
        yaml.safe_dump(
            {
                "max_workers": 4,
                "head_node_type": "head",
                "available_node_types": {
                    "head": {"resources": {"CPU": 0}},
                    "gpu": {"resources": {"CPU": 12, "GPU": 4}},
                },
            }
        )
    )
    types, caps, note = resources._autoscaler(bootstrap)
    assert resources.NodeType("gpu", {"CPU": 12, "GPU": 4}, 0, 4) in types and caps == {}
    assert str(bootstrap) in note
    types, _, note = resources._autoscaler(tmp_path / "absent.yaml")
    assert types == [] and "judged against the live nodes only" in note


def test_unreachable_cluster_fails_fast_without_judging_stages():
    job = load_job("local", [f"ray.address=127.0.0.1:{_closed_port()}"])
    t0 = time.time()
    rows = resources.check(job, resources.stage_requests(job), 0)
    assert time.time() - t0 < 10
    assert rows[0].verdict == FAIL and rows[0].check == "cluster" and "ray.address" in rows[0].fix
    assert {r.verdict for r in rows[1:]} == {SKIP}


# ------------------------------------------------------------------------------------------------------ storage
def test_local_storage_probe_leaves_nothing(tmp_path):
    root = tmp_path / "new" / "run"
    [row] = storage.check(StorageConfig(root=str(root)))
    assert row.verdict == OK and not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    [row] = storage.check(StorageConfig(root=str(tmp_path / "file" / "run")))
    assert row.verdict == FAIL and "not writable" in row.detail


@pytest.mark.integration
def test_s3_storage_probe_writes_and_deletes(s3_server, tmp_path, capsys):
    rc = main(
        ["doctor", "--config", "local", "storage.root=s3://pcd-test/doctor", "--json", str(tmp_path / "doctor.json")]
    )
    row = _row(json.loads((tmp_path / "doctor.json").read_text())["rows"], "storage")
    assert row["verdict"] == OK, (row, capsys.readouterr().out)
    assert s3_server in row["detail"] and "'pcd-test'" in row["detail"]
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=S3_BUCKET, Prefix="doctor/")
    assert listed["KeyCount"] == 0
    assert rc == 0


def test_wrong_s3_endpoint_fails_fast_naming_it():
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.time()
    [row] = storage.check(StorageConfig(root="s3://pcd-test/doctor", s3={"endpoint_url": endpoint}))
    assert time.time() - t0 < 10
    assert row.verdict == FAIL and endpoint in row.detail and "'pcd-test'" in row.detail
    assert "storage.s3.endpoint_url" in row.fix


# --------------------------------------------------------------------------------------------- output and CLI
def test_table_format():
    rows = [Row("python", OK, "3.11.7"), Row("resources: train", FAIL, "no GPUs", "set train.scaling.use_gpu=false")]
    lines = format_rows(rows).splitlines()
    assert lines[0].split() == ["check", "verdict", "detail"]
    assert lines[2].split()[:3] == ["resources:", "train", "FAIL"]
    assert lines[3].strip() == "fix: set train.scaling.use_gpu=false"
    assert lines[-1] == "doctor: 2 checks, 1 failed"


def test_quiet_keeps_handlers_created_inside_it(capsys):
    name = "pcd-ray-test-doctor-quiet"
    with quiet():
        handler = logging.StreamHandler(stream=sys.stdout)  # as DeepSpeed's logger binds it at import
        logging.getLogger(name).addHandler(handler)
        print("swallowed")
    try:
        assert handler.stream is sys.stdout
        assert "swallowed" not in capsys.readouterr().out
    finally:
        logging.getLogger(name).removeHandler(handler)


def test_local_job_passes_here(tmp_path, capsys):
    rc = main(
        ["doctor", "--config", "local", f"storage.root={tmp_path / 'run'}", "--json", str(tmp_path / "doctor.json")]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads((tmp_path / "doctor.json").read_text())
    assert doc["failed"] == 0 and out.rstrip().endswith(f"doctor: {doc['checks']} checks, 0 failed")
    checks = {r["check"] for r in doc["rows"]}
    assert {"python", "packages", "vllm", "gpu", "nccl", "deepspeed ops", "cluster", "storage"} <= checks
    assert _row(doc["rows"], "vllm")["detail"] == "not needed: generate.engine=rule"
    assert "Setting accelerator" not in out


def test_paper_gpu_job_fails_here_naming_each_gpu_stage(tmp_path, capsys):
    if _gpu_here():
        pytest.skip("judges the paper's GPU job against a machine without GPUs")
    rc = main(["doctor", "--config", "train-paper-vitl14", f"storage.root={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert rc == 1
    lines = out.splitlines()
    for stage, ask in [
        ("generate", "8 actors x {GPU: 1, CPU: 4}"),
        ("embed", "4 actors x {GPU: 1, CPU: 4}"),
        ("train", "8 workers x {GPU: 1, CPU: 10}"),
        ("eval", "2 actors x {GPU: 1, CPU: 1}"),
    ]:
        line = next(ln for ln in lines if ln.startswith(f"resources: {stage} "))
        assert line.split()[2] == FAIL and f"{stage}: {ask}; the cluster has 0 GPUs" in line, line
    assert next(ln for ln in lines if ln.startswith("resources: serve ")).split()[2] == OK
    assert next(ln for ln in lines if ln.startswith("storage ")).split()[1] == OK


@pytest.mark.integration
def test_real_cli_and_no_heavy_imports_before_checks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # ./runs/local resolves under the tmp cwd, so the probe cannot touch the checkout.
    out = subprocess.run(
        [sys.executable, "-m", "pcd_ray", "doctor", "--config", "local"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().splitlines()[-1].endswith("checks, 0 failed")
    assert "Setting accelerator" not in out.stdout + out.stderr and out.stderr == ""
    assert not (tmp_path / "runs").exists()

    code = (
        "import sys; from pcd_ray.cli import build_parser; import pcd_ray.doctor; "
        "build_parser().parse_args(['doctor', '--json', 'x.json']); "
        "print('HEAVY', [m for m in ('torch', 'ray', 'deepspeed', 'vllm') if m in sys.modules])"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "HEAVY []" in imported.stdout, imported.stderr


@pytest.mark.integration
def test_joined_cluster_is_read_from_ray(ray_local):
    job = load_job("train-paper-vitl14", ["ray.address=auto"])
    rows = resources.check(job, resources.stage_requests(job), 0)
    cluster = rows[0]
    assert cluster.verdict == OK and "cluster at auto: 1 alive nodes" in cluster.detail, cluster
    train = next(r for r in rows if r.check == "resources: train")
    assert train.verdict == FAIL and "the cluster has 0 GPUs (cluster at auto)" in train.detail
    assert ray_local.is_initialized()  # the doctor leaves the session's Ray as it found it
