"""Generate-stage throughput: the Ray Data pipeline against the same engine called directly in a loop.

Both sides get the same pairs and the same engine config and are timed end to end: the direct loop builds the
engine (GenerateActor: engine + paper filter) in this process and calls it batch by batch on the pairs already in
memory; the pipeline is `run_generate` (read the pairs artifact, actor pool, writer tasks, shard commits, final
checks) on an already running local Ray with one engine actor holding the same number of CPU threads. The ratio
pipeline / direct is what the Ray Data machinery costs (or gains) for that engine.

    python benchmarks/generate_throughput.py                      # rule + transformers (tiny random Llama)
    python benchmarks/generate_throughput.py --engines rule --rule-pairs 100000

Engines here are the CPU ones: ``rule`` (ground truth from attributes, microseconds per pair: the worst case for
overhead) and ``transformers`` with a tiny random Llama written offline (tests/generate/tiny_llm.py), generating
``--max-tokens`` tokens per pair. Results go to stdout and benchmarks/results/generate_throughput.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tiny_llm(path: Path) -> str:
    spec = importlib.util.spec_from_file_location("tiny_llm", REPO / "tests" / "generate" / "tiny_llm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write_tiny_llm(path)
    return str(path)


def _direct(job, storage) -> tuple[float, int, float]:
    """(seconds, pairs, seconds of the loop alone) for the engine called in a loop over the pairs table, in this
    process; the first figure includes building the engine (loading the model), the last does not."""
    import numpy as np

    from pcd_ray import artifacts
    from pcd_ray.generate.actor import GenerateActor
    from pcd_ray.generate.job import INPUT_COLUMNS

    table = artifacts.read_table(storage, job.generate.input, "pairs", columns=INPUT_COLUMNS)
    cols = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in INPUT_COLUMNS}
    start = time.perf_counter()
    actor = GenerateActor(job.generate)
    loop_start = time.perf_counter()
    bs, n = job.generate.batch_size, table.num_rows
    for k in range(0, n, bs):
        actor({c: v[k:k + bs] for c, v in cols.items()})
    end = time.perf_counter()
    return end - start, n, end - loop_start


def _pipeline(job, storage) -> tuple[float, int, dict]:
    from pcd_ray.generate.job import run_generate

    start = time.perf_counter()
    summary = run_generate(job, storage)
    return time.perf_counter() - start, summary["processed"], summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="rule,transformers")
    parser.add_argument("--rule-pairs", type=int, default=600_000)
    parser.add_argument("--llm-pairs", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the engine on both sides")
    parser.add_argument("--rule-actors", type=int, default=2,
                        help="pipeline actors for the rule engine: it is single-threaded Python, so where the "
                             "transformers engine fills --threads cores with torch threads in one actor, the "
                             "pipeline fills them with one rule actor per core")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best is kept")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generate_throughput.json"))
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    import ray
    import torch

    from pcd_ray.config import JobConfig
    from pcd_ray.data.pairs import sample_pairs
    from pcd_ray.data.synthetic import make_images
    from pcd_ray.storage import Storage

    torch.set_num_threads(args.threads)
    # Headroom beyond the engine actor's CPUs for the read and write tasks (an actor holding every CPU starves them).
    ray.init(num_cpus=args.threads + 2, dashboard_host="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = []
    with tempfile.TemporaryDirectory(prefix="pcd-bench-") as tmp:
        model = _tiny_llm(Path(tmp) / "tiny-llm") if "transformers" in args.engines else None
        for engine in args.engines.split(","):
            pairs = args.rule_pairs if engine == "rule" else args.llm_pairs
            actors = args.rule_actors if engine == "rule" else 1
            generate = {"engine": engine, "batch_size": 512 if engine == "rule" else 16, "num_actors": actors,
                        "num_cpus_per_actor": args.threads / actors, "resume": False, "commit_every_s": 30}
            if engine != "rule":
                generate |= {"llm": {"model": model, "dtype": "float32"},
                             "sampling": {"temperature": 0.7, "max_tokens": args.max_tokens}}
            job = JobConfig.model_validate({
                "storage": {"root": f"{tmp}/{engine}"},
                "data": {"synthetic": {"num_train": 2000, "num_test": 10, "image_size": 32}},
                "pairs": {"num_pairs": pairs}, "generate": generate})
            storage = Storage(job.storage)
            make_images(job, storage)
            sample_pairs(job, storage)
            direct, pipe = [], []
            for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both sides alike
                direct.append(_direct(job, storage))
                pipe.append(_pipeline(job, storage))
            d_s, d_n, _ = min(direct)
            p_s, p_n, summary = min(pipe, key=lambda r: r[0])
            d_steady = max(d_n / r[2] for r in direct)
            p_steady = max(r[2]["steady_pairs_per_s"] or 0.0 for r in pipe)
            row = {"engine": engine, "pairs": pairs, "threads": args.threads, "pipeline_actors": actors,
                   "direct_pairs_per_s": round(d_n / d_s, 2), "pipeline_pairs_per_s": round(p_n / p_s, 2),
                   "ratio": round((p_n / p_s) / (d_n / d_s), 3),
                   # Steady state: the direct loop without building the engine, the pipeline after its first
                   # finished shard (actors started, models loaded).
                   "direct_steady_pairs_per_s": round(d_steady, 2), "pipeline_steady_pairs_per_s": p_steady,
                   "steady_ratio": round(p_steady / d_steady, 3),
                   "pipeline_first_result_s": [r[2]["first_result_s"] for r in pipe],
                   "direct_s": [round(r[0], 2) for r in direct],
                   "pipeline_s": [round(r[0], 2) for r in pipe], "tokens_per_s": summary["tokens_per_s"]}
            results.append(row)
            print(json.dumps(row), flush=True)
    ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                          "cpu_count": os.cpu_count(), "results": results}, indent=2) + "\n")
    print("\n| engine | pairs | pipeline actors | end to end: direct / pipeline pairs/s (ratio) | "
          "steady state: direct / pipeline pairs/s (ratio) |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['engine']} | {r['pairs']} | {r['pipeline_actors']} | {r['direct_pairs_per_s']} / "
              f"{r['pipeline_pairs_per_s']} ({r['ratio']:.2f}) | {r['direct_steady_pairs_per_s']} / "
              f"{r['pipeline_steady_pairs_per_s']} ({r['steady_ratio']:.2f}) |")


if __name__ == "__main__":
    main()
