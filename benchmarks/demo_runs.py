"""The demo as a newcomer runs it: ``pcd-ray demo`` N times, each into a fresh storage root, one after the other.

    python benchmarks/demo_runs.py --runs 3 --out benchmarks/results/demo_runs.json

Per run: the wall time of the whole command, how many lines it printed (stdout and stderr together, as a terminal
shows them) and the widest line, and from the run's ``eval/report.json`` the headline figures: hard-pair difference
accuracy per attribute and zero-shot accuracy per task, base and finetuned. Then the median of each over the runs.
The runs differ only by Ray Data's row order (the job's seeds are fixed), so their spread is the demo's own noise.
Targets on 2 idle cores: under 10 minutes, at most 80 lines, none over 120 columns; the base at >= 90% zero-shot on
every task; the finetuned model >= 90% on hard pairs of every attribute and within 1 point of the base zero-shot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from tier_times import cpu_model  # noqa: E402


def headline(report: dict) -> dict[str, float]:
    """{"<model> hard <attribute>": %, "<model> zero-shot <task>": %} for the base and finetuned models."""
    out = {}
    for name, model in report["models"].items():
        hard = model["difference"]["hard"]
        for attribute, entry in hard["attributes"].items():
            out[f"{name} hard {attribute}"] = round(entry["accuracy"], 1)
        out[f"{name} hard overall"] = round(hard["overall"]["accuracy"], 1)
        for task, entry in model["zeroshot"]["tasks"].items():
            out[f"{name} zero-shot {task}"] = entry["accuracy"]
    return out


def one_run(root: Path, extra: list[str]) -> dict:
    cli = Path(sys.executable).with_name("pcd-ray")
    cmd = [str(cli) if cli.exists() else "pcd-ray", "demo", f"storage.root={root}", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    wall = time.perf_counter() - start
    lines = proc.stdout.splitlines()
    run = {
        "wall_s": round(wall, 1),
        "returncode": proc.returncode,
        "lines": len(lines),
        "widest": max((len(line) for line in lines), default=0),
        "output": proc.stdout.replace(str(root), "<root>"),  # the temporary root says nothing
    }
    report = root / "eval" / "report.json"
    if proc.returncode == 0 and report.exists():
        run["figures"] = headline(json.loads(report.read_text()))
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", help="write the results (each run's output included) as JSON here")
    p.add_argument("--keep", action="store_true", help="keep each run's storage root (printed)")
    p.add_argument("overrides", nargs="*", help="job overrides passed to pcd-ray demo (key=value)")
    args = p.parse_args()

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "load_before": os.getloadavg()[0],
        "overrides": args.overrides,
        "runs": [],
    }
    for i in range(args.runs):
        root = Path(tempfile.mkdtemp(prefix=f"pcd-demo-{i}-"))
        run = one_run(root, args.overrides)
        result["runs"].append(run)
        print(
            f"run {i + 1}: {run['wall_s'] / 60:.1f} min, exit {run['returncode']}, {run['lines']} lines "
            f"(widest {run['widest']})",
            flush=True,
        )
        if args.keep:
            print(f"  kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        if args.out:  # after every run, so an interrupted series keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    done = [r for r in result["runs"] if "figures" in r]
    if done:
        keys = list(done[0]["figures"])
        result["median"] = {
            "wall_s": statistics.median(r["wall_s"] for r in done),
            "lines": statistics.median(r["lines"] for r in done),
            **{k: statistics.median(r["figures"][k] for r in done) for k in keys},
        }
        print(f"\nmedian of {len(done)} runs: {result['median']['wall_s'] / 60:.1f} min")
        width = max(len(k) for k in keys)
        for k in keys:
            values = "  ".join(f"{r['figures'][k]:5.1f}" for r in done)
            print(f"  {k:{width}s}  {values}   median {result['median'][k]:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(max(r["returncode"] for r in result["runs"]))


if __name__ == "__main__":
    main()
