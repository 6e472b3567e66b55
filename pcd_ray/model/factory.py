"""open_clip factory: which network (a name) and which weights (a pretrained tag, or a pcd-ray export).

pcd-ray's small CPU models (``pcd-tiny``, ``pcd-micro``) are JSON configs registered in open_clip's own registry,
so ``open_clip.create_model("pcd-tiny")`` works once :func:`register_configs` ran. An export is a directory that
plain open_clip loads with ``open_clip.create_model_and_transforms("local-dir:<dir>")`` (see ``export.py``);
pcd-ray loads it the same way, downloading it first when it lives on s3://.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcd_ray.config import ModelSpec
from pcd_ray.storage import Storage

CONFIG_DIR = Path(__file__).parent / "configs"
EXPORT_CONFIG = "open_clip_config.json"
EXPORT_WEIGHTS = "open_clip_model.safetensors"
EXPORT_META = "pcd_ray.json"

_registered = False


def register_configs() -> None:
    """Add pcd-ray's model configs to open_clip's registry (idempotent)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass
class LoadedModel:
    """A CLIP model with what is needed to use and re-export it."""

    model: Any  # open_clip.CLIP
    preprocess: Callable  # eval transform: PIL image -> CHW float tensor
    tokenizer: Callable  # list[str] -> LongTensor [n, context_length]
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    source: str  # human-readable origin ("pcd-tiny (random init)", "export s3://...")
    meta: dict[str, Any] = field(default_factory=dict)  # pcd_ray.json of an export

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    def encode_texts(self, texts: list[str], *, batch_size: int = 256, normalize: bool = False):
        """Texts -> float32 numpy [n, D] text embeddings with the model's own tokenizer, in chunks of batch_size."""
        import numpy as np
        import torch

        from pcd_ray.vectors import EPS, normalise_torch

        out = [np.zeros((0, self.embed_dim), dtype=np.float32)]
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                emb = self.model.encode_text(self.tokenizer(list(texts[start : start + batch_size]))).float()
                out.append((normalise_torch(emb, eps=EPS) if normalize else emb).cpu().numpy())
        return np.concatenate(out)


def _from_dir(local_dir: Path, source: str, device: str, precision: str) -> LoadedModel:
    import open_clip

    cfg_path = local_dir / EXPORT_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{source}: not a model export ({EXPORT_CONFIG} missing)")
    cfg = json.loads(cfg_path.read_text())
    model, _, preprocess = open_clip.create_model_and_transforms(
        f"local-dir:{local_dir}", device=device, precision=precision, weights_only=True
    )
    tokenizer = open_clip.get_tokenizer(f"local-dir:{local_dir}")
    meta_path = local_dir / EXPORT_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return LoadedModel(model, preprocess, tokenizer, cfg["model_cfg"], model.visual.preprocess_cfg, source, meta)


def load_model(
    spec: ModelSpec, storage: Storage | None = None, device: str = "cpu", precision: str = "fp32"
) -> LoadedModel:
    """Build the model a spec names. Random init when neither checkpoint nor pretrained is set.

    Raises FileNotFoundError for a missing export, RuntimeError (from open_clip) for an unknown name or tag.
    """
    import open_clip

    register_configs()
    if spec.checkpoint:
        storage = storage or Storage()
        uri = storage.resolve(spec.checkpoint)
        with storage.local_dir(uri) as local:
            return _from_dir(local, f"export {uri}", device, precision)
    model_cfg = open_clip.get_model_config(spec.name)
    if model_cfg is None:
        raise RuntimeError(
            f"unknown model {spec.name!r}: not an open_clip or pcd-ray config "
            f"(pcd-ray: {sorted(p.stem for p in CONFIG_DIR.glob('*.json'))})"
        )
    model, _, preprocess = open_clip.create_model_and_transforms(
        spec.name, pretrained=spec.pretrained, device=device, precision=precision, weights_only=True
    )
    tokenizer = open_clip.get_tokenizer(spec.name)
    source = f"{spec.name} ({spec.pretrained or 'random init'})"
    return LoadedModel(model, preprocess, tokenizer, model_cfg, model.visual.preprocess_cfg, source)


def load_processors(spec: ModelSpec, storage: Storage | None = None) -> tuple[Callable, Callable, dict[str, Any]]:
    """(eval image transform, tokenizer, model_cfg) of a spec without building the network or reading its weights.

    Data pipelines (Ray Data preprocessing on CPU workers) need these, not the model; for an s3 export only its
    small config file is read.
    """
    import tempfile

    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    register_configs()
    if spec.checkpoint:
        storage = storage or Storage()
        uri = storage.resolve(spec.checkpoint)
        from pcd_ray.storage import join

        cfg_uri = join(uri, EXPORT_CONFIG)
        if not storage.exists(cfg_uri):
            raise FileNotFoundError(f"export {uri}: not a model export ({EXPORT_CONFIG} missing)")
        cfg = storage.read_json(cfg_uri)
        model_cfg, pp = cfg["model_cfg"], merge_preprocess_dict(PreprocessCfg(), cfg.get("preprocess_cfg", {}))
        # open_clip picks the tokenizer from the config; let it, through its local-dir path.
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / EXPORT_CONFIG).write_text(json.dumps(cfg))
            tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
    else:
        model_cfg = open_clip.get_model_config(spec.name)
        if model_cfg is None:
            raise RuntimeError(f"unknown model {spec.name!r}: not an open_clip or pcd-ray config")
        overlay: dict[str, Any] = {"size": model_cfg["vision_cfg"].get("image_size", 224)}
        if spec.pretrained:
            tag_cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
            overlay.update({k: v for k, v in tag_cfg.items() if k in PreprocessCfg.__dataclass_fields__})
        pp = merge_preprocess_dict(PreprocessCfg(), overlay)
        tokenizer = open_clip.get_tokenizer(spec.name)
    return image_transform_v2(PreprocessCfg(**pp), is_train=False), tokenizer, model_cfg
