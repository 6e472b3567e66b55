"""DeepSpeed for one train worker: its JSON config from ours, the LR schedule, and the engine.

ZeRO partitions the optimizer's state whichever optimizer it wraps; pcd-ray hands it torch's Adam/AdamW with
``fused=True`` as a client optimizer on every worker, CPU or GPU. On GPUs this replaces DeepSpeed's FusedAdam, a CUDA
op that DeepSpeed JIT-compiles with the node's nvcc on the first step (minutes, and refused outright when nvcc's CUDA
major differs from torch's), for a kernel that ships inside torch's wheel; the update rule is the same. On CPU
workers it replaces DeepSpeed's ``torch_adam`` option, torch's multi-tensor Adam, which on ZeRO's one flat partition
allocates several partition-sized temporaries every step where the fused kernel updates it in one pass
(docs/PERFORMANCE.md, "Training"). With ZeRO-Offload the same fused kernel runs on the CPU copy. A ``deepspeed.
overrides`` section named ``optimizer`` still selects one of DeepSpeed's own. The LR schedule is a LambdaLR that
DeepSpeed steps once per optimizer step.
"""

from __future__ import annotations

import math
import os
from typing import Any

from pcd_ray.config import TrainConfig

# glibc's malloc serves a request above its mmap threshold (dynamic, at most 32 MiB) with a fresh mmap and unmaps it
# on free, so the next one faults its pages in again, zero-filled. DeepSpeed's ZeRO optimizer allocates flat buffers
# the size of the model (gradient bucket, partition gradients, Adam's temporaries, all-gather output) every step; DDP
# works per parameter and stays under the threshold. With every size served from the heap and freed memory kept
# there, each step reuses the previous step's pages: ZeRO-1 on 2 CPU workers, micro 8, 49 -> 17 system ms per sample
# and 14% more samples/s (docs/PERFORMANCE.md, "Training"). One arena: gloo's threads would otherwise allocate from
# their own arenas, mmapped heaps of at most 64 MiB, which send large requests back to mmap.
CPU_WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(8 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
    "MALLOC_ARENA_MAX": "1",
}


def worker_env_vars(cfg: TrainConfig) -> dict[str, str]:
    """Environment of the train worker processes (read by the C allocator at process start, so it goes in Ray
    Train's worker runtime env, not os.environ). GPU workers keep their big buffers in CUDA's caching allocator."""
    return {} if cfg.scaling.use_gpu else dict(CPU_WORKER_ENV)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge: ``extra`` wins, sections merge key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: TrainConfig, *, micro_batch: int, use_gpu: bool) -> dict[str, Any]:
    """DeepSpeed's config dict for a per-worker micro batch (global batch = micro * accumulation * workers)."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        # Overlap the gradient reduce with backward, as DDP does with its buckets.
        zero |= {"overlap_comm": True, "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": ds.gradient_clipping or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        # fp16 needs loss scaling; 0 = DeepSpeed's dynamic scaler (halves on overflow, skipping that step).
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        # Offloading asks for DeepSpeed's compiled CPU Adam; the client optimizer's fused kernel runs on the CPU copy.
        config["zero_force_ds_cpu_optimizer"] = False
    return _merge(config, ds.overrides)


def client_optimizer(params, cfg: TrainConfig):
    """The optimizer handed to ``deepspeed.initialize``: torch's fused Adam/AdamW with the config's hyperparameters
    (``adam`` with weight_decay 0 is exactly the paper's torch.optim.Adam), or None when ``deepspeed.overrides``
    brings an ``optimizer`` section (DeepSpeed refuses a client optimizer beside one and builds its own)."""
    import torch

    if "optimizer" in cfg.deepspeed.overrides:
        return None
    opt = cfg.optimizer
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return cls(params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay, fused=True)


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int, total_steps: int):
    """Multiplier of the base lr at optimizer step s (0-based)."""
    sch = cfg.scheduler

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / sch.warmup_steps) if sch.warmup_steps else 1.0
        if sch.name == "exponential":  # the paper: ExponentialLR stepped once per epoch
            return warm * sch.gamma ** (step // max(1, steps_per_epoch))
        if sch.name == "cosine":
            progress = min(1.0, max(0, step - sch.warmup_steps) / max(1, total_steps - sch.warmup_steps))
            return warm * (sch.min_lr_ratio + (1 - sch.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        return warm

    return factor


def init_engine(module, cfg: TrainConfig, *, micro_batch: int, steps_per_epoch: int, total_steps: int, use_gpu: bool):
    """deepspeed.initialize over the module's trainable parameters; returns the engine.

    Ray Train already initialised torch.distributed (gloo on CPU, nccl on GPU); DeepSpeed reuses that group.
    """
    import deepspeed
    import ray.train
    import torch

    ctx = ray.train.get_context()
    # DeepSpeed reads these; Ray Train's torch backend does not set LOCAL_RANK for it.
    os.environ.setdefault("LOCAL_RANK", str(ctx.get_local_rank()))
    os.environ.setdefault("RANK", str(ctx.get_world_rank()))
    os.environ.setdefault("WORLD_SIZE", str(ctx.get_world_size()))
    if cfg.deepspeed.activation_checkpointing:
        # open_clip recomputes each transformer block in backward (torch.utils.checkpoint, non-reentrant, which
        # also works on ZeRO-3's gathered parameters): activation memory drops from per-block to per-tower.
        module.clip.set_grad_checkpointing(True)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"trainable={cfg.trainable!r} leaves no parameter to train")
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=params,
        optimizer=client_optimizer(params, cfg),
        config=deepspeed_config(cfg, micro_batch=micro_batch, use_gpu=use_gpu),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps_per_epoch, total_steps)),
        dist_init_required=False,
    )
    return engine
