"""Joining or starting Ray, the same way for every stage."""

from __future__ import annotations

import logging
import os

from pcd_ray.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join the configured cluster (or RAY_ADDRESS, set by `ray job submit`), else start a local Ray on 127.0.0.1.

    Idempotent: a driver that already called ray.init keeps its instance (tests share one).
    """
    # A local instance binds to 127.0.0.1 only (Ray otherwise picks the external address and all interfaces); Ray
    # reads this when it is imported, so it is set before the first `import ray`.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # The dashboard (127.0.0.1:8265) also serves the State API, which Ray Train's placement-group cleaner polls.
    ray.init(num_cpus=cfg.num_cpus, dashboard_host="127.0.0.1", log_to_driver=True, logging_level=logging.WARNING)
    _quiet_ray_data()


def _quiet_ray_data() -> None:
    """Progress bars in a terminal; in a log (CI, job logs) Ray Data would print a status block every few
    seconds per dataset, so there the stages' own one-line progress is what shows."""
    import sys

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False


def quiet_worker_logs() -> None:
    """Inside Ray workers: keep library INFO chatter (open_clip's model-building steps) out of the job log."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("pcd_ray").setLevel(logging.INFO)
