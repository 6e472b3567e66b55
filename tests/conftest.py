"""Shared fixtures: one local Ray per test session, a real S3-compatible server (moto) on 127.0.0.1.

Everything binds to 127.0.0.1 and is stopped at the end of the session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

# Before anything starts Ray: bind Ray to 127.0.0.1 (docs/ENV.md, "Ray on one machine") and keep its logs quiet.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

S3_BUCKET = "pcd-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session", autouse=True)
def s3_server():
    """moto's S3 server on 127.0.0.1, started before Ray so Ray workers inherit the endpoint and dummy credentials.

    Yields the endpoint URL; the bucket ``pcd-test`` exists.
    """
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _wait_port(port)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pytest_collection_modifyitems(config, items):
    """Two tiers: ``pytest -m "not integration"`` is every module's logic without Ray; ``pytest -m integration``
    is everything that starts Ray. A test joins the second by asking for ``ray_local`` (directly or through
    another fixture) or by its ``integration`` mark."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session (start-up costs ~5 s); 4 logical CPUs on the 2-core machine."""
    import ray

    if not ray.is_initialized():
        # With the dashboard: it serves the State API that Ray Train's placement-group cleaner polls.
        ray.init(num_cpus=4, dashboard_host="127.0.0.1", log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def s3_root(s3_server, request):
    """A fresh s3:// prefix in the test bucket."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)
    return f"s3://{S3_BUCKET}/{name}-{int(time.time() * 1000)}"
