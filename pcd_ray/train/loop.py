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
from pathlib import Path
from typing import Any

from pcd_ray.config import StorageConfig, TrainConfig
from pcd_ray.runtime import quiet_worker_logs
from pcd_ray.storage import Storage, join

log = logging.getLogger(__name__)
DS_TAG = "ds"  # DeepSpeed checkpoint tag inside every Ray Train checkpoint directory
POSITION_FILE = "pcd_position.json"  # the data position, readable without DeepSpeed (trainer.resume_position)


def batch_keys(cfg: TrainConfig, precomputed: bool) -> list[str]:
    """The batch columns the model reads: image features or pixels of a (and b), token ids of what the loss uses."""
    a, b = ("emb_a", "emb_b") if precomputed else ("image_a", "image_b")
    keys = [a]
    if cfg.loss.diff_weight:
        keys += [b, "diff_tokens"]
    if cfg.loss.clip_weight:
        keys += ["caption_tokens"]
    return keys


def _rng_states() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def _save_checkpoint(engine, metrics: dict, position: dict, rank: int) -> None:
    """One Ray Train checkpoint: DeepSpeed's own format (model, optimizer and scheduler, each rank its shards) plus
    the data position and every rank's RNG states (client_state), and ``POSITION_FILE`` for the driver.

    position: epoch, step, batches_in_epoch, nan_steps. (Not "skipped_steps": DeepSpeed's own key of that name
    overwrites a client_state key on load.)"""
    import json

    import ray.train
    import torch.distributed as dist

    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, _rng_states())  # DeepSpeed writes client_state from rank 0 only
    with tempfile.TemporaryDirectory(prefix="pcd-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state=position | {"rng": rngs})
        if rank == 0:
            Path(tmp, POSITION_FILE).write_text(json.dumps(position))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _clamp_logit_scale(param, max_scale: float = 100.0, min_scale: float = 1.0) -> None:
    """open_clip's clamp of a learned log-scale to [log min_scale, log max_scale] (CLIP's: scale in [1, 100]), on
    the parameter after the step (never in the graph).

    The optimizer owns an fp32 master copy that overwrites the module's copy after every step, so the master is
    clamped too. ZeRO-3 shards even this one-element parameter (padded to the world size); a clamp is elementwise,
    so each rank clamps its own shard (DeepSpeed's full-parameter setter fails on a parameter smaller than the world).
    Under ZeRO 1-2 the full-parameter accessors are collectives: every rank calls them.
    """
    import math

    import torch
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    if not param.requires_grad:
        return
    lo, hi = math.log(min_scale), math.log(max_scale)
    with torch.no_grad():
        if hasattr(param, "ds_id"):  # ZeRO-3
            safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(lo, hi))
            param.ds_tensor.clamp_(lo, hi)
            return
        master = safe_get_full_fp32_param(param)
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(lo, hi))
        param.clamp_(lo, hi)


def _restore(engine, rank: int, world: int) -> dict[str, Any]:
    """The data position of the latest checkpoint, after loading model, optimizer, scheduler and RNG states."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {"epoch": 0, "step": 0, "batches_in_epoch": 0, "nan_steps": 0, "resumed_from_step": None}
    with ckpt.as_directory() as d:
        _, client_state = engine.load_checkpoint(d, tag=DS_TAG)
    rngs = client_state.pop("rng", None)
    if rngs and len(rngs) == world:  # a different world size has no per-rank state to take over: keep the seeds
        _set_rng_states(rngs[rank])
    log.warning("resumed from %s at epoch %s step %s", ckpt.path, client_state["epoch"], client_state["step"])
    return client_state | {"resumed_from_step": client_state["step"]}


def _export(engine, lm, cfg: TrainConfig, storage: Storage, step: int, rank: int) -> None:
    """``<output>/export`` (and ``<output>/export-wiseft`` when cfg.wise_ft_alpha is set), written by rank 0."""
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from pcd_ray.config import dump
    from pcd_ray.model.export import export_model, wise_ft
    from pcd_ray.model.factory import load_model

    clip = engine.module.clip
    meta = {
        "base": lm.source,
        "step": step,
        "trainable": cfg.trainable,
        "loss": cfg.loss.model_dump(),
        "train_config": dump(cfg),
    }
    # ZeRO-3 shards parameters: gather them on every rank (collective), write from rank 0. No-op for stages 0-2.
    with deepspeed.zero.GatheredParameters(list(clip.parameters()), modifier_rank=None):
        if rank == 0:
            state = {
                k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in clip.state_dict().items()
            }
    # Trained weights from the optimizer's fp32 master copy, not the module's bf16/fp16 one (same values in fp32).
    for name, param in clip.named_parameters():
        if param.requires_grad:
            master = safe_get_full_fp32_param(param)  # a collective under ZeRO-3: every rank, same order
            if rank == 0 and master is not None:
                state[name] = master.detach().float().cpu()
    if rank != 0:
        return
    uri = export_model(state, lm.model_cfg, lm.preprocess_cfg, storage, join(cfg.output, "export"), meta=meta)
    log.warning("exported %s", uri)
    if cfg.wise_ft_alpha is not None:
        torch.manual_seed(cfg.seed)  # the base the run started from (a random init is seeded the same way)
        base = {
            k: v.float() if v.is_floating_point() else v
            for k, v in load_model(cfg.model, storage).model.state_dict().items()
        }
        uri = export_model(
            wise_ft(state, base, cfg.wise_ft_alpha),
            lm.model_cfg,
            lm.preprocess_cfg,
            storage,
            join(cfg.output, "export-wiseft"),
            meta=meta | {"wise_ft_alpha": cfg.wise_ft_alpha},
        )
        log.warning("exported the WiSE-FT average (alpha %s) to %s", cfg.wise_ft_alpha, uri)


def build_module(cfg: TrainConfig, storage: Storage | None = None):
    """(loaded model, the PairEncoder to train): seeded, so every rank starts from the same weights (DeepSpeed also
    broadcasts rank 0's), with the trainable set of ``cfg.trainable`` and, if learned, the difference temperature."""
    import torch

    from pcd_ray.model.factory import load_model
    from pcd_ray.model.pair_encoder import PairEncoder
    from pcd_ray.model.trainable import image_tower_frozen, select_trainable

    torch.manual_seed(cfg.seed)
    lm = load_model(cfg.model, storage)
    select_trainable(lm.model, cfg.trainable)
    module = PairEncoder(lm.model, image_frozen=image_tower_frozen(lm.model))
    if cfg.loss.learn_diff_temperature:  # a module parameter, so DeepSpeed optimises and checkpoints it
        module.register_parameter(
            "diff_logit_scale", torch.nn.Parameter(torch.tensor(math.log(1.0 / cfg.loss.diff_temperature)))
        )
    return lm, module


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. config: {"train": TrainConfig dict, "storage": StorageConfig dict, "rows": int,
    "precomputed": bool (batches hold image embeddings emb_a/emb_b instead of pixels), "run_dir_name": the run
    directory under train.output, where the TensorBoard event files go (without it: train.output itself)}."""
    import ray.train
    import torch

    from pcd_ray.metrics import MetricsWriter
    from pcd_ray.model.loss import compute_loss
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
    lm, module = build_module(cfg, storage)
    module = module.to(device)
    micro = cfg.batch_size // world // cfg.deepspeed.gradient_accumulation_steps
    steps_per_epoch = config["rows"] // cfg.batch_size
    total_steps = min(cfg.max_steps or 1 << 62, steps_per_epoch * cfg.epochs)
    engine = init_engine(
        module,
        cfg,
        micro_batch=micro,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        use_gpu=cfg.scaling.use_gpu,
    )
    torch.manual_seed(cfg.seed * 1000 + rank)  # per-rank streams from here; a resume restores them instead
    state = _restore(engine, rank, world)
    keys = batch_keys(cfg, config["precomputed"])
    # DeepSpeed casts the module to bf16/fp16; pixels must follow (the loss itself computes in fp32).
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision)
    shard = ray.train.get_dataset_shard("train")
    metrics = None
    if rank == 0:
        run_dir = join(cfg.output, config["run_dir_name"]) if config.get("run_dir_name") else cfg.output
        writer = MetricsWriter(run_dir, cfg.metrics, storage, resume_step=state["step"], params=config["train"])
        metrics = MetricsLog(
            storage, cfg.output, resume_step=state["step"], writer=writer, label=config.get("section", "train")
        )
    step, skipped = state["step"], state["nan_steps"]
    window = {"t": time.perf_counter(), "wait": 0.0, "samples": 0, "masked": 0}

    # ---------------------------------------------------------------------------------------------- train
    epoch, position = state["epoch"], state  # position: where a resumed run picks up (epoch, batches into it)
    for epoch in range(state["epoch"], cfg.epochs):
        done_in_epoch = state["batches_in_epoch"] if epoch == state["epoch"] else 0
        # The global order changes every epoch (trainer.py seeds Ray Data's shuffle per epoch); the local buffer
        # mixes neighbouring blocks on top of it.
        batches = shard.iter_torch_batches(
            batch_size=micro,
            drop_last=True,
            device=device,
            local_shuffle_buffer_size=4 * micro,
            local_shuffle_seed=cfg.seed * 1000 + epoch,
        )
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
            feats = engine(
                {k: batch[k].to(dtype) if dtype and batch[k].is_floating_point() else batch[k] for k in keys}
            )
            out = compute_loss(
                feats,
                cfg.loss,
                logit_scale=feats["logit_scale"],
                rank=rank,
                world_size=world,
                diff_logit_scale=feats.get("diff_logit_scale"),
            )
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
            window["masked"] += out["degenerate_pairs"] + out["padded_rows"]  # a tensor: no sync per step
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
            masked = torch.as_tensor(window["masked"], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(masked)  # every rank logs at the same steps
            row = {
                "step": step,
                "epoch": epoch,
                "loss": out["global_loss"].item(),
                "diff_loss": out["diff_loss"].item(),
                "clip_loss": out["clip_loss"].item(),
                "lr": engine.get_lr()[0],
                "samples_per_s": window["samples"] / elapsed,
                "data_wait_frac": window["wait"] / elapsed,
                "skipped_steps": skipped,
                "masked_pairs": int(masked.item()),
                "logit_scale": feats["logit_scale"].exp().item(),
            }
            if device.type == "cuda":  # the most this rank's tensors held at once so far (weights, states, activations)
                row["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            window = {"t": time.perf_counter(), "wait": 0.0, "samples": 0, "masked": 0}
            if metrics:
                metrics.add(row, total_steps)
            if checkpoint_now:  # reports the metrics too: one barrier, not two
                if metrics:
                    metrics.flush()  # the CSV on storage covers at least what the checkpoint does
                _save_checkpoint(
                    engine, row, {"epoch": epoch, "step": step, "batches_in_epoch": b, "nan_steps": skipped}, rank
                )
            else:
                ray.train.report(row)
        # Stopped by max_steps mid-epoch: a longer re-run continues inside this epoch; otherwise at the next one.
        mid_epoch = batch is not None
        position = {
            "epoch": epoch if mid_epoch else epoch + 1,
            "step": step,
            "batches_in_epoch": b if mid_epoch else 0,
            "nan_steps": skipped,
        }
        if step >= total_steps or epoch == cfg.epochs - 1:
            break
        if metrics:
            metrics.flush()
        _save_checkpoint(engine, {"step": step, "epoch": epoch}, position, rank)

    # ---------------------------------------------------------------------------------------------- save
    if metrics:
        metrics.close()
    _save_checkpoint(
        engine,
        {
            "step": step,
            "epoch": epoch,
            "skipped_steps": skipped,
            "final": True,
            "resumed_from_step": state["resumed_from_step"],
        },
        position,
        rank,
    )
    _export(engine, lm, cfg, storage, step, rank)
