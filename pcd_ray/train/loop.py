"""The per-worker train loop (runs inside Ray Train): setup, steps, checkpoints, export.

Reads top to bottom like nanoGPT's step loop. Everything cluster-specific (placement, storage, restarts) is Ray
Train's job; everything numeric is DeepSpeed's and the loss's. Every rank runs every collective: the loss gather,
``ray.train.report`` (a barrier) and ``engine.save_checkpoint``.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from typing import Any

from pcd_ray.config import StorageConfig, TrainConfig
from pcd_ray.runtime import quiet_worker_logs
from pcd_ray.storage import Storage, join

log = logging.getLogger(__name__)
DS_TAG = "ds"  # DeepSpeed checkpoint tag inside every Ray Train checkpoint directory


def _batch_keys(cfg: TrainConfig, precomputed: bool) -> list[str]:
    a, b = ("emb_a", "emb_b") if precomputed else ("image_a", "image_b")
    keys = [a]
    if cfg.loss.diff_weight:
        keys += [b, "diff_tokens"]
    if cfg.loss.clip_weight:
        keys += ["caption_tokens"]
    return keys


def _save_checkpoint(engine, metrics: dict, client_state: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="pcd-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state=client_state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _clamp_logit_scale(param, max_scale: float = 100.0, min_scale: float = 1.0) -> None:
    """open_clip's clamp of a learned log-scale to [log min_scale, log max_scale] (CLIP's: scale in [1, 100]), on
    the parameter after the step (never in the graph).

    Under ZeRO the optimizer owns an fp32 master copy that overwrites the module's copy after every step, so the
    master is clamped too (through DeepSpeed's safe_* accessors, which are collectives: every rank calls them).
    """
    import math

    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    if not param.requires_grad:
        return
    with torch.no_grad():
        master = safe_get_full_fp32_param(param)
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(math.log(min_scale), math.log(max_scale)))
        param.clamp_(math.log(min_scale), math.log(max_scale))


def _restore(engine) -> dict[str, Any]:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {"epoch": 0, "step": 0, "batches_in_epoch": 0}
    with ckpt.as_directory() as d:
        _, client_state = engine.load_checkpoint(d, tag=DS_TAG)
    log.warning("resumed from %s at epoch %s step %s", ckpt.path, client_state["epoch"], client_state["step"])
    return client_state


def _export(engine, lm, cfg: TrainConfig, storage: Storage, step: int, rank: int) -> None:
    import deepspeed

    from pcd_ray.config import dump
    from pcd_ray.model.export import export_model

    clip = engine.module.clip
    # ZeRO-3 shards parameters: gather them on every rank (collective), write from rank 0. No-op for stages 0-2.
    with deepspeed.zero.GatheredParameters(list(clip.parameters()), modifier_rank=None):
        if rank == 0:
            state = {k: v.float() if v.is_floating_point() else v for k, v in clip.state_dict().items()}
            uri = export_model(state, lm.model_cfg, lm.preprocess_cfg, storage, join(cfg.output, "export"),
                               meta={"base": lm.source, "step": step, "trainable": cfg.trainable,
                                     "loss": cfg.loss.model_dump(), "train_config": dump(cfg)})
            log.warning("exported %s", uri)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. config: {"train": TrainConfig dict, "storage": StorageConfig dict, "rows": int,
    "precomputed": bool (batches hold image embeddings emb_a/emb_b instead of pixels)}."""
    import ray.train
    import torch

    from pcd_ray.model.factory import load_model
    from pcd_ray.model.losses import compute_loss
    from pcd_ray.model.pair_encoder import PairEncoder
    from pcd_ray.model.trainable import image_tower_frozen, select_trainable
    from pcd_ray.train.engine import init_engine
    from pcd_ray.train.metrics import MetricsLog

    quiet_worker_logs()
    cfg = TrainConfig.model_validate(config["train"])
    storage = Storage(StorageConfig.model_validate(config["storage"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    device = ray.train.torch.get_device()

    # ---------------------------------------------------------------------------------------------- setup
    torch.manual_seed(cfg.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's weights)
    lm = load_model(cfg.model, storage)
    select_trainable(lm.model, cfg.trainable)
    module = PairEncoder(lm.model, image_frozen=image_tower_frozen(lm.model))
    if cfg.loss.learn_diff_temperature:  # a module parameter, so DeepSpeed optimises and checkpoints it
        module.register_parameter("diff_logit_scale", torch.nn.Parameter(
            torch.tensor(math.log(1.0 / cfg.loss.diff_temperature))))
    module = module.to(device)
    micro = cfg.batch_size // world // cfg.deepspeed.gradient_accumulation_steps
    steps_per_epoch = config["rows"] // cfg.batch_size
    total_steps = min(cfg.max_steps or 1 << 62, steps_per_epoch * cfg.epochs)
    engine = init_engine(module, cfg, micro_batch=micro, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                         use_gpu=cfg.scaling.use_gpu)
    state = _restore(engine)
    torch.manual_seed(cfg.seed * 1000 + rank + state["step"])
    keys = _batch_keys(cfg, config["precomputed"])
    diff_logit_scale = engine.module.diff_logit_scale if cfg.loss.learn_diff_temperature else None
    # DeepSpeed casts the module to bf16/fp16; pixels must follow (the loss itself computes in fp32).
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision)
    shard = ray.train.get_dataset_shard("train")
    metrics = MetricsLog(storage, cfg.output) if rank == 0 else None
    step, skipped = state["step"], state.get("skipped_steps", 0)
    window = {"t": time.perf_counter(), "wait": 0.0, "samples": 0}

    # ---------------------------------------------------------------------------------------------- train
    epoch, position = state["epoch"], state  # position: where a resumed run picks up (epoch, batches into it)
    for epoch in range(state["epoch"], cfg.epochs):
        done_in_epoch = state["batches_in_epoch"] if epoch == state["epoch"] else 0
        batches = shard.iter_torch_batches(batch_size=micro, drop_last=True, device=device,
                                           local_shuffle_buffer_size=4 * micro,
                                           local_shuffle_seed=cfg.seed * 1000 + epoch)
        it, b, batch = iter(batches), 0, None
        while step < total_steps:
            t0 = time.perf_counter()
            batch = next(it, None)
            window["wait"] += time.perf_counter() - t0
            if batch is None:
                break
            b += 1
            if b <= done_in_epoch:  # data position of a mid-epoch resume
                continue
            feats = engine({k: batch[k].to(dtype) if dtype and batch[k].is_floating_point() else batch[k]
                            for k in keys})
            out = compute_loss(feats, cfg.loss, logit_scale=engine.module.clip.logit_scale, rank=rank,
                               world_size=world, diff_logit_scale=diff_logit_scale)
            # skip_step is the same on every rank (read from the gathered losses), so all ranks skip alike and no
            # collective is left waiting.
            if out["skip_step"].item():
                if not cfg.loss.skip_nonfinite:
                    raise FloatingPointError(f"non-finite loss at step {step} (loss.skip_nonfinite=false)")
                skipped += 1
                engine.zero_grad()
                continue
            boundary = engine.is_gradient_accumulation_boundary()  # the micro batch that ends a global batch
            engine.backward(out["loss"])
            engine.step()  # DeepSpeed steps the optimizer (and the LR schedule) only at a boundary
            window["samples"] += micro * world
            if not boundary:
                continue
            _clamp_logit_scale(engine.module.clip.logit_scale)
            if cfg.loss.learn_diff_temperature:
                _clamp_logit_scale(engine.module.diff_logit_scale, min_scale=0.01)
            step += 1
            log_now = step % cfg.log_every == 0 or step == total_steps
            checkpoint_now = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0 and step < total_steps
            if not (log_now or checkpoint_now):
                continue
            elapsed = time.perf_counter() - window["t"]
            row = {"step": step, "epoch": epoch, "loss": out["global_loss"].item(),
                   "diff_loss": out["diff_loss"].item(), "clip_loss": out["clip_loss"].item(),
                   "lr": engine.get_lr()[0], "samples_per_s": window["samples"] / elapsed,
                   "data_wait_frac": window["wait"] / elapsed, "skipped_steps": skipped,
                   "degenerate_pairs": int(out["degenerate_pairs"].item()),
                   "logit_scale": engine.module.clip.logit_scale.exp().item()}
            window = {"t": time.perf_counter(), "wait": 0.0, "samples": 0}
            if metrics:
                metrics.add(row, total_steps)
            if checkpoint_now:  # reports the metrics too: one barrier, not two
                _save_checkpoint(engine, row, {"epoch": epoch, "step": step, "batches_in_epoch": b,
                                               "skipped_steps": skipped})
            else:
                ray.train.report(row)
        # Stopped by max_steps mid-epoch: a longer re-run continues inside this epoch; otherwise at the next one.
        mid_epoch = batch is not None
        position = {"epoch": epoch if mid_epoch else epoch + 1, "step": step,
                    "batches_in_epoch": b if mid_epoch else 0, "skipped_steps": skipped}
        if step >= total_steps or epoch == cfg.epochs - 1:
            break
        _save_checkpoint(engine, {"step": step, "epoch": epoch}, position)

    # ---------------------------------------------------------------------------------------------- save
    _save_checkpoint(engine, {"step": step, "epoch": epoch, "skipped_steps": skipped, "final": True}, position)
    _export(engine, lm, cfg, storage, step, rank)
    if metrics:
        metrics.close()
