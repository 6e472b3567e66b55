"""The GPU smoke's steps: what each runs, under which timeout, and the key figures read from what it wrote.

Every step is a list of commands run one after another with the step's interpreter; the step fails at the first
command that fails. After its commands, a step's ``figures`` function reads the files they wrote (stdlib only: CSV,
JSON, logs) and returns the key figures plus any problem that fails the step although every command exited 0 (a
run that stopped short of its steps, a CUDA-less torch, ...).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

STEP_NAMES = (
    "environment",
    "gpu-tests",
    "finetune-vit-b-32",
    "large-vit-l-14",
    "vllm-generate",
    "serve-embed",
    "loss-bench",
)
JOB = Path("jobs") / "gpu-smoke.yaml"
B32_STEPS, L14_STEPS = 50, 10  # max_steps of the two training runs (the job's, and the L-14 override)
SERVE_TARGET = 3.0  # batched >= 3x unbatched requests/s at the largest concurrency

L14_OVERRIDES = [
    "train.model.name=ViT-L-14",
    "train.deepspeed.zero_stage=3",
    "train.deepspeed.precision=bf16",
    "train.deepspeed.activation_checkpointing=true",
    f"train.max_steps={L14_STEPS}",
    "train.log_every=5",
    "train.output=train-l14",
    "train.run_name=smoke-l14",
]


def vllm_overrides(model_dir: Path) -> list[str]:
    # The tiny model's settings are tests/generate/test_vllm_engine.py's (head_dim 32, 256-token context, eager mode:
    # no compile or CUDA-graph warm-up for a model this small), in bf16 on a third of the GPU.
    return [
        "generate.engine=vllm",
        f"generate.llm.model={model_dir}",
        "generate.llm.dtype=bfloat16",
        "generate.llm.max_model_len=256",
        "generate.llm.gpu_memory_utilization=0.3",
        "generate.llm.engine_kwargs={enforce_eager: true}",
        "generate.num_gpus_per_actor=1",
        "generate.sampling.max_tokens=24",
        "generate.output=diffs-vllm",
        "generate.rejects=rejects-vllm",
        "generate.resume=false",
    ]


@dataclass
class Command:
    argv: list[str]
    kind: str  # how --dry-run checks it: "pcd-ray" (python -m pcd_ray ...), "script", "pytest" or "check"
    setup: bool = False  # also run by --dry-run: it only writes an input, CPU only


@dataclass
class Step:
    name: str
    timeout_s: int
    commands: list[Command]
    figures: Callable[[Path], tuple[dict, list[str]]]  # (key figures, problems) from the step's directory
    dir: Path  # logs and JSON; emptied before the step runs
    clean: list[Path] = field(default_factory=list)  # also removed first: outputs a re-run would resume from


@dataclass
class Context:
    repo: Path
    workdir: Path
    python: str

    @property
    def job(self) -> Path:
        return self.repo / JOB

    def pcd(self, *args: str) -> Command:
        return Command([self.python, "-m", "pcd_ray", *args], "pcd-ray")

    def check(self, *args: str, setup: bool = False) -> Command:
        return Command([self.python, str(self.repo / "scripts" / "gpu_smoke" / "checks.py"), *args], "check", setup)

    def script(self, path: str, *args: str) -> Command:
        return Command([self.python, str(self.repo / path), *args], "script")


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _num(value, digits: int = 3):
    try:
        return round(float(value), digits)
    except (TypeError, ValueError):
        return None


def pytest_counts(text: str) -> dict[str, int]:
    """{outcome: n} from pytest's final summary line ("3 passed, 1 skipped, 397 deselected in 9.1s")."""
    lines = [
        line
        for line in text.splitlines()
        if re.search(r"\b(passed|failed|error|errors|skipped|deselected)\b", line) and " in " in line
    ]
    if not lines:
        return {}
    return {
        k.rstrip("s") if k == "errors" else k: int(n)
        for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", lines[-1])
    }


def metrics_figures(csv_path: Path, want_steps: int, *, peak: bool) -> tuple[dict, list[str]]:
    """Final loss and throughput of a run from its metrics.csv; the last logged window is the steady one (the
    first also holds DeepSpeed's set-up and the first batches)."""
    rows = _rows(csv_path)
    if not rows:
        return {}, [f"no metrics at {csv_path}"]
    last = rows[-1]
    figures = {
        "steps": int(last["step"]),
        "final_loss": _num(last["loss"], 4),
        "samples_per_s": _num(last["samples_per_s"], 1),
        "data_wait_pct": _num(100 * float(last["data_wait_frac"]), 1),
    }
    problems = []
    if figures["steps"] != want_steps:
        problems.append(f"trained {figures['steps']} steps, not {want_steps}")
    if figures["final_loss"] is None or figures["final_loss"] != figures["final_loss"]:
        problems.append(f"final loss {last['loss']}")
    if peak:
        figures["peak_gpu_mem_gib"] = _num(last.get("peak_gpu_mem_gib"), 2)
        if figures["peak_gpu_mem_gib"] is None:
            problems.append("metrics.csv has no peak_gpu_mem_gib (not a CUDA run?)")
    return figures, problems


def serve_figures(result: dict | None, target: float = SERVE_TARGET) -> tuple[dict, list[str]]:
    if not result or not result.get("points"):
        return {}, ["no serve_embed JSON"]
    by = {(p["mode"], p["clients"]): p for p in result["points"]}
    clients = max(c for _, c in by)
    b, u = by.get(("batched", clients)), by.get(("unbatched", clients))
    if not b or not u:
        return {}, [f"no batched/unbatched pair at {clients} clients"]
    ratio = b["throughput_rps"] / u["throughput_rps"] if u["throughput_rps"] else None
    figures = {
        "clients": clients,
        "batched_rps": _num(b["throughput_rps"], 1),
        "unbatched_rps": _num(u["throughput_rps"], 1),
        "ratio": _num(ratio, 2),
        "target": f">= {target:g}x",
        "target_met": bool(ratio and ratio >= target),
        "errors": sum(p.get("errors", 0) for p in result["points"]),
    }
    problems = [f"{figures['errors']} failed requests"] if figures["errors"] else []
    return figures, problems


def loss_figures(rows: list[dict]) -> tuple[dict, list[str]]:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {}, ["no loss benchmark points" if not rows else f"every point failed: {rows[0].get('error')}"]
    batch = max(r["batch"] for r in ok)
    figures = {"points": len(rows), "failed_points": len(rows) - len(ok), "batch": batch}
    for r in ok:
        if r["batch"] == batch:
            figures[f"{r['variant']}_ms"] = _num(1000 * r["time_s"], 2)
            figures[f"{r['variant']}_peak_mib"] = _num(r["peak_mib"], 1)
    problems = [] if any(r["variant"] == "fused" for r in ok) else ["the fused loss ran at no point"]
    return figures, problems


def build_steps(ctx: Context) -> list[Step]:
    w, job = ctx.workdir, ctx.job
    common = ["--config", str(job), f"storage.root={w}"]
    prepare = ctx.pcd("pipeline", "--only", "data,pairs,generate", *common)  # skips what is up to date

    def environment(d: Path):
        v = _read_json(d / "versions.json") or {}
        gpu = (v.get("gpus") or [{}])[0]
        doctor = _read_json(d / "doctor.json")
        figures = {
            "python": v.get("python"),
            "torch": v.get("torch"),
            "cuda": v.get("torch_cuda"),
            "gpu": gpu.get("name"),
            "gpu_mem_gib": gpu.get("memory_gib"),
            "driver": v.get("driver"),
        }
        problems = [] if v.get("cuda_available") else ["torch sees no CUDA device"]
        if isinstance(doctor, dict) and isinstance(doctor.get("rows"), list):
            bad = [r.get("check") for r in doctor["rows"] if r.get("verdict") not in ("ok", "skip")]
            figures["doctor"] = f"{len(doctor['rows']) - len(bad)}/{len(doctor['rows'])} ok"
            problems += [f"doctor: {name} failed" for name in bad]
        return figures, problems

    def gpu_tests(d: Path):
        counts = pytest_counts(_log_text(d))
        # Not "no skips": a module skipped at collection (an optional package) counts as skipped too.
        ok = counts.get("passed") and not counts.get("failed") and not counts.get("error")
        problems = [] if ok else [f"pytest: {counts or 'no summary'}"]
        return counts, problems

    def finetune(d: Path):
        figures, problems = metrics_figures(w / "train-b32" / "metrics.csv", B32_STEPS, peak=True)
        export = _read_json(d / "export.json") or {}
        figures["export_loads"] = bool(export.get("ok"))
        figures["embed_dim"] = (export.get("text_shape") or [None, None])[-1]
        return figures, problems + ([] if export.get("ok") else ["the export did not load and encode"])

    def large(d: Path):
        return metrics_figures(w / "train-l14" / "metrics.csv", L14_STEPS, peak=True)

    def vllm(d: Path):
        acc = _read_json(d / "accounted.json") or {}
        summary = _read_json(w / "diffs-vllm" / "_summary.json") or {}
        figures = {k: acc.get(k) for k in ("pairs", "diffs", "rejects", "twice", "missing")}
        figures |= {
            "pairs_per_s": _num(summary.get("pairs_per_s"), 1),
            "tokens_per_s": _num(summary.get("tokens_per_s"), 0),
            "engine": summary.get("engine"),
        }
        problems = [] if acc.get("ok") else ["pairs not each in diffs or rejects exactly once"]
        if summary.get("engine") != "vllm":
            problems.append("the diffs were not written by vllm")
        return figures, problems

    def serve(d: Path):
        return serve_figures(_read_json(d / "serve_embed.json"))

    def loss(d: Path):
        path = d / "loss_bench_gpu.jsonl"
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            rows = []
        return loss_figures(rows)

    d = {name: w / name for name in STEP_NAMES}
    tiny = w / "tiny-llm"
    return [
        Step(
            "environment",
            120,
            [
                ctx.check("versions", "--json", str(d["environment"] / "versions.json")),
                ctx.pcd("doctor", *common, "--json", str(d["environment"] / "doctor.json")),
            ],
            environment,
            d["environment"],
        ),
        # The fused loss on CUDA against the float64 CPU oracle (tests/model/test_fused_loss.py), and any other
        # test marked gpu.
        Step(
            "gpu-tests",
            240,
            [
                Command(
                    [ctx.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ctx.repo / "tests")],
                    "pytest",
                ),
            ],
            gpu_tests,
            d["gpu-tests"],
        ),
        Step(
            "finetune-vit-b-32",
            330,
            [
                prepare,
                ctx.pcd("train", *common),
                ctx.check(
                    "export", str(w / "train-b32" / "export"), "--json", str(d["finetune-vit-b-32"] / "export.json")
                ),
            ],
            finetune,
            d["finetune-vit-b-32"],
            [w / "train-b32"],
        ),
        Step(
            "large-vit-l-14",
            330,
            [
                prepare,
                ctx.pcd("train", *common, *L14_OVERRIDES),
            ],
            large,
            d["large-vit-l-14"],
            [w / "train-l14"],
        ),
        Step(
            "vllm-generate",
            300,
            [
                ctx.check("tiny-llm", str(tiny), setup=True),
                ctx.pcd("pipeline", "--only", "data,pairs", *common),
                ctx.pcd("generate", *common, *vllm_overrides(tiny)),
                ctx.check(
                    "accounted",
                    "--root",
                    str(w),
                    "--pairs",
                    "pairs",
                    "--diffs",
                    "diffs-vllm",
                    "--rejects",
                    "rejects-vllm",
                    "--json",
                    str(d["vllm-generate"] / "accounted.json"),
                ),
            ],
            vllm,
            d["vllm-generate"],
        ),
        Step(
            "serve-embed",
            240,
            [
                ctx.script(
                    "benchmarks/serve_embed.py",
                    "--model",
                    "ViT-B-32",
                    "--gpus-per-replica",
                    "0.5",
                    "--concurrency",
                    "1",
                    "32",
                    "--json",
                    str(d["serve-embed"] / "serve_embed.json"),
                ),
            ],
            serve,
            d["serve-embed"],
        ),
        # Two batch sizes at D = 768 (6 points, each a fresh CUDA process) instead of the script's 24: the smoke
        # needs the GPU path of every variant, not the whole curve.
        Step(
            "loss-bench",
            200,
            [
                ctx.script(
                    "benchmarks/loss_bench.py",
                    "--gpu",
                    "--dim",
                    "768",
                    "--batch",
                    "1024",
                    "8192",
                    "--out",
                    str(d["loss-bench"] / "loss_bench.jsonl"),
                ),
            ],
            loss,
            d["loss-bench"],
        ),
    ]


def _log_text(step_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(step_dir.glob("*.log")))
