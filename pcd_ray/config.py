"""Typed configs: one per stage, all held by one job file (``jobs/*.yaml``).

A job file is YAML whose top-level keys are the stage sections below. Command-line overrides use one syntax,
``a.b.c=value`` (the value is parsed as YAML, so ``1e-4``, ``true``, ``null`` and ``[1, 2]`` work). Unknown or
misspelled keys and wrong types fail at load time with an error naming the dotted key path and the file.

Relative URIs in any config (``images``, ``train/export``) resolve against ``storage.root``; see ``storage.py``.
This module imports only pydantic and yaml: ``pcd-ray --help`` and config loading never load torch or ray.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"
DEFAULT_JOB = "local"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the dotted key path."""


class _Strict(BaseModel):
    # extra="forbid" is what turns a typo into an error instead of a silently ignored key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------- shared pieces
class S3Config(_Strict):
    endpoint_url: str | None = None
    """S3-compatible endpoint; null uses AWS_ENDPOINT_URL from the environment, then AWS's default."""
    region: str | None = None
    """Region name; null uses AWS_DEFAULT_REGION / AWS_REGION, then us-east-1."""
    anon: bool = False
    """Unsigned requests (public buckets). Credentials always come from the AWS chain, never from this file."""


class StorageConfig(_Strict):
    root: str = "./runs/local"
    """Where relative artifact URIs live: a local path or s3://bucket/prefix."""
    s3: S3Config = Field(default_factory=S3Config)


class RayConfig(_Strict):
    address: str | None = None
    """Cluster to join ("auto", "ray://host:10001"); null joins RAY_ADDRESS if set (ray job submit) or starts a local
    Ray."""
    num_cpus: int | None = None
    """Logical CPUs of a local Ray (only when starting one). More than the cores lets data and train overlap."""


class ModelSpec(_Strict):
    """Which network and which weights: an open_clip name + pretrained tag, or an export made by pcd-ray."""

    name: str = "pcd-tiny"
    """open_clip model name (ViT-L-14, ...) or a pcd-ray registered config (pcd-tiny)."""
    pretrained: str | None = None
    """open_clip pretrained tag (datacomp_xl_s13b_b90k) or a weights file; null = random init."""
    checkpoint: str | None = None
    """URI of a pcd-ray export (directory with open_clip_config.json); overrides name and pretrained."""


# ------------------------------------------------------------------------------------------------------ data stages
class SyntheticConfig(_Strict):
    num_train: int = Field(8000, ge=1)
    """Images of split "train" (ids syn-train-000000, ...)."""
    num_test: int = Field(1000, ge=1)
    """Images of split "test", drawn independently of num_train (ids syn-test-000000, ...)."""
    image_size: int = Field(64, ge=16)
    """Side of the square images in pixels; at 64 the smallest shapes keep a >= 4 px radius."""
    seed: int = Field(0, ge=0)
    """Image i of a split is drawn from numpy's default_rng([seed, split, i]): any shard reproduces alone."""
    rows_per_shard: int = Field(2000, ge=1)
    """Images per Ray Data block (one render task each) and the minimum rows per Parquet file."""


class CocoConfig(_Strict):
    """COCO captions: the annotations JSON (captions_train2014.json) and the folder of its images."""

    annotations: str
    """URI of the captions JSON (images[] with id/file_name, annotations[] with image_id/caption)."""
    images: str
    """URI of the image folder the JSON's file_name values are relative to (train2014/)."""
    split: str = "train"
    """Split name written on every row."""
    caption: Literal["first", "random"] = "first"
    """Which of an image's captions (COCO has about five): the one with the lowest annotation id, or a seeded pick."""
    seed: int = 0


class WebDatasetConfig(_Strict):
    """webdataset tar shards as img2dataset writes them: <key>.jpg (or png/webp), <key>.txt, <key>.json."""

    shards: str | list[str]
    """URI(s) of .tar shards: a directory, a glob (s3://b/shards/*.tar) or a brace range ({00000..00099}.tar)."""
    split: str = "train"
    caption_member: str = "txt"
    """Member extension holding the caption."""
    image_members: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"], min_length=1)
    """Member extensions tried, in order, for the image."""


class ParquetSourceConfig(_Strict):
    """Parquet rows with a caption and either image bytes or an image URI."""

    paths: str | list[str]
    """URI(s) of Parquet files or directories."""
    caption_column: str = "caption"
    image_column: str | None = "image"
    """Binary column of encoded image bytes (or a struct with a ``bytes`` field, as Hugging Face datasets store
    images); null when ``uri_column`` is used."""
    uri_column: str | None = None
    """Column of image URIs (absolute, or relative to ``uri_root``), read by the workers."""
    uri_root: str | None = None
    id_column: str | None = None
    """Column of unique image ids; null = derived from the URI, or the sha1 of the image bytes."""
    split: str = "train"
    split_column: str | None = None
    """Column holding each row's split; null = ``split`` for every row."""

    @model_validator(mode="after")
    def _one_image_source(self):
        if (self.image_column is None) == (self.uri_column is None):
            raise ValueError("set exactly one of image_column and uri_column")
        return self


class FolderConfig(_Strict):
    """A folder of images plus a captions file (CSV, TSV or JSON lines) naming each image's file and caption."""

    root: str
    """URI of the image folder."""
    captions: str
    """URI of the captions file: .csv, .tsv or .jsonl."""
    file_column: str = "file_name"
    """Column with each image's path relative to ``root``."""
    caption_column: str = "caption"
    split: str = "train"
    split_column: str | None = None


class CubConfig(_Strict):
    """CUB-200-2011 images with the Reed et al. captions (ten per image), e.g. as ``pcd-ray fetch cub`` lays them
    out: the paper's CUB difference-accuracy set goes through pairs and generate from these."""

    root: str
    """URI of the folder holding CUB_200_2011/ (images.txt, train_test_split.txt, images/) and the captions
    (cvpr2016_cub/text_c10/<class>/<image>.txt)."""
    split: Literal["train", "test"] = "test"
    """CUB's own split (train_test_split.txt); the split name written on every row."""
    caption: Literal["first", "random"] = "first"
    """Which of an image's ten captions: the first line of its file, or a seeded pick."""
    seed: int = 0


class DataConfig(_Strict):
    source: Literal["synthetic", "coco", "cub", "webdataset", "parquet", "folder"] = "synthetic"
    """Where images come from: synthetic (procedural shapes with known attributes), or a real image-caption
    dataset read by Ray Data (the section of the same name)."""
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    coco: CocoConfig | None = None
    cub: CubConfig | None = None
    webdataset: WebDatasetConfig | None = None
    parquet: ParquetSourceConfig | None = None
    folder: FolderConfig | None = None
    output: str = "images"
    """URI of the images artifact written."""
    rejects: str = "image_rejects"
    """URI of the artifact listing every input row not written to ``output``, with its reason."""
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(8192 * 8192, ge=1)
    """Images over either limit are rejected (decompression bombs), checked before decoding pixels."""
    min_image_side: int = Field(16, ge=1)
    """Images whose smaller side is below this many pixels are rejected (``image_too_small``): thumbnails,
    tracking pixels and placeholders carry nothing a CLIP model can learn from."""
    max_caption_chars: int = Field(1000, ge=1)
    """Captions longer than this (after whitespace runs become one space) are rejected (``caption_too_long``):
    COCO captions are about 50 characters, so a longer one is scraped page text, not a description."""
    rows_per_task: int = Field(1000, ge=1)
    """Rows per Ray task that fetches and checks images (one webdataset shard is always one task)."""

    @model_validator(mode="after")
    def _source_section(self):
        if self.source != "synthetic" and getattr(self, self.source) is None:
            raise ValueError(f"data.source is {self.source!r} but there is no data.{self.source} section")
        return self


class PairsConfig(_Strict):
    input: str = "images"
    """URI of the images artifact read."""
    output: str = "pairs"
    """URI of the pairs artifact written."""
    split: str = "train"
    """Only images of this split are paired (test images stay unseen for evaluation)."""
    num_images: int | None = Field(None, ge=2)
    """Sample this many images first, as the paper does (1000); null pairs among all images of the split."""
    num_pairs: int = Field(20000, ge=1)
    """Budget: ordered pairs (i, j), i != j, without duplicates, spread evenly over the images as first image;
    an error if above n(n-1) of the n images."""
    max_pairs_per_image: int | None = Field(None, ge=1)
    """Cap on the pairs an image is the first image of (as second image it appears as often on average); the
    pairs written are min(num_pairs, n * cap). null = no cap beyond the budget."""
    seed: int = 0
    """Seed of the image sample and the pair draw (pair ids do not depend on it)."""
    anchors_per_task: int = Field(4096, ge=1)
    """First images per Ray task drawing pairs: fixed, so the pairs depend on the seed, not on the cluster."""


class SamplingConfig(_Strict):
    """Sampling parameters of the LLM engines (vLLM's SamplingParams / transformers' generate kwargs)."""

    temperature: float = Field(0.7, ge=0)
    """0 = greedy."""
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    max_tokens: int = Field(128, ge=1)
    """New tokens per pair; the paper's texts are one or two sentences."""
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = None
    """Per-request seed; null = generate.seed. A pair's seed mixes in its pair id, so output is batch-independent
    where the engine supports per-request seeds (vLLM)."""


class LLMConfig(_Strict):
    """Which LLM the transformers / vLLM engines load, and how."""

    model: str = "meta-llama/Llama-2-13b-chat-hf"
    """Hub id or local directory (the paper used LLaMA-2-13B-chat)."""
    tokenizer: str | None = None
    """Hub id or directory of the tokenizer; null = model."""
    revision: str | None = None
    chat_template: Literal["auto", "always", "never"] = "auto"
    """Wrap the prompt in the tokenizer's chat template: auto = when the tokenizer has one (instruct models)."""
    system_prompt: str | None = None
    """System message for chat templates; null = none."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM: GPUs per engine (one actor holds them all)."""
    max_model_len: int | None = Field(None, ge=16)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """vLLM: fraction of each GPU the engine may take."""
    trust_remote_code: bool = False
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed through to vllm.LLM(...) / AutoModelForCausalLM.from_pretrained(...) as is."""


class FaultConfig(_Strict):
    """How the generate stage rides out engine faults (a CUDA error, an out-of-memory, a dead vLLM engine): a
    faulted batch is never committed as rejects; it is retried, and a job whose retries run out stops with an
    error naming the engine and the cause, keeping everything committed before."""

    batch_attempts: int = Field(3, ge=1)
    """Tries of one batch inside an actor, the engine recovered (rebuilt) between tries."""
    backoff_s: float = Field(1.0, ge=0)
    """Wait before the second try of a batch, doubling for each further one."""
    actor_restarts: int = Field(2, ge=0)
    """After a batch's tries run out the actor's process exits (a CUDA error poisons it for good) and Ray restarts
    it, loading the engine afresh, at most this many times per actor."""
    batch_retries: int = Field(2, ge=0)
    """Times Ray Data sends a batch again after the actor running it died (a fault past its tries, a crash, a kill)."""


class GenerateConfig(_Strict):
    input: str = "pairs"
    """URI of the pairs artifact read."""
    output: str = "diffs"
    """URI of the diffs artifact written (kept texts)."""
    rejects: str = "rejects"
    """URI of the rejects artifact written (every dropped output, with its reason)."""
    engine: str = "rule"
    """Which engine writes the difference text: rule (ground truth from the synthetic set's attributes),
    transformers (any causal LM, CPU or GPU), vllm (GPU, continuous batching, tensor parallel), or your own as
    ``package.module:ClassName`` (a class implementing pcd_ray.generate.base.Engine, importable on every node)."""
    llm: LLMConfig = Field(default_factory=LLMConfig)
    """The LLM of the transformers and vllm engines (ignored by rule)."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    prompt_version: str = "paper-v1"
    """Key of generate/prompts.py PROMPTS; recorded in every diffs row."""
    batch_size: int = Field(256, ge=1)
    """Pairs per engine call (one Ray Data batch); vLLM batches continuously inside a call."""
    num_actors: int = Field(1, ge=1)
    """Size of the fixed Ray Data actor pool running the engine (one engine per actor)."""
    num_gpus_per_actor: float | None = Field(None, ge=0)
    """GPUs each actor reserves; null = llm.tensor_parallel_size for vllm, 0 otherwise."""
    num_cpus_per_actor: float = Field(1, gt=0)
    batches_in_flight: int = Field(8, ge=1)
    """Engines with an async interface (vLLM): batches each actor keeps in its engine at once, so the engine stays
    full across batch boundaries instead of draining at the end of each. Others run one batch at a time."""
    faults: FaultConfig = Field(default_factory=FaultConfig)
    resume: bool = True
    """Re-running skips pairs already committed to diffs or rejects by the same generation settings; false starts
    over. Settings that change the text (engine, llm, sampling, prompt, seed, filter, input) always start over."""
    commit_every_s: float = Field(30.0, ge=0)
    """How often finished shards are committed to the output manifests: the most work a kill can lose."""
    seed: int = 0
    """Seed of the rule engine's wording choice and the LLM sampling (stable per pair id)."""
    filter: Literal["strict", "paper"] = "strict"
    """Which rules keep an LLM output: strict (pcd-ray's) or paper (the authors' filter script, rule for rule);
    docs/GENERATION.md lists both with their reject rates on the same outputs."""

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        if v not in ("rule", "transformers", "vllm") and ":" not in v:
            raise ValueError(f"unknown engine {v!r}: rule, transformers, vllm, or package.module:ClassName")
        return v


# ---------------------------------------------------------------------------------------------------- comparatives
class ComparativesConfig(_Strict):
    """The comparatives stage: for the evaluation sets' class pairs, a sentence on how class i differs from class j,
    written by the generate section's engine with its sampling and filter (comparative prompting and the difference
    distances in eval read them). The rule engine words only the synthetic set's classes; real datasets' classes
    need an LLM engine."""

    output: str = "comparatives"
    """URI of the comparatives artifact written (dataset, class_i, class_j, i, j, text, raw, engine, prompt_version,
    pair_id); eval.comparatives reads it."""
    rejects: str = "comparative_rejects"
    """URI of the artifact of every dropped answer, with its reason."""
    datasets: list[str] | None = Field(None, min_length=1)
    """Names of eval.datasets, and ``synthetic`` for the synthetic set's tasks (needs eval.images), to write
    comparatives for; null = every set eval evaluates, skipping those the engine cannot describe (named ones are an
    error instead)."""
    select: Literal["all", "confused"] = "all"
    """all: every ordered class pair; confused: the ``num_pairs`` pairs the first model of eval.models confuses most
    on each set's evaluated images (zero-shot, the paper's template), in both orders (the paper's choice)."""
    num_pairs: int = Field(3, ge=1)
    """Class pairs per set when select is confused (the paper: 3)."""
    prompt_version: str = "class-v1"
    """Key of the class-pair prompt (generate/prompts.py CLASS_PROMPTS); recorded in every row."""


# ----------------------------------------------------------------------------------------------------------- train
class LossConfig(_Strict):
    diff_weight: float = Field(1.0, ge=0)
    """Weight of the paper's difference loss."""
    clip_weight: float = Field(0.0, ge=0)
    """Weight of the ordinary image-caption CLIP loss (not in the paper; keeps zero-shot from drifting)."""
    diff_temperature: float = Field(1.0, gt=0)
    """tau of the difference logits t @ d.T / tau (the paper fixes 1.0); the initial value when learned."""
    learn_diff_temperature: bool = False
    """Learn the difference log-scale (initialised at log(1/diff_temperature), clamped to [1/100, 100] after each
    optimizer step, like CLIP's). Not in the paper."""
    clip_temperature: float | None = Field(None, gt=0)
    """Fixed tau of the CLIP group; null = the model's learned logit_scale (open_clip's setting)."""
    near_duplicate_distance: float = Field(1e-6, ge=0)
    """Pairs with |normalise(e_a) - normalise(e_b)| below this are masked (no direction) and counted."""
    impl: Literal["fused", "reference"] = "fused"
    """fused: one packed all-gather, chunked LSEs, no [n, N] logits (docs/LOSS.md); reference: per-group gather with
    gradient and full logits (the float64 test oracle)."""
    chunk_size: int = Field(1024, ge=16)
    """fused: edge of the logit tiles; loss memory grows with its square, not with the global batch."""
    gather_dtype: Literal["fp32", "bf16"] = "fp32"
    """fused: dtype of the feature all-gather (bf16 halves the bytes; logits and LSEs stay fp32)."""
    skip_nonfinite: bool = True
    """Skip (and count) a step whose global loss is NaN/Inf, as the paper does; false = stop with an error."""

    @model_validator(mode="after")
    def _some_loss(self) -> LossConfig:
        if self.diff_weight == 0 and self.clip_weight == 0:
            raise ValueError("diff_weight and clip_weight are both 0: nothing to train")
        return self


class OptimizerConfig(_Strict):
    name: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


class SchedulerConfig(_Strict):
    name: Literal["constant", "exponential", "cosine"] = "constant"
    gamma: float = Field(0.9, gt=0, le=1)
    """exponential: lr multiplier per epoch (the paper: 0.9)."""
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """cosine: final lr as a fraction of the peak."""


class DeepSpeedConfig(_Strict):
    """What DeepSpeed does with the model (engine.py turns it into DeepSpeed's own JSON config)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """0: plain data parallel; 1: optimizer states sharded; 2: + gradients; 3: + parameters (ViT-H/bigG full)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Weights and activations; the loss always computes in fp32. fp16 uses DeepSpeed's dynamic loss scaling."""
    gradient_clipping: float | None = 1.0
    """Global gradient-norm clip; null = none."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro batches per optimizer step; batch_size stays the global batch (micro = batch / workers / this)."""
    offload_optimizer: bool = False
    """ZeRO 1-3: keep optimizer states (and the fp32 master weights) in CPU memory."""
    offload_params: bool = False
    """ZeRO-3 only: keep the parameter shards in CPU memory between uses."""
    activation_checkpointing: bool = False
    """Recompute the towers' transformer blocks in backward (open_clip's set_grad_checkpointing)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Merged last into DeepSpeed's config (nested keys merge), for any DeepSpeed setting not named above, e.g.
    {zero_optimization: {reduce_bucket_size: 5.0e+8}}; see deepspeed.ai/docs/config-json."""

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3 (only ZeRO-3 shards parameters)")
        return self


class ScalingConfig(_Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    torch_threads: int | None = None
    """torch intra-op threads per worker; null keeps Ray's default (OMP_NUM_THREADS = the worker's CPUs)."""


class MetricsConfig(_Strict):
    """Where metrics go besides metrics.csv (pcd_ray/metrics.py): TensorBoard event files in the run directory by
    default; W&B and MLflow as well when named here (optional packages: ``pip install wandb`` / ``pip install mlflow``,
    checked when the job starts)."""

    tensorboard: bool = True
    """TensorBoard event files in the run directory (``tensorboard --logdir <run dir>``)."""
    wandb_project: str | None = None
    """A W&B project to log to as well; null = no W&B."""
    wandb_entity: str | None = None
    """The W&B team or user owning the project; null = the logged-in user's default."""
    mlflow_experiment: str | None = None
    """An MLflow experiment to log to as well; null = no MLflow."""
    mlflow_tracking_uri: str | None = None
    """The MLflow tracking server; null = MLflow's own default (MLFLOW_TRACKING_URI, else ./mlruns)."""
    run_name: str | None = None
    """The run's name in W&B and MLflow; null = the run directory's name."""

    @model_validator(mode="after")
    def _sink_named(self) -> MetricsConfig:
        if self.wandb_entity and not self.wandb_project:
            raise ValueError("metrics.wandb_entity is set but metrics.wandb_project is not (W&B logs to a project)")
        if self.mlflow_tracking_uri and not self.mlflow_experiment:
            raise ValueError("metrics.mlflow_tracking_uri is set but metrics.mlflow_experiment is not")
        return self


class TrainConfig(_Strict):
    model: ModelSpec = Field(default_factory=ModelSpec)
    trainable: Literal["text_transformer", "text", "full"] = "text_transformer"
    """text_transformer = the paper (text blocks only); text = whole text tower; full = both towers."""
    image_features: Literal["auto", "online", "precomputed"] = "auto"
    """online: the image tower runs on pixels every step; precomputed: it embeds every image once before training
    (only valid while it is frozen); auto: precomputed exactly when ``trainable`` freezes the image tower (the
    paper)."""
    data: Literal["pairs", "captions"] = "pairs"
    """pairs: pairs + diffs (+ image-caption rows from image A); captions: image-caption rows only (base
    pretraining)."""
    images: str = "images"
    pairs: str = "pairs"
    diffs: str = "diffs"
    output: str = "train"
    """Run directory: Ray Train checkpoints under it, the final model under <output>/export."""
    run_name: str = "pcd"
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(128, ge=2)
    """Global batch (pairs per step across all workers), the paper's B."""
    seed: int = 0
    loss: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    log_every: int = Field(20, ge=1)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    """Where the rows of metrics.csv go as well: TensorBoard (default), W&B, MLflow."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Steps between checkpoints (an epoch-end checkpoint is always written)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Ray Train keeps this many latest checkpoints and deletes older ones."""
    max_failures: int = Field(0, ge=-1)
    """Ray Train restarts the worker group this many times after a worker dies (-1: forever), from the last
    checkpoint."""
    embeddings: str | None = None
    """URI of an ``embeddings`` artifact written by ``pcd-ray embed`` with this run's model; used when image
    features are precomputed. null = embed the images at the start of training instead."""
    wise_ft_alpha: float | None = Field(None, ge=0, le=1)
    """Also export the WiSE-FT average alpha * finetuned + (1 - alpha) * base to <output>/export-wiseft
    (docs/METHOD.md, "Training recipe"); null = no averaged export."""

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        if self.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by scaling.num_workers {self.scaling.num_workers}"
            )
        if self.image_features == "precomputed" and self.trainable == "full":
            raise ValueError("image_features=precomputed needs a frozen image tower, but trainable=full trains it")
        if self.data == "captions" and self.loss.diff_weight:
            raise ValueError("data=captions has no difference texts: set loss.diff_weight=0")
        return self


# ----------------------------------------------------------------------------------------------------------- embed
class EmbedConfig(_Strict):
    """``pcd-ray embed``: the frozen image tower run once over the images artifact (the paper's setting)."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    """The model whose image tower embeds; training reads the artifact only if its train.model is the same."""
    input: str = "images"
    """URI of the images artifact read."""
    output: str = "embeddings"
    """URI of the embeddings artifact written (image_id, embedding) plus its rejects beside it."""
    split: str | None = None
    """Only images of this split; null = all."""
    batch_size: int = Field(256, ge=1)
    """Images per forward pass."""
    num_actors: int = Field(1, ge=1)
    """Size of the Ray Data actor pool (one model copy per actor)."""
    num_gpus_per_actor: float = Field(0, ge=0)
    """GPUs per actor: 0 runs on CPU; 1 puts each actor on its own GPU (a cluster's GPU workers)."""
    num_cpus_per_actor: float = Field(1, gt=0)


# ------------------------------------------------------------------------------------------------------------ eval
class EvalDatasetConfig(_Strict):
    """One labelled evaluation dataset in its standard layout (pcd_ray/eval/datasets.py, docs/EVAL.md)."""

    kind: Literal["cifar100", "flowers102", "cub", "eurosat", "sun397", "awa2", "coco"]
    root: str
    """Directory (local or s3://) that holds the dataset's folder (cifar-100-python/, flowers-102/, ...)."""
    split: str = "test"
    """Split to evaluate: test/train (val for flowers102; all/test classes for awa2; val2014 etc. for coco)."""
    seed: int = Field(0, ge=0)
    """Seed of the 90/10 split (eurosat, sun397) and of the max_images subsample."""
    max_images: int | None = Field(None, ge=1)
    """Evaluate a seeded random subset of at most this many images; null = the whole split."""
    differences: str | None = None
    """Per-pair difference sentences (CUB's LLM differences): a diffs artifact of the generate stage (e.g.
    ``cub/diffs`` of jobs/paper-cub.yaml, joined to its pairs through its manifest), or a file (.jsonl/.csv/.parquet)
    of image_a, image_b, text rows; ids are the dataset's image ids (paths relative to its image folder)."""
    comparatives: str | None = None
    """File of class_i, class_j, text rows (class names): how class i differs from class j, for comparative
    prompting and geometry; without it those tasks are skipped for this dataset."""


class ComparativeConfig(_Strict):
    alpha: float | None = Field(None, ge=0, le=1)
    """Weight of the plain class embedding in h_j = normalise(alpha t_j + (1 - alpha) s_j); null = the evaluation
    protocol's (0.9, the authors' evaluation script's default)."""
    num_pairs: int = Field(3, ge=1)
    """Most-confused class pairs that get comparatives (the paper: 3)."""
    alphas: list[float] = Field(default_factory=lambda: [round(0.1 * k, 1) for k in range(11)], min_length=1)
    """Sweep for the accuracy-vs-alpha plot."""
    holdout_fraction: float = Field(0.5, gt=0, lt=1)
    """Share of images that pick the pairs in the held-out protocol (the rest measure accuracy)."""


class EvalConfig(_Strict):
    protocol: Literal["fixed", "paper"] = "fixed"
    """paper: the authors' evaluation code choice for choice (sentence wordings, AwA2 predicates, pair sampling,
    prompts, alpha); fixed: the same with their index errors (and a typo, the s.e.'s ddof, geometry's unnormalised
    prompts) fixed. docs/EVAL.md names each choice's source."""
    images: str | None = "images"
    """URI of the images artifact (needs the attributes column: the synthetic set); null = external sets only."""
    comparatives: str | None = "comparatives"
    """URI of the comparatives artifact (``pcd-ray comparatives``) that comparative prompting and the difference
    distances read: a dataset's rows by its name, the synthetic set's by ``synthetic/<task>``; a dataset's own
    ``comparatives`` file takes precedence; a set without comparatives skips those tasks; null = only such files.
    The report names the artifact and its commit."""
    split: str = "test"
    """Only images of this split are evaluated (images the pairs/train stages never saw)."""
    models: dict[str, ModelSpec] = Field(
        default_factory=lambda: {"base": ModelSpec(), "finetuned": ModelSpec(checkpoint="train/export")},
        min_length=1,
    )
    """Models evaluated side by side, by display name; the first is the baseline for deltas."""
    output: str = "eval"
    """Directory URI of report.json / report.md / report.png."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    """One pair sample per seed; accuracies are mean and standard error over seeds (the paper: 5)."""
    pairs_per_attribute: int = Field(500, ge=1)
    """Pairs per attribute and seed for the synthetic set's difference accuracy (easy pairs: fewer when fewer exist);
    labelled datasets draw as eval.protocol says (all cross-class pairs of 100 images per seed; 5,000 CUB pairs)."""
    batch_size: int = Field(256, ge=1)
    """Images per embedding call (and per forward pass); also the chunk size of text encoding in the driver."""
    num_actors: int = Field(1, ge=1)
    """Size of the Ray Data actor pool that embeds images (each actor holds one copy of the model)."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per embedding actor: 0 runs the image tower on CPU, 1 puts each actor on its own GPU (a cluster)."""
    datasets: dict[str, EvalDatasetConfig] = Field(default_factory=dict)
    """Labelled datasets evaluated besides the synthetic set, by display name."""
    templates: list[Literal["paper", "ensemble"]] = Field(default_factory=lambda: ["paper", "ensemble"], min_length=1)
    """Zero-shot prompt sets: the paper's template and/or open_clip's (CLIP's) per-dataset template ensembles."""
    comparative: ComparativeConfig = Field(default_factory=ComparativeConfig)
    analogies_per_seed: int = Field(500, ge=1)
    """Analogies drawn per seed for the geometry task (synthetic set)."""
    retrieval_k: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    """k of recall@k (caption retrieval and difference-conditioned retrieval)."""
    conditioned_queries: int = Field(300, ge=1)
    """Query images per seed for difference-conditioned retrieval (synthetic set)."""

    @model_validator(mode="after")
    def _something_to_evaluate(self):
        if self.images is None and not self.datasets:
            raise ValueError("eval needs images (the synthetic set) or at least one entry in datasets")
        return self


# ----------------------------------------------------------------------------------------------------------- serve
class ServeAutoscalingConfig(_Strict):
    """Replica autoscaling of the model deployment (Ray Serve's autoscaling_config, the keys that matter here)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    """Requests in flight per replica that Serve aims for; batching needs several in flight to fill a batch."""

    @model_validator(mode="after")
    def _ordered(self) -> ServeAutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ServeConfig(_Strict):
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(checkpoint="train/export"))
    """The model every replica loads once at start-up (normally the finetuned export)."""
    host: str = "127.0.0.1"
    """HTTP bind address of Serve's proxy (`pcd-ray serve`; a Serve YAML sets its own http_options)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of Serve's proxy."""
    num_replicas: int = Field(1, ge=1)
    """Model replicas (Ray actors), each holding its own copy of the model."""
    cpus_per_replica: float = Field(1, gt=0)
    """Logical CPUs reserved per replica (ray_actor_options.num_cpus)."""
    max_batch_size: int = Field(32, ge=1)
    """Most texts/images one replica encodes in one forward pass when requests are batched."""
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    """How long a replica waits for a batch to fill before encoding what it has."""
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    """Largest accepted HTTP request body; larger ones get 413 (base64 images count ~4/3 of their size)."""
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    """Largest accepted image (width * height, read from the header before decoding); larger ones get 422."""
    batching: bool = True
    """Dynamic batching across requests (@serve.batch, texts and images separately); off: each request alone."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests one replica accepts at once; batches can only fill up to this many requests."""
    autoscaling: ServeAutoscalingConfig | None = None
    """Scale replicas with load instead of a fixed num_replicas (leave num_replicas at 1 when set)."""
    gpus_per_replica: float = Field(0, ge=0)
    """GPUs per replica (ray_actor_options.num_gpus); a replica given a GPU runs the model on it."""
    text_cache_size: int = Field(4096, ge=0)
    """Text embeddings each replica keeps (LRU): repeated labels and attribute texts skip the model. 0: off."""
    auth_token_env: str | None = None
    """Name of an environment variable holding a bearer token; when set, /v1/* requires
    ``Authorization: Bearer <token>`` and a replica refuses to start without the variable."""

    @model_validator(mode="after")
    def _one_replica_setting(self) -> ServeConfig:
        if self.autoscaling is not None and self.num_replicas != 1:
            raise ValueError("set either num_replicas or autoscaling (min_replicas/max_replicas), not both")
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) > max_ongoing_requests "
                f"({self.max_ongoing_requests}): batches of one-item requests could never fill"
            )
        return self


# ------------------------------------------------------------------------------------------------------------- job
class JobConfig(_Strict):
    """A whole job file: every stage's section. Stage commands read their own section."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    comparatives: ComparativesConfig | None = None
    """Optional: class comparatives for comparative prompting and geometry (``pcd-ray comparatives``)."""
    base_train: TrainConfig | None = None
    """Optional caption-loss pretraining of the base CLIP (the offline demo has no pretrained weights)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    embed: EmbedConfig | None = None
    """Optional: embed the images once with the frozen image tower before training (``pcd-ray embed``)."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


# ------------------------------------------------------------------------------------------------------ load/dump
def resolve_job_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a shipped job (``local`` -> jobs/local.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = JOBS_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in JOBS_DIR.glob("*.yaml")) if JOBS_DIR.is_dir() else []
    raise ConfigError(f"config {name_or_path!r}: no such file, and no shipped job of that name (shipped: {known})")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` into a nested dict, creating sections as needed (validation catches bad paths)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names at a location, for 'did you mean' hints."""
    node: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(node, type) and issubclass(node, BaseModel)):
            return []
        field = node.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        node = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), ann
        )
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("function-after",)))
        path = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(loc[-1]), _known_keys(model, loc), n=1)
            msg = "unknown key" + (f" (did you mean {'.'.join(map(str, loc[:-1] + (hint[0],)))!r}?)" if hint else "")
        else:
            msg = e["msg"]
            if "input" in e and e["type"] not in ("missing", "value_error") and not isinstance(e["input"], dict):
                msg += f", got {e['input']!r}"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def validate(model: type[BaseModel], raw: dict, source: str) -> BaseModel:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, model)) from None


def load_job(name_or_path: str | Path = DEFAULT_JOB, overrides: list[str] | None = None) -> JobConfig:
    """Load a job file, apply overrides, validate. Raises ConfigError naming the file and key path."""
    path = resolve_job_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage sections")
    overrides = list(overrides or [])
    apply_overrides(raw, overrides)
    source = str(path) + (f" + overrides {overrides}" if overrides else "")
    return validate(JobConfig, raw, source)


def dump(cfg: BaseModel) -> str:
    """The resolved config as YAML (saved next to every artifact; `pcd-ray config show`)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
