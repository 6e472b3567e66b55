"""The shipped training jobs (jobs/train-*.yaml): they load, DeepSpeed's own config parser accepts what
``engine.deepspeed_config`` makes of them at their worker count, and what their comments and docs/TRAINING.md claim
about batch arithmetic, shared sections and submit lines holds. No Ray, no process group: a few seconds.

DeepSpeed reads the data-parallel world size while parsing (``DeepSpeedConfig(config, mpu=...)`` takes it from the
mpu's ``get_data_parallel_world_size``) but first asks ``deepspeed.comm.get_rank()``, which needs DeepSpeed's comm
backend; initialising that on CPU JIT-compiles a shared-memory op (minutes on a fresh machine), so the test stands in
rank 0 for it instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pcd_ray.config import JOBS_DIR, load_job

REPO = Path(__file__).resolve().parents[2]
TRAIN_JOBS = sorted(JOBS_DIR.glob("train-*.yaml"))
LARGE = JOBS_DIR / "train-large-zero3.yaml"


class _DataParallel:
    """The one mpu method DeepSpeedConfig asks for: how many data-parallel ranks share the global batch."""

    def __init__(self, world: int):
        self.world = world

    def get_data_parallel_world_size(self) -> int:
        return self.world


@pytest.fixture
def parse(monkeypatch):
    """parse(train_cfg, world) -> deepspeed.runtime.config.DeepSpeedConfig of the dict the loop hands DeepSpeed."""
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig

    from pcd_ray.train.engine import deepspeed_config

    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: 0)

    def _parse(cfg, world: int):
        micro = cfg.batch_size // world // cfg.deepspeed.gradient_accumulation_steps  # as train/loop.py computes it
        ds = deepspeed_config(cfg, micro_batch=micro, use_gpu=cfg.scaling.use_gpu)
        # Stating the global batch makes DeepSpeed check micro x accumulation x world == batch itself.
        return DeepSpeedConfig(dict(ds, train_batch_size=cfg.batch_size), mpu=_DataParallel(world))

    return _parse


def test_the_three_training_jobs_ship():
    assert {p.stem for p in TRAIN_JOBS} >= {"train-local", "train-paper-vitl14", "train-large-zero3"}


@pytest.mark.parametrize("path", TRAIN_JOBS, ids=lambda p: p.stem)
def test_deepspeed_accepts_the_job_at_its_worker_count(path, parse):
    import torch

    from pcd_ray.train.engine import client_optimizer

    cfg = load_job(path).train
    world = cfg.scaling.num_workers
    ds = parse(cfg, world)
    assert ds.world_size == world
    assert ds.train_batch_size == cfg.batch_size
    assert ds.train_micro_batch_size_per_gpu * ds.gradient_accumulation_steps * world == cfg.batch_size
    assert ds.gradient_accumulation_steps == cfg.deepspeed.gradient_accumulation_steps
    assert ds.zero_optimization_stage == cfg.deepspeed.zero_stage
    assert ds.bfloat16_config.enabled == (cfg.deepspeed.precision == "bf16")
    assert ds.float16_config.enabled == (cfg.deepspeed.precision == "fp16")
    assert ds.gradient_clipping == (cfg.deepspeed.gradient_clipping or 0.0)
    # Every worker, CPU or GPU, hands DeepSpeed torch's fused Adam: no DeepSpeed op to compile on a GPU node.
    assert ds.optimizer_name is None
    opt = client_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    assert type(opt) is (torch.optim.AdamW if cfg.optimizer.name == "adamw" else torch.optim.Adam)
    assert opt.defaults["fused"] and opt.defaults["lr"] == cfg.optimizer.lr
    assert ds.zero_force_ds_cpu_optimizer is not cfg.deepspeed.offload_optimizer
    offloaded = ds.zero_config.offload_optimizer
    assert (offloaded is not None and offloaded.device == "cpu") == cfg.deepspeed.offload_optimizer


@pytest.mark.parametrize("name", ["train-paper-vitl14", "paper"])
def test_paper_job_is_the_paper_recipe(parse, name):
    job = load_job(name)
    cfg = job.train
    assert (cfg.model.name, cfg.model.pretrained) == ("ViT-L-14", "datacomp_xl_s13b_b90k")
    assert cfg.trainable == "text_transformer" and cfg.batch_size == 512 and cfg.epochs == 20 and cfg.seed == 0
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("adam", 1e-8, 0.0)
    assert (cfg.scheduler.name, cfg.scheduler.gamma, cfg.scheduler.warmup_steps) == ("exponential", 0.9, 0)
    assert (cfg.loss.diff_weight, cfg.loss.clip_weight, cfg.loss.diff_temperature) == (1.0, 0.0, 1.0)
    assert cfg.deepspeed.precision == "fp32" and cfg.deepspeed.gradient_clipping is None  # the authors do not clip
    assert parse(cfg, cfg.scaling.num_workers).gradient_clipping == 0.0
    assert cfg.checkpoint_every and cfg.max_failures > 0
    import torch

    from pcd_ray.train.engine import client_optimizer

    # The authors' torch.optim.Adam: no decoupled decay, no weight decay, default betas and eps.
    opt = client_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    assert type(opt) is torch.optim.Adam
    assert (opt.defaults["weight_decay"], opt.defaults["betas"], opt.defaults["eps"]) == (0.0, (0.9, 0.999), 1e-8)


def test_paper_job_is_the_papers_data_regime_and_tables():
    """jobs/paper.yaml: 1,000 COCO images and every ordered pair among them, the authors' filter and evaluation
    protocol, class comparatives, and every dataset of the paper's tables."""
    job = load_job("paper")
    assert job.data.source == "coco" and job.pairs.num_images == 1000 and job.pairs.num_pairs == 1000 * 999
    assert job.generate.filter == "paper" and job.eval.protocol == "paper"
    assert job.comparatives is not None and job.comparatives.select == "confused"
    kinds = {d.kind for d in job.eval.datasets.values()}
    assert kinds == {"cifar100", "flowers102", "cub", "eurosat", "sun397", "awa2"}
    assert any(d.differences for d in job.eval.datasets.values() if d.kind == "cub")
    assert job.embed is not None and job.embed.model == job.train.model


def test_large_job_is_a_zero3_bf16_full_finetune(parse):
    cfg = load_job(LARGE).train
    assert cfg.trainable == "full" and cfg.image_features == "online" and cfg.embeddings is None
    d = cfg.deepspeed
    assert (d.zero_stage, d.precision, d.activation_checkpointing, d.gradient_clipping) == (3, "bf16", True, 1.0)
    assert (cfg.optimizer.name, cfg.optimizer.weight_decay, cfg.scheduler.name) == ("adamw", 0.1, "cosine")
    assert cfg.scheduler.warmup_steps > 0 and cfg.scaling.use_gpu and cfg.scaling.num_workers == 32
    # The offload fallback its comments show: DeepSpeed puts optimizer states and parameter shards on the CPU.
    off = load_job(LARGE, ["train.deepspeed.offload_optimizer=true", "train.deepspeed.offload_params=true"]).train
    ds = parse(off, off.scaling.num_workers)
    assert ds.zero_config.offload_optimizer.device == "cpu"
    assert ds.zero_config.offload_param.device == "cpu"
    assert ds.zero_optimization_stage == 3


def _sizing_table() -> list[tuple[int, int, int, int, int]]:
    """Rows of the large job's comment table: (GPUs, micro per GPU, accumulation, negatives per loss, nodes)."""
    rows = re.findall(r"^#\s+(\d+)(?: \(default\))?\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", LARGE.read_text(), re.M)
    return [tuple(int(v) for v in r) for r in rows]


def test_large_job_sizing_table_holds_at_8_to_64_gpus(parse):
    table = _sizing_table()
    assert [r[0] for r in table] == [8, 16, 32, 64]
    default = load_job(LARGE).train
    for gpus, micro, accumulation, negatives, nodes in table:
        cfg = load_job(
            LARGE, [f"train.scaling.num_workers={gpus}", f"train.deepspeed.gradient_accumulation_steps={accumulation}"]
        ).train
        assert cfg.batch_size == default.batch_size  # the global batch stays fixed
        assert micro * accumulation * gpus == cfg.batch_size
        assert negatives == micro * gpus  # one micro step across all ranks
        assert nodes * 8 == gpus  # gpu_train nodes hold 8 GPUs each
        ds = parse(cfg, gpus)
        assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (micro, accumulation)
        assert ds.train_batch_size == cfg.batch_size
        if gpus == default.scaling.num_workers:
            assert accumulation == default.deepspeed.gradient_accumulation_steps


def test_train_local_shares_the_demo_artifacts():
    """train-local reads what the demo wrote: every section other than its own train/eval/serve equals
    jobs/local.yaml's, so no stage run with it rewrites the demo's artifacts with other settings."""
    mine, demo = load_job("train-local"), load_job("local")
    for section in ("storage", "ray", "data", "pairs", "generate", "base_train", "embed"):
        assert getattr(mine, section) == getattr(demo, section), section
    t = mine.train
    assert t.output != demo.train.output and t.output not in (mine.eval.output, demo.eval.output)
    assert mine.eval.output != demo.eval.output
    assert (t.scaling.num_workers, t.scaling.cpus_per_worker, t.scaling.use_gpu) == (2, 1, False)
    assert (t.deepspeed.zero_stage, t.deepspeed.gradient_accumulation_steps) == (2, 2)
    assert (t.checkpoint_every, t.keep_checkpoints, t.max_failures) == (50, 2, 2)
    assert (t.trainable, t.loss.clip_weight) == (demo.train.trainable, demo.train.loss.clip_weight)
    assert mine.eval.models["finetuned"].checkpoint == f"{t.output}/export"
    assert mine.serve.model.checkpoint == f"{t.output}/export"


@pytest.mark.parametrize("name", ["train-paper-vitl14", "train-large-zero3"])
def test_gpu_jobs_share_the_coco_generation_artifacts(name):
    mine, gen = load_job(name), load_job("generate-coco-vllm")
    for section in ("storage", "data", "pairs", "generate"):
        assert getattr(mine, section) == getattr(gen, section), section


@pytest.mark.parametrize("path", TRAIN_JOBS, ids=lambda p: p.stem)
def test_precomputed_embeddings_come_from_the_jobs_embed_section(path):
    job = load_job(path)
    if job.train.embeddings is None:
        return
    assert job.embed is not None, "train.embeddings is set but the job has no embed section to write it"
    assert job.embed.output == job.train.embeddings
    assert job.embed.model == job.train.model  # train refuses embeddings of another model
    assert job.train.trainable != "full"


@pytest.mark.parametrize("path", TRAIN_JOBS, ids=lambda p: p.stem)
def test_submit_lines_in_the_job_and_the_training_guide(path):
    line = f"pcd-ray train --config jobs/{path.name}"
    assert line in path.read_text()
    guide = (REPO / "docs" / "TRAINING.md").read_text()
    assert f"ray job submit --working-dir . -- {line}" in guide


def test_workers_hand_deepspeed_torch_fused_adam():
    """CPU and GPU workers: a client optimizer (torch's fused kernel, nothing for DeepSpeed to compile) and no
    "optimizer" section; an ``optimizer`` in ``deepspeed.overrides`` wins (DeepSpeed builds that one)."""
    import torch

    from pcd_ray.config import TrainConfig
    from pcd_ray.train.engine import client_optimizer, deepspeed_config

    cfg = TrainConfig.model_validate({"optimizer": {"name": "adamw", "lr": 3e-5, "weight_decay": 0.1}})
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = client_optimizer(params, cfg)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["fused"] and (opt.defaults["lr"], opt.defaults["weight_decay"]) == (3e-5, 0.1)
    for use_gpu in (False, True):
        assert "optimizer" not in deepspeed_config(cfg, micro_batch=4, use_gpu=use_gpu)
    own = cfg.model_copy(
        update={
            "deepspeed": cfg.deepspeed.model_copy(
                update={"overrides": {"optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}}}}
            )
        }
    )
    assert client_optimizer(params, own) is None
    assert deepspeed_config(own, micro_batch=4, use_gpu=False)["optimizer"]["params"]["torch_adam"] is True
