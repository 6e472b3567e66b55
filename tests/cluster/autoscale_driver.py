"""Driver for tests/cluster/test_autoscaling_sim.py, run as its own process (joined to the simulated cluster
through RAY_ADDRESS, so the test session's own Ray is never touched). Prints one JSON line with what it saw.

It makes the GPU requests the stages make, built by the stages' own code and job files: the generate stage's vLLM
engine actors (``actor_resources`` of jobs/generate-coco-vllm.yaml, one actor per ``num_actors``) and the train
stage's Ray Train worker group (the placement group Ray Train reserves for jobs/train-paper-vitl14.yaml's scaling:
one bundle per worker, ``resources_per_worker`` + a GPU each, PACK). No GPU code runs: the nodes' GPUs are fake.
"""

from __future__ import annotations

import json
import time

import ray
import ray.train
from ray.util.placement_group import placement_group, remove_placement_group

from pcd_ray.config import load_job
from pcd_ray.generate.job import actor_resources


def gpu_nodes() -> dict[str, dict]:
    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}


def wait_for(predicate, timeout: float, what: str) -> float:
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s; GPU nodes: {gpu_nodes()}")
        time.sleep(1)
    return round(time.time() - t0, 1)


class EngineStandIn:
    """Holds the resources a vLLM engine actor holds; reports where it was placed."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def main() -> None:
    ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    out: dict = {"gpu_nodes_at_start": len(gpu_nodes())}

    train = load_job("train-paper-vitl14").train.scaling
    scaling = ray.train.ScalingConfig(
        num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker={"CPU": train.cpus_per_worker}
    )  # as run_train builds it
    bundle = scaling._resources_per_worker_not_none
    out["train_bundle"], out["train_workers"] = bundle, scaling.num_workers
    gen = load_job("generate-coco-vllm", ["generate.num_actors=2"]).generate
    res = actor_resources(gen)
    out["generate_actor"] = res

    # The worker group first, then the engine actors: the stages never overlap in a run, and asked for at once a
    # one-GPU actor may land on the training node before the worker group does and push it to a second one.
    t0 = time.time()
    pg = placement_group([dict(bundle)] * scaling.num_workers, strategy=scaling.placement_strategy)
    ray.get(pg.ready(), timeout=300)
    actors = [ray.remote(EngineStandIn).options(**res).remote() for _ in range(gen.num_actors)]
    actor_nodes = ray.get([a.node.remote() for a in actors], timeout=300)
    out["scale_up_s"] = round(time.time() - t0, 1)
    nodes = gpu_nodes()
    out["nodes_up"] = [{"gpus": r["GPU"], "cpus": r["CPU"]} for r in nodes.values()]
    out["actor_node_gpus"] = [nodes[n]["GPU"] for n in actor_nodes]
    pg_nodes = set(ray.util.placement_group_table(pg)["bundles_to_node_id"].values())
    out["train_bundle_node_gpus"] = sorted(nodes[n]["GPU"] for n in pg_nodes)

    # The stage ends: its actors and worker group go away; the GPU nodes are idle from here on.
    for a in actors:
        ray.kill(a)
    remove_placement_group(pg)
    out["scale_down_s"] = wait_for(lambda: not gpu_nodes(), 300, "GPU nodes back to zero")
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
