"""The image-embedding actor, the report writer, and the eval stage end to end on a local Ray."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from pcd_ray import artifacts
from pcd_ray.config import (
    ComparativesConfig,
    DataConfig,
    EvalConfig,
    JobConfig,
    ModelSpec,
    StorageConfig,
    SyntheticConfig,
)
from pcd_ray.data.attributes import sample_attributes
from pcd_ray.data.images import encode_png
from pcd_ray.storage import Storage


def png(seed: int, size: int = 40) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return encode_png(Image.fromarray(pixels, "RGB"))


# ------------------------------------------------------------------------------------------------ ImageEmbedder
@pytest.fixture(scope="module")
def embedder():
    from pcd_ray.embed.images import ImageEmbedder

    return ImageEmbedder(ModelSpec(name="pcd-micro"), Storage(), batch_size=2)


def test_embedder_turns_bad_images_into_error_rows(embedder):
    import pyarrow as pa

    batch = pa.table(
        {
            "image_id": ["a", "bad", "b", "none", "c"],
            "image": pa.array([png(0), b"not an image", png(1), None, png(2)], type=pa.binary()),
        }
    )
    out = embedder(batch)
    assert out.column_names == ["image_id", "embedding", "model", "error"]
    assert out.column("image_id").to_pylist() == ["a", "bad", "b", "none", "c"]
    rows = out.to_pylist()
    good = [r for r in rows if r["image_id"] in "abc"]
    assert all(len(r["embedding"]) == 32 and r["error"] is None for r in good)
    assert rows[1]["embedding"] is None and "not a decodable image" in rows[1]["error"]
    assert rows[3]["embedding"] is None and rows[3]["error"] == "missing image bytes"
    assert out.schema.field("embedding").type == pa.list_(pa.float32())
    assert set(out.column("model").to_pylist()) == {"pcd-micro (random init)"}
    # Raw embeddings, not unit vectors (consumers normalise; the norm cannot be recovered later).
    assert not np.allclose(np.linalg.norm(np.asarray([r["embedding"] for r in good]), axis=1), 1.0)


def test_embedder_is_batch_independent_and_accepts_numpy_batches(embedder):
    """Chunking (batch_size=2) and batch composition do not change an image's embedding."""
    one = embedder({"image_id": np.array([7]), "image": np.array([png(3)], dtype=object)})
    many = embedder({"image_id": np.array([5, 6, 7]), "image": np.array([png(1), png(2), png(3)], dtype=object)})
    np.testing.assert_allclose(one.column("embedding")[0].as_py(), many.column("embedding")[2].as_py(), atol=1e-5)
    assert many.column("image_id").to_pylist() == [5, 6, 7]


def test_embed_images_on_ray_data_keeps_every_row(ray_local):
    import ray.data

    from pcd_ray.embed.images import embed_images

    items = [{"image_id": f"i{k}", "image": png(k) if k != 3 else b"\x89PNG broken", "caption": "x"} for k in range(7)]
    ds = ray.data.from_items(items, override_num_blocks=3)
    out = embed_images(ds, ModelSpec(name="pcd-micro"), Storage(), batch_size=3, num_actors=1).take_all()
    assert sorted(r["image_id"] for r in out) == [f"i{k}" for k in range(7)]
    assert all("caption" not in r for r in out)
    bad = [r for r in out if r["embedding"] is None]
    assert [r["image_id"] for r in bad] == ["i3"] and "not a decodable image" in bad[0]["error"]
    with pytest.raises(ValueError, match=r"lacks columns \['image'\]"):
        embed_images(ray.data.from_items([{"image_id": 1}]), ModelSpec(name="pcd-micro"), Storage())


# ------------------------------------------------------------------------------------------------------- report
def fake_model_entry(seed: int, source: str) -> dict:
    from pcd_ray.eval.difference import difference_accuracy
    from pcd_ray.eval.zeroshot import zeroshot_accuracy

    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng) for _ in range(120)]
    images = rng.normal(size=(120, 8))
    cache: dict = {}
    encode = lambda texts: np.stack([cache.setdefault(t, rng.normal(size=8)) for t in texts])  # noqa: E731
    return {
        "source": source,
        "spec": {"name": "pcd-micro"},
        "num_embedded": 120,
        "embedding_errors": 0,
        "errors": [],
        "zeroshot": zeroshot_accuracy(images, attrs, encode),
        "difference": {
            m: difference_accuracy(images, attrs, encode, seeds=[0, 1], pairs_per_attribute=50, mode=m)
            for m in ("hard", "easy")
        },
    }


@pytest.fixture(scope="module")
def report() -> dict:
    return {
        "created": "now",
        "data": {"images": "/data/images", "split": "test", "num_images": 120},
        "settings": {
            "seeds": [0, 1],
            "pairs_per_attribute": 50,
            "attributes": ["size", "brightness", "count"],
            "zeroshot_template": "This is a photo of a {label}",
            "config": {},
        },
        "baseline": "base",
        "models": {
            "base": fake_model_entry(0, "pcd-micro (random init)"),
            "finetuned": fake_model_entry(1, "export /runs/train/export"),
        },
    }


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_report_files(report, where, tmp_path, s3_root):
    from PIL import Image

    from pcd_ray.eval.report import write_report

    storage = Storage(StorageConfig(root=str(tmp_path) if where == "local" else s3_root))
    paths = write_report(report, storage, "eval")
    assert paths["json"].startswith(s3_root if where == "s3" else str(tmp_path))
    assert json.loads(storage.read_text(paths["json"])) == report
    md = storage.read_text(paths["md"])
    base_size = report["models"]["base"]["difference"]["hard"]["attributes"]["size"]
    tuned_size = report["models"]["finetuned"]["difference"]["hard"]["attributes"]["size"]
    assert "| base |" in md and "| finetuned |" in md and "Δ finetuned" in md
    assert f"{base_size['accuracy']:.1f} ± {base_size['stderr']:.1f}" in md
    assert f"{tuned_size['accuracy'] - base_size['accuracy']:+.1f}" in md
    assert "Zero-shot" in md and "export /runs/train/export" in md
    data = storage.read_bytes(paths["png"])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.width > 600 and img.height > 200


def test_format_table_has_every_row_and_model(report):
    from pcd_ray.eval.report import format_table

    text = format_table(report)
    assert "hard pairs" in text and "easy pairs" in text and "Zero-shot" in text
    for row in ("size", "brightness", "count", "overall", "kind", "colour", "mean"):
        assert any(line.strip().startswith(row) for line in text.splitlines()), row
    header = next(line for line in text.splitlines() if line.strip().startswith("attribute"))
    assert "base" in header and "finetuned" in header and "Δ finetuned" in header
    zs = report["models"]["finetuned"]["zeroshot"]["tasks"]["kind"]["accuracy"]
    assert f"{zs:.1f}" in text


def test_brief_table_keeps_the_headline_tables_only(report):
    from pcd_ray.eval.report import WIDTH, format_table

    full, brief = format_table(report), format_table(report, brief=True)
    assert "hard pairs" in brief and "Zero-shot classification (" in brief
    assert "easy pairs" in full and "easy pairs" not in brief
    assert set(brief.splitlines()) <= set(full.splitlines())
    assert max(map(len, brief.splitlines())) <= WIDTH


# ---------------------------------------------------------------------------------------------------- the stage
def make_export(storage: Storage, uri: str, seed: int) -> str:
    import torch

    from pcd_ray.model.export import export_model
    from pcd_ray.model.factory import load_model

    torch.manual_seed(seed)
    loaded = load_model(ModelSpec(name="pcd-micro"))
    return export_model(
        loaded.model.state_dict(), loaded.model_cfg, loaded.preprocess_cfg, storage, uri, meta={"seed": seed}
    )


@pytest.mark.integration
def test_run_eval_end_to_end(ray_local, tmp_path, s3_root):
    from pcd_ray.data.synthetic import make_images
    from pcd_ray.eval.job import run_eval
    from pcd_ray.eval.report import format_table
    from pcd_ray.generate.comparatives import run_comparatives

    storage = Storage(StorageConfig(root=str(tmp_path)))
    models = {
        "base": ModelSpec(checkpoint=make_export(storage, "exports/base", 0)),
        "finetuned": ModelSpec(checkpoint=make_export(storage, "exports/finetuned", 1)),
    }
    job = JobConfig(
        storage=storage.cfg,
        data=DataConfig(synthetic=SyntheticConfig(num_train=20, num_test=150, image_size=32, rows_per_shard=60)),
        comparatives=ComparativesConfig(output=f"{s3_root}/comparatives", rejects=f"{s3_root}/comparative_rejects"),
        eval=EvalConfig(
            models=models,
            seeds=[0, 1, 2],
            pairs_per_attribute=100,
            batch_size=32,
            num_actors=1,
            output=f"{s3_root}/eval",
            analogies_per_seed=40,
            conditioned_queries=30,
            comparatives=f"{s3_root}/comparatives",
        ),
    )
    make_images(job, storage)
    run_comparatives(job, storage)  # the synthetic set's class comparatives, by the rule engine
    report = run_eval(job, storage)

    assert report["data"]["num_images"] == 150 and report["data"]["split"] == "test"
    comparatives = artifacts.read_manifest(storage, f"{s3_root}/comparatives", "comparatives")
    assert report["data"]["comparatives"] == {
        "uri": f"{s3_root}/comparatives",
        "commit": comparatives["attempt"],
        "rows": 318,
        "complete": True,
        "sets": {"synthetic/kind": 6, "synthetic/size": 6, "synthetic/size+colour": 306},
    }
    assert report["baseline"] == "base" and list(report["models"]) == ["base", "finetuned"]
    for name, entry in report["models"].items():
        assert entry["source"] == f"export {storage.resolve(f'exports/{name}')}"
        assert entry["num_embedded"] == 150 and entry["embedding_errors"] == 0
        hard, easy = entry["difference"]["hard"], entry["difference"]["easy"]
        for attr in ("size", "brightness", "count"):
            assert hard["attributes"][attr]["pairs_per_seed"] == [100, 100, 100]
            assert 0.0 <= hard["attributes"][attr]["accuracy"] <= 100.0
            assert easy["attributes"][attr]["available_pairs"] < 100  # 150 images: few fully matched pairs
        assert 0.0 <= hard["overall"]["accuracy"] <= 100.0 and hard["overall"]["stderr"] is not None
        for task in ("kind", "colour", "size"):
            zs = entry["zeroshot"]["tasks"][task]
            assert 0.0 <= zs["accuracy"] <= 100.0 and sum(map(sum, zs["confusion"])) == 150
        # The other tasks of the synthetic set, each with its documented shape.
        assert set(entry["comparative"]) == {"kind", "size", "size+colour"}
        paper = entry["comparative"]["size+colour"]["protocols"]["paper"]
        assert len(paper["pairs"]) == 3 and len(paper["sweep"]["confused"]) == 11
        held = entry["comparative"]["size+colour"]["protocols"]["heldout"]
        assert held["num_select"] + held["num_test"] == 150
        assert entry["geometry"]["distances"]["size+colour"]["num_pairs"] == 18 * 17
        assert entry["geometry"]["analogy"]["text"]["per_seed"] and entry["zeroshot_ensemble"]["mean_accuracy"] >= 0
        assert entry["retrieval"]["captions"]["num_captions"] == 150
        assert entry["retrieval"]["conditioned"]["queries_per_seed"] == [30, 30, 30]
        assert storage.exists(f"{s3_root}/eval/embeddings/{name}/synthetic/_manifest.json")
    # Same images, seeds and hence pairs for both models: two random inits must still score differently.
    assert (
        report["models"]["base"]["difference"]["hard"]["overall"]["per_seed"]
        != report["models"]["finetuned"]["difference"]["hard"]["overall"]["per_seed"]
    )
    saved = json.loads(storage.read_text(f"{s3_root}/eval/report.json"))
    assert saved["models"]["finetuned"]["difference"] == report["models"]["finetuned"]["difference"]
    assert storage.exists(f"{s3_root}/eval/report.png") and "finetuned" in format_table(report)
    assert f"commit {comparatives['attempt']}" in format_table(report)
    md = storage.read_text(f"{s3_root}/eval/report.md")
    assert f"`{s3_root}/comparatives` (commit `{comparatives['attempt']}`, 318 rows)" in md
    assert storage.exists(f"{s3_root}/eval/comparative_alpha.png") and storage.exists(f"{s3_root}/eval/confusion.png")
    # Every number of the report is a TensorBoard scalar too, in the eval directory (uploaded there on s3://).
    events = [p for p in storage.listdir(f"{s3_root}/eval") if "events.out.tfevents" in p]
    assert events, "no TensorBoard event file in the eval output"
