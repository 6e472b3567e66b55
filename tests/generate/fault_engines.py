"""Engines that fail on purpose, for the generate stage's fault tests (loaded by import path,
``generate.engine=fault_engines:FaultyEngine``, with this directory on PYTHONPATH).

They write the rule engine's texts, and fail as ``PCD_FAULT_MODE`` says, counting tries in files under
``PCD_FAULT_DIR`` so that a fault survives the actor's process (a restarted actor sees what its predecessor did):

- ``transient``: batches whose first pair hashes to 0 mod 4 fail once (retried inside the actor); to 1 mod 4, as
  many times as a batch is tried in one process (``PCD_FAULT_TRIES``), so the actor ends its process and Ray
  restarts it and sends the batch again;
- ``always``: every batch raises;
- ``kill``: the actor SIGKILLs itself in the middle of its second batch, once;
- anything else: no faults.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

from pcd_ray.generate.rule import RuleEngine


def _tries(key: str) -> int:
    """Count one more try of ``key``; returns how many there were before this one (atomic across processes)."""
    directory = Path(os.environ["PCD_FAULT_DIR"])
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        try:
            (directory / f"{key}.{n}").open("x").close()
            return n
        except FileExistsError:
            n += 1


class FaultyEngine(RuleEngine):
    name = "faulty"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mode = os.environ.get("PCD_FAULT_MODE", "")
        self.batches = 0

    def generate(self, batch):
        first = str(batch["pair_id"][0])
        bucket = int(hashlib.sha1(first.encode()).hexdigest(), 16) % 4
        self.batches += 1
        if self.mode == "always":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        if self.mode == "transient":
            limit = {0: 1, 1: int(os.environ.get("PCD_FAULT_TRIES", "2"))}.get(bucket, 0)
            if _tries(f"batch-{first}") < limit:
                raise RuntimeError(f"CUDA out of memory (simulated) on batch {first}")
        if self.mode == "kill" and self.batches == 2 and _tries("kill") == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().generate(batch)
