"""Fast tests of the serving pieces that need no Serve: schemas, scoring, the text cache, the app builder, model
loading without pickle, and the import-time cost of the serve modules."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from pcd_ray import provenance
from pcd_ray.config import ConfigError, ModelSpec, ServeConfig, StorageConfig, load_job
from pcd_ray.serve import scoring
from pcd_ray.serve.schemas import MAX_ITEMS, ClassifyRequest, DifferenceRequest, EmbedRequest, RankRequest
from pcd_ray.storage import Storage


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------- schemas
def test_request_schemas_validate():
    assert EmbedRequest(texts=["a"]).images is None
    for bad in ({}, {"texts": [], "images": []}, {"texts": ["a"] * (MAX_ITEMS + 1)}, {"texts": ["a"], "txt": 1}):
        with pytest.raises(ValidationError):
            EmbedRequest.model_validate(bad)
    with pytest.raises(ValidationError, match="texts"):
        DifferenceRequest.model_validate({"image_a": "x", "image_b": "y", "texts": []})
    with pytest.raises(ValidationError, match="placeholder"):
        RankRequest.model_validate({"images": ["x", "y"], "attribute": "larger", "template": "bigger"})
    ok = ClassifyRequest.model_validate(
        {"image": "x", "labels": ["a", "b"], "comparatives": [{"first": "a", "second": "b", "text": "t"}]}
    )
    assert ok.alpha == 0.85
    for bad, words in (
        ({"labels": ["a", "a"]}, "repeated"),
        ({"labels": ["a"]}, "labels"),
        ({"labels": ["a", "b"], "comparatives": [{"first": "a", "second": "a", "text": "t"}]}, "itself"),
        ({"labels": ["a", "b"], "comparatives": [{"first": "a", "second": "z", "text": "t"}]}, "'z'"),
        ({"labels": ["a", "b"], "alpha": -0.1}, "alpha"),
        (
            {
                "labels": ["a", "b"],
                "comparatives": [
                    {"first": "a", "second": "b", "text": "t"},
                    {"first": "a", "second": "b", "text": "u"},
                ],
            },
            "repeated",
        ),
    ):
        with pytest.raises(ValidationError, match=words):
            ClassifyRequest.model_validate({"image": "x", **bad})


def test_serve_config_rejects_conflicts_and_typos():
    assert ServeConfig(autoscaling={"min_replicas": 0, "max_replicas": 3}).autoscaling.max_replicas == 3
    for bad, words in (
        ({"autoscaling": {"max_replicas": 2}, "num_replicas": 2}, "not both"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
        ({"autoscaling": {"max_replica": 2}}, "max_replica"),
        ({"max_batch_size": 128, "max_ongoing_requests": 64}, "never fill"),
        ({"batchng": False}, "batchng"),
    ):
        with pytest.raises(ValidationError, match=words):
            ServeConfig.model_validate(bad)
    with pytest.raises(ConfigError, match="serve.text_cache_sise"):
        load_job("local", ["serve.text_cache_sise=3"])


# ------------------------------------------------------------------------------------------------- scoring
def test_rank_scores_agree_with_every_pairwise_difference_test():
    rng = np.random.default_rng(0)
    images, text = _unit(rng.normal(size=(12, 8))), _unit(rng.normal(size=8))
    order, scores = scoring.rank_scores(text, images)
    pos = np.argsort(order)
    for i in range(12):
        for j in range(12):
            if i != j:  # i ranked above j  <=>  cos(t, normalise(e_i - e_j)) > 0, the paper's pairwise test
                assert (pos[i] < pos[j]) == (scoring.difference_scores(text[None], images[i], images[j])[0] > 0)
    assert abs(scores.sum()) < 1e-9
    # Ties keep request order.
    order, _ = scoring.rank_scores(text, np.stack([images[0]] * 3))
    assert order.tolist() == [0, 1, 2]


def test_comparative_prompting_follows_the_paper():
    rng = np.random.default_rng(1)
    t, d = _unit(rng.normal(size=(4, 6))), _unit(rng.normal(size=(3, 6)))
    pairs = [(0, 2), (1, 2), (3, 0)]  # class 2 has two comparatives, class 0 one, classes 1 and 3 none
    h = scoring.comparative_class_embeddings(t, pairs, d, alpha=0.8)
    s2 = ((t[0] - d[0]) + (t[1] - d[1])) / 2
    np.testing.assert_allclose(h[2], _unit(0.8 * t[2] + 0.2 * s2))
    np.testing.assert_allclose(h[0], _unit(0.8 * t[0] + 0.2 * (t[3] - d[2])))
    np.testing.assert_allclose(h[[1, 3]], t[[1, 3]])
    np.testing.assert_allclose(scoring.comparative_class_embeddings(t, pairs, d, alpha=1.0), t)
    with pytest.raises(ValueError, match="outside"):
        scoring.comparative_class_embeddings(t, [(0, 9)], d[:1], 0.5)
    with pytest.raises(ValueError, match="repeated"):
        scoring.comparative_class_embeddings(t, [(0, 2), (0, 2)], d[:2], 0.5)


def test_text_cache_is_a_bounded_lru():
    from pcd_ray.serve.runner import TextCache

    cache = TextCache(2)
    cache.put("a", np.ones(2))
    cache.put("b", np.zeros(2))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", np.zeros(2))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 1)
    off = TextCache(0)
    off.put("a", np.ones(2))
    assert off.get("a") is None and len(off) == 0


# ---------------------------------------------------------------------------------------- building, loading
def test_import_loads_no_torch():
    code = (
        "import sys, pcd_ray.serve.app, pcd_ray.serve.api, pcd_ray.serve.deploy_config; "
        "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_build_app_args_and_deployment_options(monkeypatch):
    from pcd_ray.serve.app import build_app

    app = build_app({"checkpoint": "s3://bucket/run/export", "overrides": ["serve.num_replicas=2"]})
    d = app._bound_deployment
    assert d.init_args[0].model == ModelSpec(checkpoint="s3://bucket/run/export") and d.num_replicas == 2
    assert d._deployment_config.max_ongoing_requests == 64 and d.ray_actor_options == {"num_cpus": 1}

    monkeypatch.setenv("PCD_UNIT_TOKEN", "s3cret")
    app = build_app(
        {
            "config": "local",
            "overrides": [
                "serve.autoscaling.max_replicas=5",
                "serve.gpus_per_replica=1",
                "serve.auth_token_env=PCD_UNIT_TOKEN",
            ],
        }
    )
    d = app._bound_deployment
    auto = d._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 5, 16)
    assert d.ray_actor_options["num_gpus"] == 1
    assert d.ray_actor_options["runtime_env"] == {"env_vars": {"PCD_UNIT_TOKEN": "s3cret"}}
    for bad in ({}, {"confg": "local"}, {"config": "local", "overrides": "serve.port=1"}):
        with pytest.raises(ValidationError):
            build_app(bad)


def test_auth_configured_without_token_refuses_to_start(monkeypatch):
    from pcd_ray.serve.app import AuthConfigError, read_token

    assert read_token(None) is None
    monkeypatch.setenv("PCD_UNIT_TOKEN", "  ")
    with pytest.raises(AuthConfigError, match="PCD_UNIT_TOKEN"):
        read_token("PCD_UNIT_TOKEN")
    monkeypatch.setenv("PCD_UNIT_TOKEN", "t0k")
    assert read_token("PCD_UNIT_TOKEN") == "t0k"


def test_model_loading_never_unpickles(tmp_path, monkeypatch):
    """An export loads with pickle and torch.load made to fail: the weights come from safetensors only."""
    import torch

    from pcd_ray.model.export import export_model
    from pcd_ray.model.factory import load_model
    from pcd_ray.serve.runner import ModelRunner, tensors_id
    from pcd_ray.storage import Storage

    storage = Storage(StorageConfig(root=str(tmp_path)))
    base = load_model(ModelSpec(name="pcd-micro"))
    export_model(base.model.state_dict(), base.model_cfg, base.preprocess_cfg, storage, "export")

    def refuse(*args, **kwargs):
        raise AssertionError("model loading tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    runner = ModelRunner(ModelSpec(checkpoint="export"), storage)
    assert runner.weights_id == provenance.weights_id(storage, "export")
    assert runner.public_name == f"{tmp_path.name}/export@{runner.weights_id}"
    emb = runner.encode_texts(["a red circle", ""])
    assert emb.shape == (2, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # A model loaded by name has no weights file: its id hashes the tensors, and follows the weights.
    by_name = ModelRunner(ModelSpec(name="pcd-micro"), storage)
    assert by_name.weights_id == tensors_id(by_name.loaded.model.state_dict())
    changed = {k: v.clone() for k, v in by_name.loaded.model.state_dict().items()}
    changed["logit_scale"] += 1
    assert tensors_id(changed) != by_name.weights_id and by_name.provenance() == {}


def test_model_info_reveals_paths_and_config_only_with_auth(tmp_path):
    """/v1/model's public part: the weights id and the input commit ids; the server path and the training meta only
    when auth is on (then every /v1 route needs the token)."""
    from types import SimpleNamespace

    from pcd_ray.model.export import export_model
    from pcd_ray.model.factory import load_model
    from pcd_ray.serve.app import PCDModelServer
    from pcd_ray.serve.runner import ModelRunner, TextCache

    storage = Storage(StorageConfig(root=str(tmp_path)))
    base = load_model(ModelSpec(name="pcd-micro"))
    export_model(
        base.model.state_dict(),
        base.model_cfg,
        base.preprocess_cfg,
        storage,
        "train/export",
        meta={"train_config": {"lr": 1e-4}},
    )
    record = provenance.take(storage, "train", {"lr": 1e-4}, [provenance.Ref("diffs", "diffs", "artifact")])
    provenance.stamp(storage, provenance.Ref("export", "train/export", "export"), record)
    runner = ModelRunner(ModelSpec(checkpoint="train/export"), storage)
    cfg = ServeConfig(model=ModelSpec(checkpoint="train/export"))
    for token in (None, "t0k"):
        replica = SimpleNamespace(
            runner=runner,
            cfg=cfg,
            token=token,
            source=runner.public_name,
            embed_dim=32,
            cache=TextCache(4),
            max_image_pixels=1000,
        )
        info = PCDModelServer.func_or_class.info(replica).model_dump()
        assert info["name"] == f"train/export@{runner.weights_id}" and info["weights_id"] == runner.weights_id
        assert info["provenance"]["stage"] == "train"
        assert info["provenance"]["inputs"] == {"diffs": {"kind": "artifact", "commit": None}}
        public = json.dumps({k: v for k, v in info.items() if k != "detail"})
        assert str(tmp_path) not in public and "train_config" not in public
        if token is None:
            assert info["detail"] is None
        else:
            assert info["detail"]["source"] == f"export {tmp_path}/train/export"
            assert info["detail"]["meta"]["train_config"] == {"lr": 1e-4}
