"""Training throughput: the real Ray Train + DeepSpeed loop against a plain torch.distributed DDP loop.

Both sides train the same ``PairEncoder`` (same model, same trainable parameters, same seed) with the same fused
loss (``compute_loss``), Adam at the same lr, gradient-norm clipping at 1.0, the same micro batch per worker, the
same number of steps, on 2 CPU workers with one torch thread each, gloo, in one run, alternating rounds:

- ``ray-ds``: ``TorchTrainer(pcd_ray.train.loop.train_loop_per_worker)`` -- the loop users run: DeepSpeed ZeRO-1
  engine (engine.py), fp32, a Ray Dataset through ``datasets={"train": ds}`` read with ``get_dataset_shard`` +
  ``iter_torch_batches``, metrics rows and ``ray.train.report`` every ``--log-every`` steps. Its samples/s are read
  from the loop's own metrics.csv (rank 0): global batch x steps after the warm-up / the rows' ``wall_s`` from the
  warm-up row to the last row, so they include the loop's data wait, its metric syncs and its report barriers; the
  data-wait fraction is the rows' ``data_wait_frac`` over the same windows.
- ``ddp``: ``torch.multiprocessing`` spawns 2 processes, gloo, ``DistributedDataParallel`` over the same module,
  ``torch.optim.Adam`` (``fused=True`` as on the Ray side's CPU workers, unless ``--ddp-adam foreach``: torch's
  default), ``clip_grad_norm_(1.0)``, batches sliced from in-memory tensors; timed on rank 0 between
  barriers after the warm-up steps and after the last step.

Warm-up: the first ``--warmup`` optimizer steps (DeepSpeed's and DDP's lazy set-up, Adam's state allocation, Ray
Data's first blocks) are not timed on either side. The data are already-preprocessed columns (precomputed image
embeddings or pixels, token ids) generated from one seed and held in memory on both sides (the Ray side as a
materialized Ray Dataset), so pre-processing is not what is compared.

Besides samples/s each side reports CPU ms per sample: the CPU time of both worker processes (all their threads:
compute, gloo, Ray's and Ray Data's) over the timed steps, read with ``time.process_time`` (the Ray side through a
wrapper around ``ray.train.report`` that records it; the loop itself runs unchanged). Waiting does not count, so it
moves far less than samples/s when other jobs share the machine. Ray starts its workers at niceness 15 (raylet's
``worker_niceness``); the DDP processes run at the same niceness (``--ddp-nice``) so that both sides lose alike to
other processes on a shared machine.

Configurations (``--configs``; each has its own default micro batch, steps, warm-up and log interval):
- ``paper``: ViT-B-32 (random init), ``trainable: text_transformer`` (the paper: only the 12 text blocks train,
  37.8 M parameters), precomputed image embeddings, difference loss only; 32 pairs per worker.
- ``tiny``: pcd-tiny, ``trainable: full`` on 64 px pixels (both towers train, 3.5 M parameters), difference + CLIP
  loss (so the learned logit scale trains and is clamped every step); 64 pairs per worker.

Variants (``--variants``): ``ddp`` and ``ray-ds`` (the comparison); for profiling, ``ray-ddp`` (Ray Train + the same
Ray Data shard, but the plain DDP step instead of DeepSpeed: what Ray costs, apart from DeepSpeed), ``ray-ds0`` (the
real loop at ZeRO stage 0; DeepSpeed 0.19 cannot clip a 0-dim parameter there, so not with ``tiny``),
``ray-ds-tuned`` (the real loop at ZeRO-1 with the DeepSpeed overrides of ``--tuned``), ``ray-ds-stock`` (the real
loop at ZeRO-1 without engine.py's allocator settings for CPU workers: glibc's defaults), ``ray-ds-foreach`` (the
real loop at ZeRO-1 with DeepSpeed's own ``torch_adam`` optimizer, torch's multi-tensor Adam, instead of the fused one
engine.py hands CPU workers).

    python benchmarks/train_throughput.py                      # paper, ddp vs ray-ds, 2 alternating rounds (~5 min)
    python benchmarks/train_throughput.py --micro 8 --steps 16 --warmup 4 --log-every 4 \
        --variants ddp,ray-ds,ray-ddp,ray-ds0                  # where the time goes, at a small batch
    python benchmarks/train_throughput.py --configs tiny --variants ddp,ray-ds,ray-ddp

Results go to stdout (a table) and benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    # micro 32 per worker: half the paper's 64 per worker (batch 512 over 8 GPUs); a step is about 6 s on one core,
    # so 8 steps (2 of warm-up) per run keep the default invocation near 5 minutes.
    "paper": {
        "model": "ViT-B-32",
        "trainable": "text_transformer",
        "precomputed": True,
        "loss": {"diff_weight": 1.0, "clip_weight": 0.0},
        "micro": 32,
        "steps": 8,
        "warmup": 2,
        "log_every": 2,
    },
    "tiny": {
        "model": "pcd-tiny",
        "trainable": "full",
        "precomputed": False,
        "loss": {"diff_weight": 1.0, "clip_weight": 0.5},
        "micro": 64,
        "steps": 16,
        "warmup": 4,
        "log_every": 4,
    },
}
RUN_KEYS = ("micro", "steps", "warmup", "log_every")  # per-config defaults that the command line may override
WORLD = 2
LR = 1e-4
CLIP_NORM = 1.0  # DeepSpeedConfig.gradient_clipping's default


# ---------------------------------------------------------------------------------------------------- shared pieces
def _shapes(name: str) -> tuple[int, int, int]:
    """(embed_dim, context_length, image_size) of an open_clip / pcd-ray model config."""
    import open_clip

    from pcd_ray.model.factory import register_configs

    register_configs()
    cfg = open_clip.get_model_config(name)
    return cfg["embed_dim"], cfg["text_cfg"].get("context_length", 77), cfg["vision_cfg"]["image_size"]


def make_columns(setting: dict, rows: int, seed: int = 0) -> dict:
    """The already-preprocessed training columns the loop reads, as numpy arrays (identical for both sides)."""
    import numpy as np

    dim, ctx, size = _shapes(setting["model"])
    rng = np.random.default_rng(seed)
    cols = {}
    if setting["precomputed"]:
        cols["emb_a"] = rng.standard_normal((rows, dim), dtype=np.float32)
        cols["emb_b"] = rng.standard_normal((rows, dim), dtype=np.float32)
    else:
        cols["image_a"] = rng.standard_normal((rows, 3, size, size), dtype=np.float32)
        cols["image_b"] = rng.standard_normal((rows, 3, size, size), dtype=np.float32)
    # Token ids as open_clip's tokenizer lays them out: SOT, words, EOT (argmax picks it), zero padding.
    tokens = np.zeros((rows, ctx), dtype=np.int64)
    length = rng.integers(4, ctx - 1, size=rows)
    for i, n in enumerate(length):
        tokens[i, 0] = 49406
        tokens[i, 1:n] = rng.integers(1, 49000, size=n - 1)
        tokens[i, n] = 49407
    cols["diff_tokens"] = tokens
    if setting["loss"]["clip_weight"]:
        cols["caption_tokens"] = np.roll(tokens, 1, axis=0)
    return cols


def train_config(setting: dict, args, output: str, zero_stage: int = 1, overrides: dict | None = None) -> dict:
    from pcd_ray.config import TrainConfig

    cfg = TrainConfig.model_validate(
        {
            "model": {"name": setting["model"]},
            "trainable": setting["trainable"],
            "image_features": "precomputed" if setting["precomputed"] else "online",
            "output": output,
            "epochs": 1,
            "max_steps": args.steps,
            "batch_size": setting["micro"] * WORLD,
            "loss": setting["loss"],
            "optimizer": {"name": "adam", "lr": LR},
            "deepspeed": {
                "zero_stage": zero_stage,
                "precision": "fp32",
                "gradient_clipping": CLIP_NORM,
                **({"overrides": overrides} if overrides else {}),
            },
            "scaling": {"num_workers": WORLD, "cpus_per_worker": 1, "torch_threads": 1},
            "log_every": args.log_every,
        }
    )
    return cfg.model_dump(mode="json")


def _ddp_step(ddp, params, opt, batch: dict, cfg, rank: int, world: int) -> None:
    """One plain DDP step: forward, fused loss, backward (bucketed all-reduce overlapped), clip, Adam, clamp."""
    import math

    import torch

    from pcd_ray.model.loss import compute_loss

    feats = ddp(batch)
    out = compute_loss(
        feats,
        cfg.loss,
        logit_scale=feats["logit_scale"],
        rank=rank,
        world_size=world,
        diff_logit_scale=feats.get("diff_logit_scale"),
    )
    if out["skip_step"].item():  # the same check the real loop makes (identical on every rank)
        opt.zero_grad(set_to_none=True)
        return
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
    opt.step()
    opt.zero_grad(set_to_none=True)
    scale = ddp.module.clip.logit_scale
    if scale.requires_grad:
        with torch.no_grad():
            scale.clamp_(0.0, math.log(100.0))


def _adam(params, cfg, kind: str):
    """The DDP sides' Adam: the one engine.client_optimizer gives DeepSpeed (torch's fused kernel), or
    torch's default multi-tensor one with the same hyperparameters."""
    import torch

    from pcd_ray.train.engine import client_optimizer

    if kind == "fused":
        return client_optimizer(params, cfg)
    opt = cfg.optimizer
    return torch.optim.Adam(params, lr=opt.lr, betas=opt.betas, eps=opt.eps)


# ---------------------------------------------------------------------------------------------------- (b) plain DDP
def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, setting: dict, args_dict: dict, result_path: str):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pcd_ray.config import TrainConfig
    from pcd_ray.train.loop import build_module

    os.nice(args_dict["ddp_nice"] - os.nice(0))  # the Ray workers' niceness (see --ddp-nice)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = TrainConfig.model_validate(cfg_dict)
    module = build_module(cfg)[1]  # loop.py's own builder: same seed, same trainable set
    ddp = DDP(module)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = _adam(params, cfg, args_dict["ddp_adam"])
    micro, steps, warmup = setting["micro"], args_dict["steps"], args_dict["warmup"]
    cols = {k: torch.from_numpy(v) for k, v in make_columns(setting, steps * micro * world).items()}
    torch.manual_seed(cfg.seed * 1000 + rank)
    t_start = c_start = None
    for step in range(steps):
        if step == warmup:
            dist.barrier()
            t_start, c_start, s_start, f_start = time.perf_counter(), time.process_time(), os.times().system, _faults()
        lo = (step * world + rank) * micro
        _ddp_step(ddp, params, opt, {k: v[lo : lo + micro] for k, v in cols.items()}, cfg, rank, world)
    dist.barrier()
    elapsed, cpu, sys_s = time.perf_counter() - t_start, time.process_time() - c_start, os.times().system - s_start
    faults = _faults() - f_start
    Path(f"{result_path}.{rank}").write_text(
        json.dumps(
            {
                "samples_per_s": (steps - warmup) * micro * world / elapsed,
                "timed_s": elapsed,
                "cpu_s": cpu,
                "sys_s": sys_s,
                "faults": faults,
                "timed_steps": steps - warmup,
            }
        )
    )
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(setting: dict, args, tmp: str) -> dict:
    import torch.multiprocessing as mp

    from pcd_ray.config import TrainConfig
    from pcd_ray.train.engine import worker_env_vars

    cfg = train_config(setting, args, output="unused")
    result = Path(tmp) / f"ddp-{time.time_ns()}.json"
    # What Ray sets for a 1-CPU worker, and (unless --ddp-env plain) the train workers' own environment: the same
    # process set-up on both sides, as with niceness.
    env = {"OMP_NUM_THREADS": "1"} | (
        worker_env_vars(TrainConfig.model_validate(cfg)) if args.ddp_env == "worker" else {}
    )
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # spawned processes start from it, and their allocator reads it at start
    try:
        mp.spawn(
            _ddp_worker, args=(WORLD, _free_port(), cfg, setting, vars(args), str(result)), nprocs=WORLD, join=True
        )
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ranks = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(WORLD)]
    return {
        "samples_per_s": ranks[0]["samples_per_s"],
        "data_wait_frac": 0.0,
        "timed_s": ranks[0]["timed_s"],
        **cpu_ms_per_sample(ranks, setting["micro"] * WORLD),
    }


def _faults() -> int:
    """This process's minor page faults so far: pages the kernel zero-fills on first touch (a heap still growing,
    or freed memory returned to the OS and faulted in again)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_ms_per_sample(ranks: list[dict], batch: int) -> dict:
    """CPU time (all threads of both worker processes: compute, gloo, Ray's and Ray Data's threads) per sample over
    the timed steps: unlike samples/s, little moved by other jobs on a shared machine (it does not count waiting);
    and the kernel's part of it (page faults of fresh allocations, socket I/O of gloo)."""
    per = ranks[0]["timed_steps"] * batch
    return {
        "cpu_ms_per_sample": round(1000 * sum(r["cpu_s"] for r in ranks) / per, 3),
        "sys_ms_per_sample": round(1000 * sum(r["sys_s"] for r in ranks) / per, 3),
        "page_faults_per_step": round(sum(r["faults"] for r in ranks) / ranks[0]["timed_steps"]),
    }


# ----------------------------------------------------------------------------------------------- (a) Ray Train sides
def _ray_ddp_loop(config: dict) -> None:
    """Ray Train + the Ray Data shard, but the plain DDP step of ``run_ddp`` (profiling variant ``ray-ddp``):
    reports rows shaped like loop.py's (samples_per_s, data_wait_frac, wall_s) into <output>/metrics.csv."""
    import ray.train
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pcd_ray.config import TrainConfig
    from pcd_ray.train.loop import build_module

    cfg = TrainConfig.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.torch_threads)
    module = build_module(cfg)[1]  # loop.py's own builder: same seed, same trainable set
    ddp = DDP(module)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = _adam(params, cfg, config["ddp_adam"])
    micro = cfg.batch_size // world
    keys = config["keys"]
    shard = ray.train.get_dataset_shard("train")
    it = iter(
        shard.iter_torch_batches(
            batch_size=micro, drop_last=True, local_shuffle_buffer_size=4 * micro, local_shuffle_seed=cfg.seed * 1000
        )
    )
    rows, t0 = [], time.perf_counter()
    window = {"t": time.perf_counter(), "wait": 0.0, "samples": 0}
    for step in range(1, cfg.max_steps + 1):
        tw = time.perf_counter()
        batch = next(it)
        window["wait"] += time.perf_counter() - tw
        _ddp_step(ddp, params, opt, {k: batch[k] for k in keys}, cfg, rank, world)
        window["samples"] += micro * world
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - window["t"]
            row = {
                "step": step,
                "samples_per_s": window["samples"] / elapsed,
                "data_wait_frac": window["wait"] / elapsed,
            }
            window = {"t": time.perf_counter(), "wait": 0.0, "samples": 0}
            rows.append(dict(row, wall_s=round(time.perf_counter() - t0, 2)))
            ray.train.report(row)
    if rank == 0:
        import csv

        path = Path(config["metrics_dir"]) / "metrics.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _instrumented_loop(config: dict) -> None:
    """The Ray-side loop (loop.py's or ``_ray_ddp_loop``) with ``ray.train.report`` wrapped to record each rank's
    wall clock and process CPU time at every report (loop.py reports once per logged step), into marks_dir/<rank>.
    Benchmark instrumentation only: the loop itself runs unchanged."""
    import ray.train

    from pcd_ray.train.loop import train_loop_per_worker

    marks, report = [], ray.train.report

    def timed_report(metrics, *a, **k):
        marks.append(
            {
                "step": metrics.get("step"),
                "t": time.perf_counter(),
                "cpu": time.process_time(),
                "sys": os.times().system,
                "faults": _faults(),
            }
        )
        return report(metrics, *a, **k)

    ray.train.report = timed_report
    try:
        (_ray_ddp_loop if config.get("variant") == "ray-ddp" else train_loop_per_worker)(config)
    finally:
        ray.train.report = report
    rank = ray.train.get_context().get_world_rank()
    Path(config["marks_dir"]).mkdir(parents=True, exist_ok=True)
    Path(config["marks_dir"], str(rank)).write_text(json.dumps(marks))


def steady_from_metrics(csv_path: Path, batch: int, warmup: int) -> dict:
    """Steady-state samples/s and data-wait fraction from the loop's metrics rows (rank 0) after ``warmup`` steps.

    samples/s = batch x (last step - warm-up step) / (wall_s at the last row - wall_s at the warm-up row): the time
    between the two rows includes everything the loop does (data wait, syncs, report barriers). The data wait of
    each window is its data_wait_frac times its duration (samples / samples_per_s)."""
    import csv

    rows = [
        {
            k: float(v)
            for k, v in r.items()
            if v not in ("", None) and k in ("step", "wall_s", "samples_per_s", "data_wait_frac")
        }
        for r in csv.DictReader(csv_path.open())
    ]
    start = next(r for r in rows if r["step"] == warmup)
    after = [r for r in rows if r["step"] > warmup]
    prev, wait, window_s = warmup, 0.0, 0.0
    for r in after:
        dur = (r["step"] - prev) * batch / r["samples_per_s"]
        wait += r["data_wait_frac"] * dur
        window_s += dur
        prev = r["step"]
    last = after[-1]
    span = last["wall_s"] - start["wall_s"]
    return {
        "samples_per_s": batch * (last["step"] - warmup) / span,
        "data_wait_frac": wait / window_s,
        "timed_s": span,
        "window_samples_per_s": [round(r["samples_per_s"], 3) for r in after],
    }


def run_ray(setting: dict, args, tmp: str, dataset, variant: str) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pcd_ray.config import StorageConfig, TrainConfig
    from pcd_ray.train.engine import worker_env_vars

    root = Path(tmp) / f"{variant}-{time.time_ns()}"
    zero = 0 if variant == "ray-ds0" else 1
    foreach = {"optimizer": {"type": "Adam", "params": {"lr": LR, "torch_adam": True}}}  # DeepSpeed builds it
    overrides = {"ray-ds-tuned": json.loads(args.tuned), "ray-ds-foreach": foreach}.get(variant)
    cfg = train_config(setting, args, output="train", zero_stage=zero, overrides=overrides)
    tcfg = TrainConfig.model_validate(cfg)
    config = {
        "train": cfg,
        "storage": StorageConfig(root=str(root)).model_dump(mode="json"),
        "rows": args.steps * setting["micro"] * WORLD,
        "precomputed": setting["precomputed"],
    }
    config |= {"variant": variant, "marks_dir": str(root / "marks")}
    if variant == "ray-ddp":
        from pcd_ray.train.loop import batch_keys

        config |= {
            "keys": batch_keys(tcfg, setting["precomputed"]),
            "metrics_dir": str(root / "train"),
            "ddp_adam": args.ddp_adam,
        }
    trainer = TorchTrainer(
        _instrumented_loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=WORLD, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(
            name="bench",
            storage_path=str(root / "ray"),
            worker_runtime_env={"env_vars": {} if variant == "ray-ds-stock" else worker_env_vars(tcfg)},
        ),
        datasets={"train": dataset},
    )
    trainer.fit()
    out = steady_from_metrics(root / "train" / "metrics.csv", setting["micro"] * WORLD, args.warmup)
    ranks = []
    for r in range(WORLD):
        marks = {}
        for m in json.loads((root / "marks" / str(r)).read_text()):
            marks.setdefault(m["step"], m)  # the row's report, not the final checkpoint's (same step, later)
        first, last = marks[args.warmup], marks[args.steps]
        ranks.append(
            {
                "cpu_s": last["cpu"] - first["cpu"],
                "sys_s": last["sys"] - first["sys"],
                "faults": last["faults"] - first["faults"],
                "timed_steps": args.steps - args.warmup,
            }
        )
    return out | cpu_ms_per_sample(ranks, setting["micro"] * WORLD)


def ray_dataset(setting: dict, rows: int):
    """The same columns as a materialized Ray Dataset (already in the object store before training starts)."""
    import ray.data

    cols = make_columns(setting, rows)
    items = [{k: v[i] for k, v in cols.items()} for i in range(rows)]
    return ray.data.from_items(items, override_num_blocks=2 * WORLD).materialize()


# ------------------------------------------------------------------------------------------------------------- main
def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="paper", help=f"comma-separated, of {sorted(CONFIGS)}")
    parser.add_argument(
        "--variants",
        default="ddp,ray-ds",
        help="comma-separated: ddp, ray-ds (the headline pair), ray-ds0, ray-ddp, ray-ds-tuned, "
        "ray-ds-stock, ray-ds-foreach",
    )
    parser.add_argument("--micro", type=int, default=None, help="micro batch per worker (default: per config)")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run, warm-up included (default: per config)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="first steps not timed, a multiple of --log-every (default: per config)",
    )
    parser.add_argument(
        "--log-every", type=int, default=None, help="the Ray loop's metrics/report interval (default: per config)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per variant; best and median kept")
    parser.add_argument(
        "--tuned",
        default='{"zero_optimization": {"overlap_comm": true}}',
        help="DeepSpeed overrides (JSON) of the ray-ds-tuned variant",
    )
    parser.add_argument(
        "--ddp-nice",
        default="ray",
        help="niceness of the DDP processes: 'ray' (default) = that of Ray's worker processes "
        "(raylet's worker_niceness, 15 unless RAY_worker_niceness says otherwise), so that on a "
        "shared machine both sides compete for the cores alike; or a number",
    )
    parser.add_argument(
        "--ddp-env",
        choices=("worker", "plain"),
        default="worker",
        help="environment of the DDP processes: 'worker' (default) = the variables engine.py gives "
        "Ray's CPU train workers (glibc malloc settings), so both sides allocate alike; "
        "'plain' = this shell's",
    )
    parser.add_argument(
        "--ddp-adam",
        choices=("fused", "foreach"),
        default="fused",
        help="Adam of the ddp and ray-ddp variants: 'fused' (default) = the kernel the Ray loop's CPU "
        "workers run (engine.client_optimizer); 'foreach' = torch's default",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.json"))
    args = parser.parse_args()
    runs_args = {}
    for name in args.configs.split(","):
        if name not in CONFIGS:
            parser.error(f"unknown config {name!r}; known: {sorted(CONFIGS)}")
        a = argparse.Namespace(**vars(args))
        for key in RUN_KEYS:
            if getattr(a, key) is None:
                setattr(a, key, CONFIGS[name][key])
        if a.warmup % a.log_every or a.steps <= a.warmup or (a.steps - a.warmup) % a.log_every:
            parser.error(f"{name}: --warmup and --steps - --warmup must be multiples of --log-every")
        runs_args[name] = a

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    variants = args.variants.split(",")
    # 2 logical CPUs for the 2 train workers (1 CPU each) and 1 for Ray Train's controller / Ray Data's split
    # coordinator; the materialized dataset needs no Ray Data tasks while training.
    ray.init(num_cpus=WORLD + 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    ray_nice = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())
    args.ddp_nice = ray_nice if args.ddp_nice == "ray" else int(args.ddp_nice)
    for cargs in runs_args.values():
        cargs.ddp_nice = args.ddp_nice
    print(f"Ray worker niceness {ray_nice}; DDP processes run at niceness {args.ddp_nice}", flush=True)
    results, loads = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="pcd-train-bench-") as tmp:
            for name, cargs in runs_args.items():
                setting = dict(CONFIGS[name], **{k: getattr(cargs, k) for k in RUN_KEYS})
                ds = (
                    ray_dataset(setting, cargs.steps * setting["micro"] * WORLD)
                    if any(v.startswith("ray") for v in variants)
                    else None
                )
                runs: dict[str, list[dict]] = {v: [] for v in variants}
                for rnd in range(args.rounds):
                    # Alternate (and reverse the order every round) so drift on a shared machine hits all alike.
                    order = variants if rnd % 2 == 0 else variants[::-1]
                    for v in order:
                        before = _load()
                        r = run_ddp(setting, cargs, tmp) if v == "ddp" else run_ray(setting, cargs, tmp, ds, v)
                        r |= {"round": rnd, "load_before": before, "load_after": _load()}
                        loads += [before[0], r["load_after"][0]]
                        runs[v].append(r)
                        print(
                            f"[{name}] round {rnd} {v}: {r['samples_per_s']:.2f} samples/s, data wait "
                            f"{100 * r['data_wait_frac']:.1f}%, {r['timed_s']:.1f} s timed, "
                            f"{r['cpu_ms_per_sample']:.1f} CPU ms/sample ({r['sys_ms_per_sample']:.1f} system), "
                            f"{r['page_faults_per_step']} page faults/step, "
                            f"load {before[0]}",
                            flush=True,
                        )
                row = {"config": name, **setting, "global_batch": setting["micro"] * WORLD}
                for v, rs in runs.items():
                    sps = [r["samples_per_s"] for r in rs]
                    cpu = [r["cpu_ms_per_sample"] for r in rs]
                    row[v] = {
                        "best_samples_per_s": round(max(sps), 3),
                        "median_samples_per_s": round(statistics.median(sps), 3),
                        "data_wait_frac": round(max(rs, key=lambda r: r["samples_per_s"])["data_wait_frac"], 4),
                        "best_cpu_ms_per_sample": min(cpu),
                        "best_sys_ms_per_sample": min(r["sys_ms_per_sample"] for r in rs),
                        "runs": rs,
                    }
                if "ddp" in runs:
                    base = row["ddp"]
                    for v in runs:
                        if v != "ddp":
                            r = row[v]
                            r["ratio_best"] = round(r["best_samples_per_s"] / base["best_samples_per_s"], 3)
                            r["ratio_median"] = round(r["median_samples_per_s"] / base["median_samples_per_s"], 3)
                            # CPU-time ratio: DDP's CPU per sample / this one's (> 1: this side is cheaper).
                            r["cpu_ratio"] = round(base["best_cpu_ms_per_sample"] / r["best_cpu_ms_per_sample"], 3)
                results.append(row)
    finally:
        ray.shutdown()
    out = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "args": vars(args),
        "ray_worker_niceness": ray_nice,
        "load_1min_during": [min(loads), max(loads)] if loads else None,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nload average (1 min) during the runs: {out['load_1min_during']}")
    print(
        "\n| config | variant | samples/s best (median) | ratio vs ddp best (median) | data wait | "
        "CPU ms/sample (ratio ddp/this) | of which system |\n|---|---|---|---|---|---|---|"
    )
    for row in results:
        for v in variants:
            r = row[v]
            ratio = f"{r['ratio_best']:.3f} ({r['ratio_median']:.3f})" if "ratio_best" in r else "1"
            cpu_ratio = f" ({r['cpu_ratio']:.3f})" if "cpu_ratio" in r else ""
            print(
                f"| {row['config']} | {v} | {r['best_samples_per_s']:.2f} ({r['median_samples_per_s']:.2f}) | "
                f"{ratio} | {100 * r['data_wait_frac']:.1f}% | {r['best_cpu_ms_per_sample']:.1f}{cpu_ratio} | "
                f"{r['best_sys_ms_per_sample']:.1f} |"
            )


if __name__ == "__main__":
    main()
