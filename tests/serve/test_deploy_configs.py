"""Every shipped Serve config (serve/*.yaml) validates with Ray's own schema, passes the strict key check, and
builds the app the way `serve run` / `serve deploy` would (no model is loaded)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pcd_ray.serve.deploy_config import ServeConfigError, check_serve_config, check_serve_file

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "serve").glob("*.yaml"))


def test_both_configs_ship():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_config_is_valid_and_builds(path):
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    schema = check_serve_file(path)
    (spec,) = schema.applications
    assert (spec.name, spec.route_prefix, spec.import_path) == ("pcd", "/", "pcd_ray.serve.app:build_app")
    # The same call `serve run` makes: Ray checks the builder's signature, then builds (no model is loaded).
    app = call_user_app_builder_with_args_if_necessary(import_attr(spec.import_path), spec.args)
    deployment = app._bound_deployment
    assert deployment.name == "PCDModelServer"
    for override in spec.deployments:  # what the YAML overrides in Ray's terms agrees with what the args build
        cfg = deployment._deployment_config
        if isinstance(override.autoscaling_config, dict):
            for key in ("min_replicas", "max_replicas", "target_ongoing_requests"):
                assert getattr(cfg.autoscaling_config, key) == override.autoscaling_config[key], key
        gpus = getattr(override.ray_actor_options, "num_gpus", None)  # unset options are Ray's DEFAULT sentinel
        if gpus:
            assert deployment.ray_actor_options["num_gpus"] == gpus


def test_local_config_is_cpu_and_127_0_0_1():
    schema = check_serve_file(REPO / "serve" / "local.yaml")
    assert schema.http_options.host == "127.0.0.1"
    assert not schema.applications[0].deployments


@pytest.mark.parametrize(
    "where, key, fix",
    [
        (("applications", 0, "deployments", 0), "num_replica", "num_replicas"),
        (("applications", 0, "deployments", 0, "autoscaling_config"), "max_replica", "max_replicas"),
        (("applications", 0, "deployments", 0, "ray_actor_options"), "num_gpu", "num_gpus"),
        (("applications", 0), "route_prefx", "route_prefix"),
        (("http_options",), "prot", "port"),
    ],
)
def test_misspelled_keys_are_rejected_though_ray_accepts_them(where, key, fix):
    from ray.serve.schema import ServeDeploySchema

    raw = copy.deepcopy(yaml.safe_load((REPO / "serve" / "gpu.yaml").read_text()))
    node = raw
    for step in where:
        node = node[step]
    node[key] = 3
    ServeDeploySchema.model_validate(raw)  # Ray's schema alone lets the typo through
    with pytest.raises(ServeConfigError, match=rf"{key}: unknown key \(did you mean '{fix}'\?\)"):
        check_serve_config(raw)


def test_bad_values_args_and_deployment_names_are_rejected():
    raw = yaml.safe_load((REPO / "serve" / "gpu.yaml").read_text())
    for mutate, words in (
        (lambda r: r["applications"][0]["deployments"][0]["autoscaling_config"].update(max_replicas=0), "max_replicas"),
        (lambda r: r["applications"][0]["args"].update(confg="local"), "confg"),
        (lambda r: r["applications"][0]["deployments"][0].update(name="PCDModelSrv"), "PCDModelSrv"),
    ):
        bad = copy.deepcopy(raw)
        mutate(bad)
        with pytest.raises(ServeConfigError, match=words):
            check_serve_config(bad)
