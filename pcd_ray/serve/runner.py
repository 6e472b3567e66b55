"""The model side of a replica: one loaded model on its device, and the text-embedding cache.

Everything here is synchronous and blocking (torch); the deployment calls it from worker threads. Embeddings come
back as float32 numpy arrays with unit rows.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np

from pcd_ray.config import ModelSpec
from pcd_ray.model.factory import LoadedModel, load_model
from pcd_ray.storage import Storage


def pick_device() -> str:
    """"cuda" when Ray gave this process a GPU and torch can use it, else "cpu"."""
    import ray
    import torch

    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    return "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"


def weights_id(state_dict: dict[str, Any]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order -> first 16 hex digits."""
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
        self.export_id = weights_id(self.loaded.model.state_dict())

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
        import torch.nn.functional as F

        with torch.inference_mode():
            tokens = self.loaded.tokenizer(list(texts)).to(self.device)
            return F.normalize(self.loaded.model.encode_text(tokens).float(), dim=-1).cpu().numpy()

    def encode_images(self, pixels: Sequence[Any]) -> np.ndarray:
        """Preprocessed images ([3, H, W] tensors) -> [n, D] unit float32 image embeddings in one forward pass."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            batch = torch.stack(list(pixels)).to(self.device)
            return F.normalize(self.loaded.model.encode_image(batch).float(), dim=-1).cpu().numpy()


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
