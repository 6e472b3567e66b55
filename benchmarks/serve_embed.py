"""POST /v1/embed throughput and latency with dynamic batching on vs off, at 1, 8 and 32 concurrent clients.

    python benchmarks/serve_embed.py                                   # ViT-B-32 text tower, 8 s per point
    python benchmarks/serve_embed.py --model pcd-tiny --duration 5 --concurrency 1 8 32

Starts its own local Ray (127.0.0.1 only) and Serve on a free port, deploys the same model twice side by side
(``serve.batching`` true and false, one replica each with ``--cpus-per-replica``), then for each concurrency level
runs a closed loop of that many clients, each sending one request after another with one unique text (so the text
cache never hits), for ``--duration`` seconds after a warm-up. Prints a Markdown table; ``--json`` writes the figures.
Bounded: (warm-up + duration) x levels x 2 plus ~30 s of start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 only (docs/ENV.md)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def closed_loop(url: str, clients: int, duration: float, warmup: float, tag: str) -> dict:
    """``clients`` workers, each awaiting its response before sending the next request; -> figures of the
    requests that started after the warm-up and finished before the end."""
    import httpx
    import numpy as np

    latencies: list[float] = []
    errors = 0
    t0 = time.perf_counter()
    start, end = t0 + warmup, t0 + warmup + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker(w: int) -> None:
            nonlocal errors
            n = 0
            while True:
                sent = time.perf_counter()
                if sent >= end:
                    return
                n += 1
                body = {"texts": [f"{tag} client {w} request {n}: the first image shows larger shapes"]}
                r = await client.post("/v1/embed", json=body)
                done = time.perf_counter()
                if r.status_code != 200:
                    errors += 1
                elif sent >= start and done <= end:
                    latencies.append(done - sent)

        await asyncio.gather(*(worker(w) for w in range(clients)))
    lat = np.asarray(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": errors,
        "throughput_rps": len(lat) / duration,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
    }


def model_only(model: str, seconds: float = 3.0) -> dict:
    """In-process, one torch thread, no Serve: ms per text for a batch of 1 and of 32 (what batching can save)."""
    import torch

    from pcd_ray.config import ModelSpec
    from pcd_ray.model.factory import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm = load_model(ModelSpec(name=model))
        lm.model.eval()
        out = {}
        for bs in (1, 32):
            texts = [f"model-only text {k}: the first image shows larger shapes" for k in range(bs)]
            lm.encode_texts(texts)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                lm.encode_texts(texts)
                n += 1
            out[f"ms_per_text_batch_{bs}"] = (time.perf_counter() - t0) / n / bs * 1000
        return out
    finally:
        torch.set_num_threads(threads)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip or pcd-ray model name (random init)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each point")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--cpus-per-replica", type=float, default=1, help="the same for both modes")
    parser.add_argument("--gpus-per-replica", type=float, default=0, help="1 on a GPU machine")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from pcd_ray.config import JobConfig, ModelSpec, ServeConfig
    from pcd_ray.serve.app import run_serve
    from pcd_ray.storage import Storage

    results_model_only = model_only(args.model)
    print(json.dumps({"model_only": results_model_only}), file=sys.stderr, flush=True)
    # address="local": always a fresh instance of our own, never another user's cluster on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    results: dict = {
        "model": args.model,
        "max_batch_size": args.max_batch_size,
        "duration_s": args.duration,
        "cpus_per_replica": args.cpus_per_replica,
        "gpus_per_replica": args.gpus_per_replica,
        "cpu_count": os.cpu_count(),
        "model_only": results_model_only,
        "points": [],
    }
    try:
        urls = {}
        for batching in (False, True):
            cfg = ServeConfig(
                model=ModelSpec(name=args.model),
                port=port,
                batching=batching,
                max_batch_size=args.max_batch_size,
                cpus_per_replica=args.cpus_per_replica,
                gpus_per_replica=args.gpus_per_replica,
            )
            name = "batched" if batching else "unbatched"
            urls[name] = run_serve(JobConfig(serve=cfg), Storage(), blocking=False, name=name, route_prefix=f"/{name}")
        for clients in args.concurrency:
            for name, url in urls.items():
                point = asyncio.run(closed_loop(url, clients, args.duration, args.warmup, f"{name}{clients}"))
                point["mode"] = name
                results["points"].append(point)
                print(json.dumps(point), file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    print(
        f"\nPOST /v1/embed, one unique text per request, model {args.model} (random init), one replica per mode "
        f"({args.cpus_per_replica:g} CPU), max_batch_size {args.max_batch_size}, {args.duration:g} s per point\n"
    )
    print("| clients | unbatched req/s | batched req/s | speed-up | unbatched p50 / p99 ms | batched p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    by = {(p["mode"], p["clients"]): p for p in results["points"]}
    for c in args.concurrency:
        u, b = by[("unbatched", c)], by[("batched", c)]
        speedup = b["throughput_rps"] / u["throughput_rps"] if u["throughput_rps"] else float("nan")
        print(
            f"| {c} | {u['throughput_rps']:.1f} | {b['throughput_rps']:.1f} | {speedup:.2f}x | "
            f"{_ms(u['p50_ms'])} / {_ms(u['p99_ms'])} | {_ms(b['p50_ms'])} / {_ms(b['p99_ms'])} |"
        )
    mo = results_model_only
    print(
        f"\nModel only (in-process, 1 thread): {mo['ms_per_text_batch_1']:.2f} ms per text alone, "
        f"{mo['ms_per_text_batch_32']:.2f} ms per text in a batch of 32"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
