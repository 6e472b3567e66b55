"""The image-embedding actor: image bytes in, raw CLIP image embeddings out, one row per input row.

Output columns (the ``embeddings`` artifact's schema plus an error column):

- ``image_id``: passed through with its input type;
- ``embedding``: ``list<float32>`` of length D, the image tower's raw output (NOT L2-normalised: the difference
  test normalises each embedding itself, and consumers that want unit vectors can normalise cheaply, while the norm
  cannot be recovered); null when the image could not be decoded;
- ``model``: the model's source string (``LoadedModel.source``), so embeddings of several models can share a table;
- ``error``: null, or why the row has no embedding ("not a decodable image: ...");
- ``reason`` (only with ``reasons=True``, what the embed stage asks for): null, or the reject code of that error
  (``missing_image``, ``corrupt_image``, ``image_too_large``, ``preprocess_failed``; the data stage's codes where
  they mean the same).

A bad image never fails the batch: it becomes a row with a null embedding and a reason (docs/ARCHITECTURE.md,
"Principles").
"""

from __future__ import annotations

import logging
from typing import Any

from pcd_ray.config import ModelSpec
from pcd_ray.storage import Storage

log = logging.getLogger(__name__)

INPUT_COLUMNS = ["image_id", "image"]


class ImageEmbedder:
    """Callable class for ``Dataset.map_batches``: loads the model once per actor, embeds batches of image bytes.

    Args:
        spec: which model (name + pretrained, or a pcd-ray export URI).
        storage: resolves the export URI (local or s3://).
        batch_size: images per forward pass; a Ray Data batch larger than this is processed in chunks.
        device: torch device of the image tower ("cpu", "cuda"); ``embed_images`` picks "cuda" when num_gpus > 0.
        max_pixels: images larger than this (width * height) are rejected before decoding (image bombs).
        init_seed: torch seed set before building the model; matters only for a spec without weights (random init),
            which must match the train loop's model (it seeds train.seed the same way).
        reasons: add the ``reason`` column (see the module).

    Raises FileNotFoundError / RuntimeError from ``load_model`` when the spec names no loadable model: a wrong
    model is a configuration error that should stop the job, unlike a bad image.
    """

    def __init__(
        self,
        spec: ModelSpec,
        storage: Storage,
        batch_size: int = 64,
        device: str = "cpu",
        max_pixels: int | None = None,
        init_seed: int | None = None,
        reasons: bool = False,
    ):
        import torch

        from pcd_ray.data.images import DEFAULT_MAX_PIXELS
        from pcd_ray.model.factory import load_model

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if init_seed is not None:  # a random-init spec: the same weights as a train worker seeded alike
            torch.manual_seed(init_seed)
        loaded = load_model(spec, storage, device=device)
        self.model = loaded.model.eval()
        self.preprocess = loaded.preprocess
        self.source = loaded.source
        self.embed_dim = loaded.embed_dim
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        self.reasons = reasons

    def _tensor(self, data: Any) -> Any:
        """One image's model input; raises RejectError when the image cannot be used."""
        from pcd_ray.data.images import decode_image
        from pcd_ray.sink import RejectError

        if data is None:
            raise RejectError("missing_image", "missing image bytes")
        image = decode_image(bytes(data), max_pixels=self.max_pixels)  # ImageDecodeError is a RejectError
        try:
            return self.preprocess(image)
        except Exception as e:  # a transform that chokes on an odd image is still that image's problem
            raise RejectError("preprocess_failed", f"preprocess failed: {type(e).__name__}: {e}") from None

    def _tensors(self, images: list[Any]) -> tuple[list[Any], list[Any]]:
        """Decode + preprocess each image alone, so one bad image costs one row, not the batch: (tensors, errors),
        a tensor or None and a RejectError or None per image."""
        from pcd_ray.sink import RejectError

        tensors: list[Any] = []
        errors: list[RejectError | None] = []
        for data in images:
            try:
                tensors.append(self._tensor(data))
                errors.append(None)
            except RejectError as e:
                tensors.append(None)
                errors.append(e)
        return tensors, errors

    def embed_tensors(self, tensors: list[Any]) -> Any:
        """Preprocessed CHW tensors -> float32 numpy array [n, D] (raw image-tower output)."""
        import numpy as np
        import torch

        if not tensors:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(tensors), self.batch_size):
                x = torch.stack(tensors[start : start + self.batch_size]).to(self.device)
                chunks.append(self.model.encode_image(x).float().cpu().numpy())
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def __call__(self, batch: Any) -> Any:
        """A batch with ``image_id`` and ``image`` (pyarrow Table or dict of arrays) -> pyarrow Table (see module)."""
        import pyarrow as pa

        if isinstance(batch, pa.Table):
            ids = batch.column("image_id").combine_chunks()
            images = batch.column("image").to_pylist()
        else:
            ids = pa.array(list(batch["image_id"]))
            images = list(batch["image"])
        tensors, errors = self._tensors(images)
        good = [i for i, t in enumerate(tensors) if t is not None]
        emb = self.embed_tensors([tensors[i] for i in good])
        rows: list[Any] = [None] * len(images)
        for k, i in enumerate(good):
            rows[i] = emb[k]
        embedding = pa.array(rows, type=pa.list_(pa.float32()))
        if len(good) < len(images):
            log.warning(
                "%d of %d images not embedded; first reason: %s",
                len(images) - len(good),
                len(images),
                next(e for e in errors if e),
            )
        columns = {
            "image_id": ids,
            "embedding": embedding,
            "model": pa.array([self.source] * len(images), type=pa.string()),
            "error": pa.array([None if e is None else str(e) for e in errors], type=pa.string()),
        }
        if self.reasons:
            columns["reason"] = pa.array([None if e is None else e.reason for e in errors], type=pa.string())
        return pa.table(columns)


def embed_images(
    ds,
    spec: ModelSpec,
    storage: Storage,
    *,
    batch_size: int = 64,
    num_actors: int = 1,
    num_gpus: float = 0,
    num_cpus: float | None = None,
    init_seed: int | None = None,
    reasons: bool = False,
):
    """Embed every row of a Dataset with ``image_id`` + ``image`` columns; lazy, returns a Dataset.

    Args:
        ds: Ray Dataset with at least ``image_id`` and ``image`` (bytes); other columns are dropped first so the
            actors only receive what they use.
        spec, storage: the model (see ``ImageEmbedder``).
        batch_size: rows per actor call and per forward pass.
        num_actors: size of the fixed actor pool (each actor holds one copy of the model).
        num_gpus: GPUs per actor; > 0 puts the image tower on CUDA (a GPU cluster), 0 runs it on CPU.
        num_cpus: CPUs per actor (Ray's default of 1 when None).
        init_seed, reasons: see ``ImageEmbedder``.

    Returns a Dataset with columns image_id, embedding, model, error[, reason] (one row per input row).
    Raises ValueError when ``ds`` lacks the input columns.
    """
    import ray.data

    # Check the columns when the schema is known without running the pipeline (a Parquet read); otherwise
    # select_columns fails at execution with the column name.
    columns = ds.columns(fetch_if_missing=False)
    missing = [c for c in INPUT_COLUMNS if columns is not None and c not in columns]
    if missing:
        raise ValueError(f"embed_images: dataset lacks columns {missing} (has {columns})")
    if num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    remote_args: dict[str, Any] = {"num_gpus": num_gpus} if num_gpus else {}
    if num_cpus is not None:
        remote_args["num_cpus"] = num_cpus
    return ds.select_columns(INPUT_COLUMNS).map_batches(
        ImageEmbedder,
        fn_constructor_kwargs={
            "spec": spec,
            "storage": storage,
            "batch_size": batch_size,
            "device": "cuda" if num_gpus else "cpu",
            "init_seed": init_seed,
            "reasons": reasons,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        **remote_args,
    )
