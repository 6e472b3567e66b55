"""The module a train step runs: a CLIP model turned into the feature dict the loss reads.

``PairEncoder(batch)`` returns raw (unnormalised) features with the fixed keys of ``loss.pc_clip_loss``:
``image_a``/``image_b``/``diff_text`` for the difference group and ``image``/``caption`` for the CLIP group.
When the image tower is frozen (the paper) it runs under no_grad, so no activation memory is kept for it.
"""

from __future__ import annotations

import torch
from torch import nn


class PairEncoder(nn.Module):
    def __init__(self, clip: nn.Module, *, image_frozen: bool):
        super().__init__()
        self.clip = clip
        self.image_frozen = image_frozen

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.image_frozen:
            with torch.no_grad():
                return self.clip.encode_image(pixels)
        return self.clip.encode_image(pixels)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch: image_a [n,3,H,W] (or emb_a [n,D], the frozen tower's precomputed embedding), optional image_b
        (or emb_b), diff_tokens [n,L], caption_tokens [n,L]."""
        out: dict[str, torch.Tensor] = {}
        if "emb_a" in batch:  # embedded once before training (a frozen tower gives the same values every step)
            if not self.image_frozen:
                raise ValueError("precomputed image embeddings, but the image tower is training")
            out["image_a"] = batch["emb_a"]
            if "emb_b" in batch:
                out["image_b"] = batch["emb_b"]
        elif "image_b" in batch:  # one image-tower call for both sides of every pair
            n = batch["image_a"].shape[0]
            images = self.encode_images(torch.cat([batch["image_a"], batch["image_b"]]))
            out["image_a"], out["image_b"] = images[:n], images[n:]
        else:
            out["image_a"] = self.encode_images(batch["image_a"])
        n = out["image_a"].shape[0]
        texts = [batch[k] for k in ("diff_tokens", "caption_tokens") if k in batch]
        encoded = self.clip.encode_text(torch.cat(texts)) if texts else None
        if "diff_tokens" in batch:
            out["diff_text"] = encoded[:n]
        if "caption_tokens" in batch:
            out["image"], out["caption"] = out["image_a"], encoded[-n:]
        return out
