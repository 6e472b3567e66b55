"""The cluster launcher configs (cluster/aws.yaml, cluster/gcp.yaml) pass Ray's own cluster-config validation (the
steps `ray up` runs before touching a cloud: defaults merged, then ray-schema.json and Ray's consistency checks),
hold the node types the stages need, and every stage's resource request fits the worker type meant for it. A
deliberately broken copy of each config is rejected.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from pcd_ray.config import load_job
from pcd_ray.generate.job import actor_resources

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml"]


def ray_validate(raw: dict) -> dict:
    """What `ray up` does to a config before any cloud call: fill defaults, then validate. Raises on errors."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def fits(request: dict[str, float], resources: dict[str, float]) -> bool:
    return all(amount <= resources.get(name, 0) for name, amount in request.items() if amount)


def generate_request() -> dict[str, float]:
    cfg = load_job("generate-coco-vllm").generate
    res = actor_resources(cfg)
    return {"CPU": res["num_cpus"], "GPU": res["num_gpus"]}


def train_worker_request() -> tuple[dict[str, float], int]:
    # What run_train hands Ray Train: resources_per_worker={"CPU": cpus_per_worker} plus one GPU per worker with
    # use_gpu (pcd_ray/train/trainer.py).
    scaling = load_job("train-paper-vitl14").train.scaling
    assert scaling.use_gpu
    return {"CPU": scaling.cpus_per_worker, "GPU": 1}, scaling.num_workers


@pytest.fixture(params=LAUNCHER, ids=lambda p: p.name)
def launcher(request):
    return request.param, yaml.safe_load(request.param.read_text())


def test_both_launcher_configs_ship():
    assert all(p.is_file() for p in LAUNCHER)


def test_valid_for_ray_up(launcher):
    path, raw = launcher
    prepared = ray_validate(raw)
    assert prepared["provider"]["type"] == path.stem
    assert set(prepared["available_node_types"]) == {"head", "cpu_worker", "gpu_gen", "gpu_train"}


def test_node_types_cpu_head_and_autoscaling_workers(launcher):
    _, raw = launcher
    types = raw["available_node_types"]
    assert raw["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}, "Ray work must not land on the head"
    assert "GPU" not in types["cpu_worker"]["resources"] and types["cpu_worker"]["resources"]["CPU"] >= 8
    for gpu_type in ("gpu_gen", "gpu_train"):
        node = types[gpu_type]
        assert node["min_workers"] == 0 and node["max_workers"] >= 1, gpu_type
        assert node["resources"]["GPU"] >= 1, gpu_type
    assert 0 < raw["idle_timeout_minutes"] <= 15
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != "head") >= raw["max_workers"] > 0


def test_stage_requests_land_on_their_worker_type(launcher):
    _, raw = launcher
    types = {name: t["resources"] for name, t in raw["available_node_types"].items()}
    gen = generate_request()
    assert gen["GPU"] >= 1, "vLLM engine actors must ask for GPUs"
    assert fits(gen, types["gpu_gen"])
    worker, num_workers = train_worker_request()
    assert fits(worker, types["gpu_train"])
    assert not fits(worker, types["gpu_gen"]), "train workers must not fit a generation node"
    assert not fits(worker, types["cpu_worker"]) and not fits(gen, types["cpu_worker"])
    # The whole worker group on one training node: the loss's all-gather stays on NVLink.
    assert num_workers * worker["CPU"] <= types["gpu_train"]["CPU"] and num_workers <= types["gpu_train"]["GPU"]


def test_dashboard_on_localhost_no_credentials(launcher):
    """(Which image the nodes run: tests/cluster/test_environment.py.)"""
    path, raw = launcher
    text = path.read_text()
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    for cmds in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(cmds)
    for pattern in (
        r"AKIA[0-9A-Z]{16}",
        r"(?i)aws_secret_access_key\s*[:=]",
        r"(?i)private_key",
        r"ssh_private_key",
        r"(?i)RAY_AUTH_TOKEN=[\"']?[0-9a-f]{16}",
    ):
        assert not re.search(pattern, text), pattern
    nodes = raw["available_node_types"].values()
    if path.stem == "aws":
        assert all("IamInstanceProfile" in n["node_config"] for n in nodes)
    else:
        assert all(n["node_config"]["serviceAccounts"] for n in nodes)


BREAKAGES = {
    "misspelled top-level key": lambda c: c.update(idle_timeout_minute=c.pop("idle_timeout_minutes")),
    "node type without resources": lambda c: c["available_node_types"]["gpu_gen"].pop("resources"),
    "GPU count not an integer": lambda c: c["available_node_types"]["gpu_train"]["resources"].update(GPU="eight"),
    "unknown node-type key": lambda c: c["available_node_types"]["gpu_gen"].update(min_worker=0),
    "head type not declared": lambda c: c.update(head_node_type="ray.head.default"),
    "min workers above the cap": lambda c: c["available_node_types"]["cpu_worker"].update(min_workers=100),
    "negative idle timeout": lambda c: c.update(idle_timeout_minutes=-1),
}


@pytest.mark.parametrize("breakage", BREAKAGES, ids=str)
def test_broken_copy_is_rejected(launcher, breakage):
    import jsonschema

    _, raw = launcher
    broken = copy.deepcopy(raw)
    BREAKAGES[breakage](broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(broken)
