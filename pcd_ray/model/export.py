"""Export: weights as safetensors + open_clip_config.json, the layout open_clip's local-dir/hub loader reads.

    open_clip.create_model_and_transforms("local-dir:/path/to/export")   # plain open_clip, no pcd-ray needed

``pcd_ray.json`` beside them records where the weights came from (base model, run, step) for reports and serving.
No pickle anywhere: weights are safetensors and are loaded with open_clip's weights_only path.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pcd_ray.model.factory import EXPORT_CONFIG, EXPORT_META, EXPORT_WEIGHTS
from pcd_ray.storage import Storage


def export_model(
    state_dict: dict[str, Any],
    model_cfg: dict[str, Any],
    preprocess_cfg: dict[str, Any],
    storage: Storage,
    uri: str,
    meta: dict[str, Any] | None = None,
) -> str:
    """Write an export to a URI (local or s3://); returns the resolved URI. The directory appears whole."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with tempfile.TemporaryDirectory(prefix="pcd-export-") as tmp:
        save_file(tensors, str(Path(tmp) / EXPORT_WEIGHTS), metadata={"format": "pt"})
        (Path(tmp) / EXPORT_CONFIG).write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": dict(preprocess_cfg)}, indent=2)
        )
        (Path(tmp) / EXPORT_META).write_text(json.dumps(meta or {}, indent=2, default=str))
        storage.put_dir(tmp, uri)
    return storage.resolve(uri)


def wise_ft(finetuned: dict[str, Any], base: dict[str, Any], alpha: float) -> dict[str, Any]:
    """WiSE-FT weight average alpha * finetuned + (1 - alpha) * base (docs/METHOD.md, "Training recipe")."""
    if finetuned.keys() != base.keys():
        raise ValueError(f"state dicts differ in keys: {sorted(finetuned.keys() ^ base.keys())[:5]}")
    return {k: alpha * v + (1 - alpha) * base[k] if v.is_floating_point() else v for k, v in finetuned.items()}
