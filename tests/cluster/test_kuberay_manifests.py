"""KubeRay manifests (cluster/kuberay/): structure checked field by field (apiVersion, kind, required fields), the
pods' resources against what the stages ask for, the RayJobs' entrypoints against the real CLI and job configs, and
the RayService's embedded Serve config with Ray's Serve schema. A deliberately broken copy of each is rejected.

No Kubernetes schema library: the checks below are the ones that matter for pcd-ray, written out.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

from pcd_ray.cli import STAGES as CLI_STAGES
from pcd_ray.config import ConfigError, load_job
from pcd_ray.generate.job import actor_resources

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "cluster" / "kuberay"
PIPELINE_STAGES = ["data", "pairs", "generate", "embed", "train", "eval"]


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity ("8", "500m", 8) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def group_resources(group: dict) -> dict[str, float]:
    """The Ray resources KubeRay gives a group's pods: CPU from the container's cpu limit (else request), GPU from
    nvidia.com/gpu, unless rayStartParams override them."""
    container = group["template"]["spec"]["containers"][0]
    res = container.get("resources", {})
    limits, requests = res.get("limits", {}), res.get("requests", {})
    params = group.get("rayStartParams", {})
    cpu = params.get("num-cpus", limits.get("cpu", requests.get("cpu", 0)))
    gpu = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
    return {"CPU": quantity(cpu), "GPU": quantity(gpu)}


def fits(request: dict[str, float], resources: dict[str, float]) -> bool:
    return all(amount <= resources.get(name, 0) for name, amount in request.items() if amount)


# ------------------------------------------------------------------------------------------------ structure checks
def check_pod_template(template, where: str) -> list[str]:
    problems = []
    containers = (template or {}).get("spec", {}).get("containers") or []
    if not containers:
        return [f"{where}.template.spec.containers: missing"]
    for c in containers:
        for key in ("name", "image"):
            if not c.get(key):
                problems.append(f"{where}.containers[{c.get('name')}].{key}: missing")
        res = c.get("resources", {})
        if not res.get("limits") or not res.get("requests"):
            problems.append(f"{where}.containers[{c.get('name')}].resources: requests and limits required")
        elif quantity(res["limits"].get("nvidia.com/gpu", 0)) != quantity(res["requests"].get("nvidia.com/gpu", 0)):
            problems.append(f"{where}: GPU requests != limits")
    return problems


def check_cluster_spec(spec: dict, where: str, *, gpu_groups_min_zero: bool = True) -> list[str]:
    problems = []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}.enableInTreeAutoscaling: must be true")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append(f"{where}.authOptions.mode: must be token")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + [f"{where}.headGroupSpec: missing"]
    problems += check_pod_template(head.get("template"), f"{where}.headGroupSpec")
    if "rayStartParams" not in head:
        problems.append(f"{where}.headGroupSpec.rayStartParams: missing")
    names = set()
    for i, g in enumerate(spec.get("workerGroupSpecs") or []):
        w = f"{where}.workerGroupSpecs[{i}]"
        for key in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            if key not in g:
                problems.append(f"{w}.{key}: missing")
        if g.get("groupName") in names:
            problems.append(f"{w}.groupName: duplicate {g.get('groupName')!r}")
        names.add(g.get("groupName"))
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 0)
        if not 0 <= lo <= g.get("replicas", lo) <= hi or hi < 1:
            problems.append(f"{w}: need 0 <= minReplicas <= replicas <= maxReplicas, maxReplicas >= 1")
        if "template" in g:
            problems += check_pod_template(g["template"], w)
            if gpu_groups_min_zero and group_resources(g)["GPU"] and lo != 0:
                problems.append(f"{w}.minReplicas: a GPU group must scale from 0")
    return problems


def check_manifest(doc: dict) -> list[str]:
    """Problems with one KubeRay manifest; [] when it is well formed."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion: {doc.get('apiVersion')!r}, expected 'ray.io/v1'")
    kind = doc.get("kind")
    name = doc.get("metadata", {}).get("name")
    if not name:
        problems.append("metadata.name: missing")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return problems + ["spec: missing"]
    if kind == "RayCluster":
        if not str(spec.get("rayVersion", "")).startswith("2."):
            problems.append("spec.rayVersion: missing")
        problems += check_cluster_spec(spec, "spec")
    elif kind == "RayJob":
        problems += check_rayjob(spec)
    elif kind == "RayService":
        problems += check_cluster_spec(
            spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig", gpu_groups_min_zero=False
        )
        problems += check_serve_config_v2(spec.get("serveConfigV2"))
    else:
        problems.append(f"kind: {kind!r} is not RayCluster, RayJob or RayService")
    return problems


def check_rayjob(spec: dict) -> list[str]:
    problems = []
    if (spec.get("clusterSelector") or {}).get("ray.io/cluster") is None and "rayClusterSpec" not in spec:
        problems.append("spec: needs clusterSelector['ray.io/cluster'] or rayClusterSpec")
    if spec.get("entrypointNumGpus") or spec.get("entrypointResources"):
        problems.append("spec.entrypointNumGpus: the driver must ask for no GPU")
    argv = shlex.split(spec.get("entrypoint") or "")
    if argv[:1] != ["pcd-ray"] or len(argv) < 4 or argv[1] not in CLI_STAGES or argv[2] != "--config":
        return problems + [f"spec.entrypoint: {spec.get('entrypoint')!r} is not `pcd-ray <stage> --config JOB ...`"]
    try:
        job = load_job(argv[3], argv[4:])
    except ConfigError as e:
        return problems + [f"spec.entrypoint: {e}"]
    if getattr(job, argv[1], None) is None:
        problems.append(f"spec.entrypoint: job {argv[3]!r} has no {argv[1]!r} section")
    if "runtimeEnvYAML" in spec:
        from ray.runtime_env import RuntimeEnv

        try:
            RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
        except Exception as e:  # Ray raises several types for a bad runtime_env
            problems.append(f"spec.runtimeEnvYAML: {e}")
    return problems


def check_serve_config_v2(text) -> list[str]:
    from pcd_ray.serve.deploy_config import ServeConfigError, check_serve_config

    if not isinstance(text, str):
        return ["spec.serveConfigV2: must be a YAML string"]
    try:
        check_serve_config(yaml.safe_load(text), "spec.serveConfigV2")
    except ServeConfigError as e:
        return [str(e)]
    return []


# ---------------------------------------------------------------------------------------------------------- tests
def test_every_manifest_is_well_formed():
    docs = [d for name in ("raycluster.yaml", "rayjobs.yaml", "rayservice.yaml") for d in load(name)]
    assert [d["kind"] for d in docs] == ["RayCluster"] + ["RayJob"] * len(PIPELINE_STAGES) + ["RayService"]
    for doc in docs:
        assert check_manifest(doc) == [], doc["metadata"]["name"]


def test_raycluster_groups_match_what_the_stages_ask_for():
    (cluster,) = load("raycluster.yaml")
    spec = cluster["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: group_resources(g) for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-worker", "gpu-gen", "gpu-train"}
    assert groups["cpu-worker"]["GPU"] == 0 and groups["cpu-worker"]["CPU"] >= 8

    gen = actor_resources(load_job("generate-coco-vllm").generate)
    gen_request = {"CPU": gen["num_cpus"], "GPU": gen["num_gpus"]}
    assert gen_request["GPU"] >= 1 and fits(gen_request, groups["gpu-gen"])

    scaling = load_job("train-paper-vitl14").train.scaling
    worker = {"CPU": scaling.cpus_per_worker, "GPU": 1}  # run_train: resources_per_worker + use_gpu
    assert scaling.use_gpu and fits(worker, groups["gpu-train"]) and not fits(worker, groups["gpu-gen"])
    assert scaling.num_workers * worker["CPU"] <= groups["gpu-train"]["CPU"]
    assert scaling.num_workers <= groups["gpu-train"]["GPU"]


def test_one_rayjob_per_stage_on_the_cluster():
    (cluster,) = load("raycluster.yaml")
    jobs = load("rayjobs.yaml")
    stages = [shlex.split(j["spec"]["entrypoint"])[1] for j in jobs]
    assert stages == PIPELINE_STAGES
    for job in jobs:
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        assert "entrypointNumGpus" not in job["spec"] and "entrypointNumCpus" not in job["spec"]
    # The generate job's engine actors ask for GPUs; the driver (the RayJob entrypoint) asks for none.
    gen = next(j for j in jobs if j["metadata"]["name"] == "pcd-generate")
    argv = shlex.split(gen["spec"]["entrypoint"])
    assert actor_resources(load_job(argv[3], argv[4:]).generate)["num_gpus"] >= 1


def test_rayservice_embeds_serve_gpu_yaml_and_fits_its_workers():
    (svc,) = load("rayservice.yaml")
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((REPO / "serve" / "gpu.yaml").read_text())
    assert serve_cfg["applications"] == shipped["applications"], "rayservice.yaml drifted from serve/gpu.yaml"
    assert check_serve_config_v2(svc["spec"]["serveConfigV2"]) == []

    (group,) = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (dep,) = serve_cfg["applications"][0]["deployments"]
    replica = {"CPU": dep["ray_actor_options"]["num_cpus"], "GPU": dep["ray_actor_options"]["num_gpus"]}
    assert fits(replica, group_resources(group))
    assert group["maxReplicas"] >= dep["autoscaling_config"]["max_replicas"]
    token_env = next(
        o.split("=", 1)[1]
        for o in serve_cfg["applications"][0]["args"]["overrides"]
        if o.startswith("serve.auth_token_env=")
    )
    for pod in (svc["spec"]["rayClusterConfig"]["headGroupSpec"], group):
        env = {e["name"]: e for e in pod["template"]["spec"]["containers"][0].get("env", [])}
        assert "secretKeyRef" in env[token_env]["valueFrom"], "the Serve token must come from a Secret"


def _mutate(doc: dict, path: tuple, value=None, delete: bool = False) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for step in path[:-1]:
        node = node[step]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


BROKEN = {
    "RayCluster wrong apiVersion": ("raycluster.yaml", 0, lambda d: _mutate(d, ("apiVersion",), "ray.io/v1alpha1")),
    "RayCluster misspelled kind": ("raycluster.yaml", 0, lambda d: _mutate(d, ("kind",), "RayClutser")),
    "RayCluster without head": ("raycluster.yaml", 0, lambda d: _mutate(d, ("spec", "headGroupSpec"), delete=True)),
    "RayCluster autoscaling off": (
        "raycluster.yaml",
        0,
        lambda d: _mutate(d, ("spec", "enableInTreeAutoscaling"), False),
    ),
    "GPU group never scales to 0": (
        "raycluster.yaml",
        0,
        lambda d: _mutate(d, ("spec", "workerGroupSpecs", 1, "minReplicas"), 1),
    ),
    "worker group without name": (
        "raycluster.yaml",
        0,
        lambda d: _mutate(d, ("spec", "workerGroupSpecs", 2, "groupName"), delete=True),
    ),
    "container without image": (
        "raycluster.yaml",
        0,
        lambda d: _mutate(
            d, ("spec", "workerGroupSpecs", 2, "template", "spec", "containers", 0, "image"), delete=True
        ),
    ),
    "RayJob unknown stage": (
        "rayjobs.yaml",
        2,
        lambda d: _mutate(d, ("spec", "entrypoint"), "pcd-ray generat --config generate-coco-vllm"),
    ),
    "RayJob misspelled override": (
        "rayjobs.yaml",
        2,
        lambda d: _mutate(
            d, ("spec", "entrypoint"), "pcd-ray generate --config generate-coco-vllm generate.num_actor=8"
        ),
    ),
    "RayJob driver asks for a GPU": ("rayjobs.yaml", 3, lambda d: _mutate(d, ("spec", "entrypointNumGpus"), 1)),
    "RayJob without cluster": ("rayjobs.yaml", 0, lambda d: _mutate(d, ("spec", "clusterSelector"), delete=True)),
    "RayService misspelled Serve key": (
        "rayservice.yaml",
        0,
        lambda d: _mutate(
            d,
            ("spec", "serveConfigV2"),
            d["spec"]["serveConfigV2"].replace("max_ongoing_requests: 128", "max_ongoing_request: 128"),
        ),
    ),
    "RayService bad Serve value": (
        "rayservice.yaml",
        0,
        lambda d: _mutate(
            d, ("spec", "serveConfigV2"), d["spec"]["serveConfigV2"].replace("max_replicas: 8", "max_replicas: 0")
        ),
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_broken_copy_is_rejected(case):
    name, index, mutate = BROKEN[case]
    doc = load(name)[index]
    assert check_manifest(doc) == []
    broken = mutate(doc)
    assert broken != doc, "the mutation changed nothing"
    assert check_manifest(broken), f"{case}: not detected"
