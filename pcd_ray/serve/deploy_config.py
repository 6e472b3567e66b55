"""Strict validation of Serve config files (``serve/*.yaml``) before ``serve deploy`` / ``serve run``.

Ray's ``ServeDeploySchema`` checks types but ignores unknown keys: ``num_replica: 4`` or
``autoscaling_config: {max_replica: 8}`` deploy without a word and silently run the defaults. This module walks the
raw YAML against Ray's own schema classes and rejects every key they do not define, naming its path, then
validates with Ray's schema and the app's own ``args`` model.

    python -m pcd_ray.serve.deploy_config serve/gpu.yaml      # exit 1 with the errors, 0 when valid
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ServeConfigError(ValueError):
    """A Serve config file with unknown keys or invalid values; the message lists every problem."""


def _model_classes(annotation: Any) -> list[type]:
    """pydantic model classes inside an annotation (Optional[List[X]], Union[...], DEFAULT wrappers)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) is None and not isinstance(annotation, types.UnionType):
        return []
    return [m for arg in typing.get_args(annotation) for m in _model_classes(arg)]


def unknown_keys(raw: Any, model: type, path: str = "") -> list[str]:
    """Dotted paths of keys in ``raw`` that ``model`` (a pydantic class, recursively) does not define."""
    from ray.serve.config import AutoscalingConfig

    if not isinstance(raw, dict):
        return []
    known: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        known[name] = field.annotation
        if field.alias:
            known[field.alias] = field.annotation
    problems = []
    for key, value in raw.items():
        where = f"{path}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            problems.append(f"{where}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        # Ray types autoscaling_config as a plain dict; its real schema is AutoscalingConfig.
        models = [AutoscalingConfig] if key == "autoscaling_config" else _model_classes(known[key])
        items = value if isinstance(value, list) else [value]
        for k, item in enumerate(items):
            suffix = f"[{k}]." if isinstance(value, list) else "."
            for m in models[:1]:
                problems += unknown_keys(item, m, where + suffix)
    return problems


def check_serve_config(raw: dict[str, Any], source: str = "<serve config>"):
    """Validate a parsed Serve config strictly -> ray.serve.schema.ServeDeploySchema.

    Besides unknown keys and Ray's own validation, each ``autoscaling_config`` is validated with Ray's
    AutoscalingConfig and the ``args`` of a pcd-ray application with its builder's AppArgs. Raises ServeConfigError.
    """
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from pcd_ray.serve.app import DEPLOYMENT_NAME, AppArgs

    problems = unknown_keys(raw, ServeDeploySchema)
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        raise ServeConfigError(f"{source}: " + "; ".join(problems + [str(e)])) from None
    for app in schema.applications:
        if app.import_path.startswith("pcd_ray."):
            try:
                AppArgs.model_validate(app.args or {})
            except ValidationError as e:
                problems.append(f"applications[{app.name}].args: {e}")
        for dep in app.deployments:
            if app.import_path.startswith("pcd_ray.") and dep.name != DEPLOYMENT_NAME:
                problems.append(
                    f"applications[{app.name}].deployments: no deployment named {dep.name!r} "
                    f"(the app has {DEPLOYMENT_NAME!r})"
                )
            if isinstance(dep.autoscaling_config, dict):
                try:
                    AutoscalingConfig.model_validate(dep.autoscaling_config)
                except ValidationError as e:
                    problems.append(f"applications[{app.name}].deployments[{dep.name}].autoscaling_config: {e}")
    if problems:
        raise ServeConfigError(f"{source}: " + "; ".join(problems))
    return schema


def check_serve_file(path: str | Path):
    """Read and validate a Serve YAML file -> ServeDeploySchema. Raises ServeConfigError."""
    path = Path(path)
    return check_serve_config(yaml.safe_load(path.read_text()), str(path))


if __name__ == "__main__":
    failed = False
    for arg in sys.argv[1:]:
        try:
            check_serve_file(arg)
            print(f"{arg}: ok")
        except ServeConfigError as e:
            print(e, file=sys.stderr)
            failed = True
    sys.exit(1 if failed else 0)
