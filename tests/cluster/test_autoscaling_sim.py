"""Ray's local autoscaling simulator (``ray.cluster_utils.AutoscalingCluster``'s fake multi-node provider) with the
worker types of cluster/aws.yaml, all at min 0: the generate stage's engine actors and the train stage's worker
group (their real resource requests, see autoscale_driver.py) make the GPU types scale up from zero, each request
on the type meant for it, and the nodes go away again once idle.

Isolated: the simulated cluster has its own head (temp dir, ports), the driver is its own process, and nothing
calls AutoscalingCluster.start/shutdown, which would `ray stop --force` every Ray on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster_helpers import LocalHead, other_ray_processes
from ray.cluster_utils import AutoscalingCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
IDLE_TIMEOUT_MIN = 0.1  # 6 s instead of the real configs' minutes


class SimulatedCluster(AutoscalingCluster):
    """The simulator's cluster config, minus the base file the 2.60 wheel does not ship
    (autoscaler/_private/fake_multi_node/example.yaml): written out here."""

    def __init__(self, head_resources: dict, worker_node_types: dict, gcs_address: str):
        self._gcs_address = gcs_address
        super().__init__(head_resources, worker_node_types, idle_timeout_minutes=IDLE_TIMEOUT_MIN)

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = {
            "cluster_name": "fake_multinode",
            "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
            # gcs_address: fake nodes join this head, not the default 127.0.0.1:6379 (which may be someone else's).
            "provider": {
                "type": "fake_multinode",
                "gcs_address": self._gcs_address,
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "auth": {"ssh_user": "ubuntu"},
            "available_node_types": {
                **worker_node_types,
                "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
            },
            "head_node_type": "ray.head.default",
            "upscaling_speed": 1.0,
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }
        config.update(config_kwargs)
        return config

    def start(self, *args, **kwargs):
        raise NotImplementedError("AutoscalingCluster.start runs `ray stop --force`: use LocalHead")

    def shutdown(self):
        raise NotImplementedError("AutoscalingCluster.shutdown runs `ray stop --force`: use LocalHead.stop")


def launcher_worker_types(max_workers: int = 2) -> dict:
    """cluster/aws.yaml's worker types with their Ray resources, all min 0 (few nodes: each is real processes)."""
    raw = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    return {
        name: {
            "resources": dict(t["resources"]),
            "node_config": {},
            "min_workers": 0,
            "max_workers": min(max_workers, t["max_workers"]),
        }
        for name, t in raw["available_node_types"].items()
        if name != raw["head_node_type"]
    }


def test_gpu_worker_types_scale_from_zero_for_generate_and_train_and_back():
    head = LocalHead(num_cpus=1)  # the driver's node; CPU work would go to cpu_worker nodes
    worker_types = launcher_worker_types()
    assert all(t["min_workers"] == 0 for t in worker_types.values())
    sim = SimulatedCluster({"CPU": 1}, worker_types, head.gcs_address)
    config_path = Path(head.temp_dir) / "autoscaling.json"
    config_path.write_text(json.dumps(sim._config))
    head.extra_args = (f"--autoscaling-config={config_path}",)
    head.env.update(AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1")

    others = other_ray_processes(head)
    head.start()
    try:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("autoscale_driver.py"))],
            cwd=REPO,
            env=dict(head.env, RAY_ADDRESS=head.gcs_address),
            capture_output=True,
            text=True,
            timeout=720,
        )
    finally:
        head.stop()
    assert not head.leftovers(), f"processes of {head.temp_dir} left: {head.leftovers()}"
    assert not (head.signalled & others), "a process of another Ray was signalled"
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, f"driver failed:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])

    gen_type, train_type = worker_types["gpu_gen"]["resources"], worker_types["gpu_train"]["resources"]
    assert result["gpu_nodes_at_start"] == 0
    assert result["generate_actor"]["num_gpus"] >= 1 and result["train_bundle"]["GPU"] == 1
    # Up from zero: one generation node per engine actor, one training node for the whole worker group, no more.
    up = sorted((n["gpus"], n["cpus"]) for n in result["nodes_up"])
    assert up == sorted([(gen_type["GPU"], gen_type["CPU"])] * 2 + [(train_type["GPU"], train_type["CPU"])]), up
    assert result["actor_node_gpus"] == [gen_type["GPU"]] * 2, "engine actors must run on gpu_gen nodes"
    assert result["train_bundle_node_gpus"] == [train_type["GPU"]], "the worker group must share one gpu_train node"
    # And back to zero once idle.
    assert result["scale_down_s"] < 300
    print(f"scale-up {result['scale_up_s']} s, scale-down {result['scale_down_s']} s")
