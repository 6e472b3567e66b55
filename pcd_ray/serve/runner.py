"""The model side of a replica: one loaded model on its device, and the text-embedding cache.

Everything here is synchronous and blocking (torch); the deployment calls it from worker threads. Embeddings come
back as float32 numpy arrays with unit rows.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pcd_ray import provenance
from pcd_ray.config import ModelSpec
from pcd_ray.model.factory import LoadedModel, load_model
from pcd_ray.storage import Storage
from pcd_ray.vectors import EPS, normalise_torch


def pick_device() -> str:
    """ "cuda" when Ray gave this process a GPU and torch can use it, else "cpu"."""
    import ray
    import torch

    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    return "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"


def tensors_id(state_dict: dict[str, Any]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order -> first 16 hex digits: the id of a
    model loaded by name, which has no weights file to hash."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class ModelRunner:
    """An eval-mode model on ``device`` with batch encoders for texts and preprocessed images."""

    def __init__(self, spec: ModelSpec, storage: Storage, device: str = "cpu"):
        self.spec = spec
        self.device = device
        self.loaded: LoadedModel = load_model(spec, storage, device=device)
        self.loaded.model.eval()
        if spec.checkpoint:
            # The id pipelines record for this export (its weights file's sha256), so a client can match what it
            # is served against a run's provenance.
            self.weights_id = provenance.weights_id(storage, spec.checkpoint) or ""
            self.name = "/".join(storage.resolve(spec.checkpoint).rstrip("/").split("/")[-2:])
        else:
            self.weights_id = tensors_id(self.loaded.model.state_dict())
            self.name = f"{spec.name}:{spec.pretrained}" if spec.pretrained else f"{spec.name} (random init)"

    @property
    def public_name(self) -> str:
        """What every response names as its model: no server path, and the weights id, so two replicas serving
        different weights under one URI never look alike."""
        return f"{self.name}@{self.weights_id}"

    def provenance(self) -> dict[str, Any]:
        """The export's record without locations: the stage, when, and each input's commit id."""
        record = self.loaded.meta.get("provenance") or {}
        return (
            {
                "stage": record.get("stage"),
                "made": record.get("made"),
                "inputs": {
                    k: {"kind": v.get("kind"), "commit": v.get("commit")}
                    for k, v in (record.get("inputs") or {}).items()
                },
            }
            if record
            else {}
        )

    @property
    def embed_dim(self) -> int:
        return self.loaded.embed_dim

    @property
    def preprocess(self) -> Callable:
        return self.loaded.preprocess

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> [n, D] unit float32 text embeddings in one forward pass (the tokenizer pads to a fixed length,
        so an embedding does not depend on what else is in the batch)."""
        import torch

        with torch.inference_mode():
            tokens = self.loaded.tokenizer(list(texts)).to(self.device)
            return normalise_torch(self.loaded.model.encode_text(tokens).float(), eps=EPS).cpu().numpy()

    def encode_images(self, pixels: Sequence[Any]) -> np.ndarray:
        """Preprocessed images ([3, H, W] tensors) -> [n, D] unit float32 image embeddings in one forward pass."""
        import torch

        with torch.inference_mode():
            batch = torch.stack(list(pixels)).to(self.device)
            return normalise_torch(self.loaded.model.encode_image(batch).float(), eps=EPS).cpu().numpy()


class TextCache:
    """LRU map text -> embedding, bounded by entry count. Not thread-safe: use it from the event loop only."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, text: str) -> np.ndarray | None:
        emb = self._items.get(text)
        if emb is None:
            self.misses += 1
            return None
        self._items.move_to_end(text)
        self.hits += 1
        return emb

    def put(self, text: str, emb: np.ndarray) -> None:
        if self.size <= 0:
            return
        self._items[text] = emb
        self._items.move_to_end(text)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
