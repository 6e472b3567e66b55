"""Ray resources the config's stages ask for, against the cluster the job will run on.

A Ray actor or Train worker whose resources no node can offer is not an error in Ray: it waits, forever, as
"infeasible" (an autoscaler may yet add a node). So each stage's request is judged before a job is submitted:
one actor's or worker's bundle (its GPUs and CPUs come from ONE node), and the GPUs the stage holds at once (a
fixed-size actor pool and Train's placement group start all their members together). Stages run one after
another, so each is judged alone.

The cluster is the one ``pcd-ray <stage>`` would join: ``ray.address`` or RAY_ADDRESS (its alive nodes, plus the
node types its autoscaler may add, where they can be read), else the local Ray a stage would start on this
machine, which this check does not start.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from pcd_ray.config import JobConfig
from pcd_ray.doctor.rows import FAIL, OK, SKIP, WARN, Row, one_line, quiet

GPU_CLUSTER = "run on a GPU cluster (docs/CLUSTER.md)"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
"""The autoscaler config that `ray up` leaves on the head node."""
LOCAL = "local machine"


@dataclass(frozen=True)
class Request:
    """What one stage asks Ray for: ``count`` bundles, each placed on one node."""

    stage: str
    count: int
    unit: str
    bundle: dict[str, float]
    count_key: str
    gpu_key: str
    cpu_key: str | None
    cpu_instead: str
    """Overrides that run the stage without GPUs."""


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    min_count: int
    max_count: int
    """-1: unlimited."""


@dataclass(frozen=True)
class Cluster:
    where: str
    nodes: list[dict[str, float]]
    """Resources of each alive node."""
    node_types: list[NodeType] = field(default_factory=list)
    """What the autoscaler may add (empty: none known)."""
    max_resources: dict[str, float] = field(default_factory=dict)
    """Cluster-wide caps from the autoscaler's config."""
    note: str = ""

    @property
    def autoscaling(self) -> bool:
        return any(t.max_count == -1 or t.max_count > t.min_count for t in self.node_types if t.resources)

    def node_shapes(self) -> list[dict[str, float]]:
        return self.nodes + [t.resources for t in self.node_types if t.max_count != 0]

    def total(self, resource: str) -> float:
        live = sum(n.get(resource, 0) for n in self.nodes)
        if not self.node_types:
            return live
        scalable = 0.0
        for t in self.node_types:
            amount = t.resources.get(resource, 0)
            if amount and t.max_count == -1:
                scalable = math.inf
                break
            scalable += amount * max(t.max_count, 0)
        return max(live, min(scalable, self.max_resources.get(resource, math.inf)))


def _bundle(gpus: float, cpus: float) -> dict[str, float]:
    return {"GPU": float(gpus), "CPU": float(cpus)} if gpus else {"CPU": float(cpus)}


def fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def stage_requests(job: JobConfig) -> list[Request]:
    from pcd_ray.generate.job import actor_resources

    g = job.generate
    res = actor_resources(g)
    llm_gpus = g.engine == "vllm" and g.num_gpus_per_actor is None
    cpu_generate = (
        "generate.engine=transformers" + (" generate.num_gpus_per_actor=0" if g.num_gpus_per_actor else "")
        if g.engine == "vllm"
        else "generate.num_gpus_per_actor=0"
    )
    out = [
        Request(
            "generate",
            g.num_actors,
            "actor",
            _bundle(res["num_gpus"], res["num_cpus"]),
            "generate.num_actors",
            "generate.llm.tensor_parallel_size" if llm_gpus else "generate.num_gpus_per_actor",
            "generate.num_cpus_per_actor",
            cpu_generate,
        )
    ]
    if job.embed is not None:
        e = job.embed
        out.append(
            Request(
                "embed",
                e.num_actors,
                "actor",
                _bundle(e.num_gpus_per_actor, e.num_cpus_per_actor),
                "embed.num_actors",
                "embed.num_gpus_per_actor",
                "embed.num_cpus_per_actor",
                "embed.num_gpus_per_actor=0",
            )
        )
    for name, cfg in (("base_train", job.base_train), ("train", job.train)):
        if cfg is None:
            continue
        s = cfg.scaling
        out.append(
            Request(
                name,
                s.num_workers,
                "worker",
                _bundle(1 if s.use_gpu else 0, s.cpus_per_worker),
                f"{name}.scaling.num_workers",
                f"{name}.scaling.use_gpu",
                f"{name}.scaling.cpus_per_worker",
                f"{name}.scaling.use_gpu=false",
            )
        )
    # Eval's embedding actors reserve Ray's default CPU for an actor (embed_images gets no num_cpus).
    out.append(
        Request(
            "eval",
            job.eval.num_actors,
            "actor",
            _bundle(job.eval.num_gpus, 1),
            "eval.num_actors",
            "eval.num_gpus",
            None,
            "eval.num_gpus=0",
        )
    )
    sv = job.serve
    replicas = sv.autoscaling.min_replicas if sv.autoscaling is not None else sv.num_replicas
    out.append(
        Request(
            "serve",
            replicas,
            "replica",
            _bundle(sv.gpus_per_replica, sv.cpus_per_replica),
            "serve.autoscaling.min_replicas" if sv.autoscaling is not None else "serve.num_replicas",
            "serve.gpus_per_replica",
            "serve.cpus_per_replica",
            "serve.gpus_per_replica=0",
        )
    )
    return out


def needs_gpus(requests: list[Request]) -> list[str]:
    """Stages that ask for GPUs."""
    return [r.stage for r in requests if r.bundle.get("GPU")]


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0) >= v for k, v in bundle.items())


def stage_row(req: Request, cluster: Cluster) -> Row:
    check = f"resources: {req.stage}"
    desc = f"{req.stage}: {req.count} {req.unit}{'' if req.count == 1 else 's'} x {fmt(req.bundle)}"
    gpus = req.bundle.get("GPU", 0)
    shapes = cluster.node_shapes()
    if gpus:
        total = cluster.total("GPU")
        largest = max((n.get("GPU", 0) for n in shapes), default=0)
        if total == 0:
            return Row(
                check,
                FAIL,
                f"{desc}; the cluster has 0 GPUs ({cluster.where})",
                f"{GPU_CLUSTER} or set {req.cpu_instead}",
            )
        if largest < gpus:
            return Row(
                check,
                FAIL,
                f"{desc}; no node has {gpus:g} GPUs, the largest has {largest:g} ({cluster.where})",
                f"lower {req.gpu_key} to {largest:g}, or add nodes with {gpus:g} GPUs (docs/CLUSTER.md)",
            )
        if total < gpus * req.count:
            return Row(
                check,
                FAIL,
                f"{desc} = {gpus * req.count:g} GPUs at once; the cluster has {total:g} GPUs ({cluster.where})",
                f"lower {req.count_key} to {int(total // gpus)}, or add GPU nodes (docs/CLUSTER.md)",
            )
    if not any(_fits(req.bundle, n) for n in shapes):
        room = max((n.get("CPU", 0) for n in shapes if n.get("GPU", 0) >= gpus), default=0)
        beside = f" with {gpus:g} GPUs" if gpus else ""
        lower = f"lower {req.cpu_key} to {room:g}" if req.cpu_key else "use nodes with more CPUs"
        grow = (
            f"set ray.num_cpus to {req.bundle['CPU']:g}"
            if cluster.where == LOCAL
            else "add such nodes (docs/CLUSTER.md)"
        )
        return Row(
            check,
            FAIL,
            f"{desc}; no node has {fmt(req.bundle)} (the most CPUs on a node{beside}: {room:g}; {cluster.where})",
            f"{lower}, or {grow}",
        )
    cpus = req.bundle["CPU"] * req.count
    total_cpus = cluster.total("CPU")
    if total_cpus < cpus:
        verdict = WARN if cluster.autoscaling else FAIL
        more = f"set ray.num_cpus to {cpus:g} (logical CPUs), " if cluster.where == LOCAL else ""
        return Row(
            check,
            verdict,
            f"{desc} = {cpus:g} CPUs at once; the cluster has {total_cpus:g} ({cluster.where})",
            f"{more}lower {req.count_key}{f' or {req.cpu_key}' if req.cpu_key else ''}",
        )
    return Row(check, OK, f"{desc}; fits ({cluster.where})")


def local_cluster(num_cpus: int | None, cpu_count: int, gpus: int) -> Cluster:
    """The one-node Ray a stage starts here: ray.num_cpus logical CPUs (else the cores), the GPUs torch sees."""
    cpus = num_cpus if num_cpus is not None else cpu_count
    source = "ray.num_cpus" if num_cpus is not None else "os.cpu_count()"
    return Cluster(
        LOCAL,
        [{"CPU": float(cpus), "GPU": float(gpus)}],
        note=f"no ray.address or RAY_ADDRESS: a local Ray with {cpus} CPUs ({source}) and {gpus} GPUs",
    )


def node_types_from_config(config) -> tuple[list[NodeType], dict[str, float]]:
    """Node types and caps from the autoscaler's ClusterConfig (ray.core.generated.autoscaler_pb2) in the GCS."""
    types = [
        NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, g.min_count, g.max_count)
        for g in config.node_group_configs
    ]
    return types, {k: float(v) for k, v in config.max_resources.items()}


def node_types_from_launcher(config: dict) -> list[NodeType]:
    """Node types from a cluster launcher config (``available_node_types``; the head is the one running node)."""
    head = config.get("head_node_type")
    types = []
    for name, t in (config.get("available_node_types") or {}).items():
        resources = {k: float(v) for k, v in (t.get("resources") or {}).items()}
        if name == head:
            types.append(NodeType(name, resources, 1, 1))
        else:
            types.append(
                NodeType(name, resources, t.get("min_workers", 0), t.get("max_workers", config.get("max_workers", 0)))
            )
    return types


def _autoscaler(bootstrap: Path) -> tuple[list[NodeType], dict[str, float], str]:
    """(node types, caps, where they came from) of the joined cluster's autoscaler: the ClusterConfig an
    autoscaler may publish in the GCS, else the launcher's bootstrap config when this process runs on the head (as
    a `ray job submit` driver does). Ray 2.60's `ray up` autoscaler publishes nothing in the GCS, so on such a
    cluster only the bootstrap config tells what it can add."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception as e:  # Ray Client connections have no GCS accessor
        config, unread = None, f"the GCS autoscaler config is not readable ({one_line(e)})"
    else:
        unread = "no autoscaler config in the GCS"
    if config is not None and config.node_group_configs:
        return *node_types_from_config(config), "node types from the GCS autoscaler config"
    if bootstrap.is_file():
        import yaml

        types = node_types_from_launcher(yaml.safe_load(bootstrap.read_text()) or {})
        if types:
            return types, {}, f"node types from {bootstrap}"
    return [], {}, f"{unread} and no {bootstrap} here; judged against the live nodes only"


def describe(cluster: Cluster) -> str:
    if cluster.where == LOCAL:
        return cluster.note
    live = (
        f"{len(cluster.nodes)} alive nodes, {sum(n.get('CPU', 0) for n in cluster.nodes):g} CPUs, "
        f"{sum(n.get('GPU', 0) for n in cluster.nodes):g} GPUs"
    )
    types = "; ".join(
        f"{t.name} {t.min_count}-{'any' if t.max_count == -1 else t.max_count} x "
        f"{fmt({k: v for k, v in t.resources.items() if k in ('GPU', 'CPU')})}"
        for t in cluster.node_types
    )
    return f"{cluster.where}: {live}; {cluster.note}" + (f": {types}" if types else "")


def _reachable(address: str, timeout: float = 3.0) -> str | None:
    """Why a host:port (or ray://host:port) address cannot be reached, or None (a wrong address would otherwise
    keep ray.init retrying for minutes). Other schemes are left to ray.init, which explains them at once."""
    scheme, _, hostport = address.rpartition("://")
    if scheme not in ("", "ray"):
        return None
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return None  # "auto" and friends: Ray resolves them itself, and fails fast
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as e:
        return one_line(e)


def remote_cluster(job: JobConfig, address: str) -> Cluster:
    """Join the cluster (as the stages do) and read its alive nodes and, if published, its autoscaler's node types."""
    import ray

    from pcd_ray.runtime import init_ray

    started = not ray.is_initialized()
    with quiet(fds=True) as captured:
        try:
            init_ray(job.ray)
        except Exception as e:
            reason = captured.last_line()
            raise ConnectionError(" ".join(str(e).split()) + (f" ({reason})" if reason else "")) from e
        try:
            nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
            types, caps, note = _autoscaler(Path(BOOTSTRAP_CONFIG).expanduser())
        finally:
            if started:
                ray.shutdown()
    return Cluster(f"cluster at {address}", nodes, types, caps, note)


def check(job: JobConfig, requests: list[Request], local_gpus: int) -> list[Row]:
    address = job.ray.address or os.environ.get("RAY_ADDRESS")
    if not address:
        cluster = local_cluster(job.ray.num_cpus, os.cpu_count() or 1, local_gpus)
    else:
        problem = _reachable(address)
        try:
            if problem:
                raise ConnectionError(problem)
            cluster = remote_cluster(job, address)
        except Exception as e:  # no cluster, no judgement of the stages
            source = "ray.address" if job.ray.address else "RAY_ADDRESS"
            return [
                Row(
                    "cluster",
                    FAIL,
                    f"cannot join Ray at {address} ({source}): {one_line(e)}",
                    f"start the cluster or fix {source} (docs/CLUSTER.md)",
                )
            ] + [Row(f"resources: {r.stage}", SKIP, "no cluster to judge against") for r in requests]
    return [Row("cluster", OK, describe(cluster))] + [stage_row(r, cluster) for r in requests]
