"""Wall time of the two test tiers, each in its own pytest process, one after the other.

    python benchmarks/tier_times.py --out benchmarks/results/tier_times.json

The fast tier (``pytest -m "not integration"``) is every module's logic without Ray; the integration tier
(``pytest -m integration``) is everything that starts Ray or runs the CLI end to end. Targets on 2 idle cores: the
fast tier under 2 minutes, the integration tier under 10. Each run records its wall time (pytest's own start-up and
collection included), pytest's summary line, and the machine (cores, CPU model, load average before it started):
timings on a shared machine are not comparable with idle ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIERS = {"fast": "not integration", "integration": "integration"}
TARGET_S = {"fast": 120, "integration": 600}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_tier(marker: str, extra: list[str]) -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if re.search(r"\b(passed|failed|error)", ln)]
    return {
        "command": f'pytest -m "{marker}"',
        "wall_s": round(wall, 1),
        "returncode": proc.returncode,
        "summary": lines[-1].strip("= ") if lines else "",
        "load_before": load,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiers", nargs="+", choices=list(TIERS), default=list(TIERS))
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = p.parse_args()

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "tiers": {},
    }
    for tier in args.tiers:
        result["tiers"][tier] = run_tier(TIERS[tier], args.pytest_args)
        r = result["tiers"][tier]
        print(f"{tier:12s} {r['wall_s']:8.1f} s  (target {TARGET_S[tier]} s)  {r['summary']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(max(r["returncode"] for r in result["tiers"].values()))


if __name__ == "__main__":
    main()
