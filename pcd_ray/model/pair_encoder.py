"""The module a train step runs: a CLIP model turned into the feature dict the loss reads.

``PairEncoder(batch)`` returns features with the fixed keys of ``pcd_ray.model.loss`` (``image_a``/``image_b``/
``diff_text`` for the difference group, ``image``/``caption`` for the CLIP group; the loss normalises them) plus the
log-scales it needs (``logit_scale``, and ``diff_logit_scale`` when that is learned).

Everything goes through ``clip.forward`` (one call: both images of every pair, then diff texts and captions), not
``encode_image``/``encode_text``: ZeRO-3 gathers a module's own parameters in its forward hooks, and CLIP's
``positional_embedding``, ``text_projection`` and ``logit_scale`` belong to CLIP itself, so they exist only inside
its forward. For the same reason the log-scales are read inside this forward, never off the parameters after it.
A frozen image tower (the paper) records no autograd graph: neither its weights nor its pixels require grad; it
stays in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

_TUPLE_KEYS = ("image_features", "text_features", "logit_scale")


class PairEncoder(nn.Module):
    def __init__(self, clip: nn.Module, *, image_frozen: bool):
        super().__init__()
        self.clip = clip
        self.image_frozen = image_frozen
        self.train()

    def train(self, mode: bool = True) -> PairEncoder:
        super().train(mode)
        if self.image_frozen:
            # Frozen means its outputs do not change either: a conv tower's BatchNorm (pcd-tiny's ModifiedResNet)
            # would keep updating its running statistics in train mode, and dropout would stay on.
            self.clip.visual.eval()
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch: image_a [n,3,H,W] (or emb_a [n,D], the frozen tower's precomputed embedding), optional image_b
        (or emb_b), diff_tokens [n,L], caption_tokens [n,L]."""
        precomputed = "emb_a" in batch
        if precomputed and not self.image_frozen:
            raise ValueError("precomputed image embeddings, but the image tower is training")
        a, b = ("emb_a", "emb_b") if precomputed else ("image_a", "image_b")
        n = batch[a].shape[0]
        images = torch.cat([batch[a], batch[b]]) if b in batch else batch[a]
        texts = [batch[k] for k in ("diff_tokens", "caption_tokens") if k in batch]
        res = self.clip(image=None if precomputed else images, text=torch.cat(texts) if texts else None)
        res = res if isinstance(res, dict) else dict(zip(_TUPLE_KEYS, res))
        if not precomputed:
            images = res["image_features"]
        out = {"image_a": images[:n], "logit_scale": res["logit_scale"].log()}
        if b in batch:
            out["image_b"] = images[n:]
        if "diff_tokens" in batch:
            out["diff_text"] = res["text_features"][:n]
        if "caption_tokens" in batch:
            out["image"], out["caption"] = out["image_a"], res["text_features"][-n:]
        if hasattr(self, "diff_logit_scale"):
            out["diff_logit_scale"] = self.diff_logit_scale * 1.0  # a copy made while ZeRO-3 holds it gathered
        return out
