"""A Ray head of its own for cluster tests: `ray start --head` on 127.0.0.1 with a private temp dir and free ports,
stopped by killing only its own processes.

Never `ray stop` (nor AutoscalingCluster.start/shutdown, which call `ray stop --force`): that kills every Ray on
the machine, including the test session's shared instance and other users'. A head started here is identified by
its temp dir, which every one of its processes (GCS, raylets, dashboard, autoscaler, workers, fake nodes) carries
on its command line; their descendants (a job's driver runs in a session of its own) are found through the process
tree while the parents are alive.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

RAY_BIN = Path(sys.executable).with_name("ray")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open together, so none repeats)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def local_env(**extra: str) -> dict[str, str]:
    """The environment of a local head and of its clients: 127.0.0.1 only, token auth off (Ray 2.60 turns it on by
    default), this venv first on PATH (so a job's `pcd-ray` / `python` is this environment's), no RAY_ADDRESS
    inherited from the test session."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{RAY_BIN.parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


class LocalHead:
    """`ray start --head` with its own --temp-dir and ports; ``stop()`` kills exactly its processes."""

    def __init__(self, *, num_cpus: int, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        # Short path: Ray's Unix sockets live under it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="pcdc-", dir="/tmp")
        (
            self.gcs_port,
            self.dashboard_port,
            self.client_port,
            self.agent_listen_port,
            self.agent_grpc_port,
            self.metrics_port,
            self.runtime_env_port,
            self.node_manager_port,
            self.object_manager_port,
        ) = free_ports(9)
        self.num_cpus = num_cpus
        self.extra_args = extra_args
        self.env = local_env(**(env or {}))
        self._known: dict[int, psutil.Process] = {}
        self.signalled: set[int] = set()

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> LocalHead:
        cmd = [
            str(RAY_BIN),
            "start",
            "--head",
            f"--temp-dir={self.temp_dir}",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}",
            f"--dashboard-agent-listen-port={self.agent_listen_port}",
            f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
            f"--metrics-export-port={self.metrics_port}",
            f"--runtime-env-agent-port={self.runtime_env_port}",
            f"--node-manager-port={self.node_manager_port}",
            f"--object-manager-port={self.object_manager_port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            "--disable-usage-stats",
            *self.extra_args,
        ]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        self._remember()
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return self

    def own_processes(self) -> list[psutil.Process]:
        """Live processes of this head: command line names its temp dir, or descends from one that does."""
        mine = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if self.temp_dir in " ".join(proc.info["cmdline"] or ()):
                    mine[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        mine[child.pid] = child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        mine.pop(os.getpid(), None)
        return list(mine.values())

    def _remember(self) -> None:
        for proc in self.own_processes():
            self._known.setdefault(proc.pid, proc)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate this head's processes (and their children), wait, then kill what is left. Repeats until none
        remain, since a dying raylet's workers and a job's driver may outlive the first pass."""
        for _ in range(5):
            self._remember()
            procs = [p for p in self._known.values() if _alive(p)]
            if not procs:
                break
            for p in procs:
                self.signalled.add(p.pid)
                _signal(p, kill=False)
            _, alive = psutil.wait_procs(procs, timeout=timeout)
            for p in alive:
                _signal(p, kill=True)
            psutil.wait_procs(alive, timeout=5)
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def leftovers(self) -> list[psutil.Process]:
        return [p for p in self._known.values() if _alive(p)] + self.own_processes()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(p: psutil.Process, *, kill: bool) -> None:
    try:
        p.kill() if kill else p.terminate()
    except psutil.NoSuchProcess:
        pass


def other_ray_processes(head: LocalHead) -> set[int]:
    """PIDs of Ray processes on the machine that are not this head's (to prove they survive its stop)."""
    names = ("gcs_server", "raylet")
    mine = {p.pid for p in head.own_processes()}
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or ())
        except psutil.NoSuchProcess:
            continue
        if any(f"/{n} " in cmd or cmd.endswith(f"/{n}") for n in names) and proc.pid not in mine:
            found.add(proc.pid)
    return found
