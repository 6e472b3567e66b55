"""`pcd-ray embed` (embed/job.py) and how training reads its artifact (train/data.py).

One small synthetic images artifact with two bad rows injected (undecodable bytes, no bytes), one seeded pcd-micro
export as "the base", one embed run shared by the tests (Ray actors start once per run: each costs seconds here).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pcd_ray import artifacts
from pcd_ray.config import JobConfig, ModelSpec, TrainConfig
from pcd_ray.data.images import ImageDecodeError
from pcd_ray.data.pairs import pair_id
from pcd_ray.data.synthetic import make_example
from pcd_ray.storage import Storage

pytestmark = pytest.mark.integration

NUM_TRAIN, NUM_TEST = 64, 8
CORRUPT, NO_BYTES = "syn-train-corrupt", "syn-train-nobytes"


def _job(root: str, **embed) -> JobConfig:
    return JobConfig.model_validate(
        {
            "storage": {"root": root},
            "embed": {"model": {"checkpoint": "base/export"}, "batch_size": 16, **embed},
            "train": {"model": {"checkpoint": "base/export"}, "embeddings": "embeddings", "batch_size": 8},
        }
    )


def export_seeded_micro(storage: Storage, uri: str) -> None:
    """A pcd-micro with fixed weights: every actor that loads it gets the same image tower."""
    import torch

    from pcd_ray.model.export import export_model
    from pcd_ray.model.factory import load_model

    torch.manual_seed(0)
    lm = load_model(ModelSpec(name="pcd-micro"))
    export_model(lm.model.state_dict(), lm.model_cfg, lm.preprocess_cfg, storage, uri)


def _train(job: JobConfig, **changes) -> TrainConfig:
    return TrainConfig.model_validate({**job.train.model_dump(), **changes})


def _write_pairs(storage: Storage, id_pairs: list[tuple[str, str]]) -> None:
    artifacts.write_table(
        pa.table(
            {
                "pair_id": [pair_id(a, b) for a, b in id_pairs],
                "image_id_a": [a for a, _ in id_pairs],
                "image_id_b": [b for _, b in id_pairs],
                "caption_a": ["a"] * len(id_pairs),
                "caption_b": ["b"] * len(id_pairs),
            }
        ),
        storage,
        "pairs",
        "pairs",
    )


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, ray_local):
    from pcd_ray.embed.job import run_embed

    root = str(tmp_path_factory.mktemp("embed-run"))
    job = _job(root)
    storage = Storage(job.storage)
    rows = [make_example(0, "train", i, 32) for i in range(NUM_TRAIN)]
    rows += [make_example(0, "test", i, 32) for i in range(NUM_TEST)]
    table = pa.Table.from_pylist(rows)
    bad = pa.Table.from_pylist(
        [
            {**rows[0], "image_id": CORRUPT, "image": b"\x89PNG\r\n\x1a\n but the rest is not a PNG"},
            {**rows[1], "image_id": NO_BYTES, "image": None},
        ],
        schema=table.schema,
    )
    # The bad rows in the middle: they share actor batches with good rows.
    table = pa.concat_tables([table.slice(0, 30), bad, table.slice(30)])
    artifacts.write_table(table, storage, "images", "images")
    export_seeded_micro(storage, "base/export")
    summary = run_embed(job, storage)
    return job, storage, table, summary


def test_embed_writes_embeddings_and_rejects_that_add_up(embedded):
    from pcd_ray.embed.images import ImageEmbedder
    from pcd_ray.embed.job import rejects_uri

    job, storage, images, summary = embedded
    total = NUM_TRAIN + NUM_TEST + 2
    assert summary["rows"] == total and summary["embedded"] == total - 2 and summary["rejected"] == 2
    assert summary["rejected_by_reason"] == {"corrupt_image": 1, "missing_image": 1}
    assert summary["embed_dim"] == 32 and summary["images_per_s"] > 0 and summary["wall_s"] > 0

    manifest = artifacts.read_manifest(storage, "embeddings", "embeddings")
    assert manifest["complete"] and manifest["num_rows"] == total - 2 and manifest["summary"] == summary
    # What training checks (staleness is the pipeline's: tests/core/test_provenance.py).
    assert manifest["config"] == job.embed.model_dump(mode="json")
    assert manifest["model"] == f"export {storage.resolve('base/export')}" and manifest["embed_dim"] == 32
    assert manifest["input_attempt"] == artifacts.read_manifest(storage, "images", "images")["attempt"]

    rejects = artifacts.read_table(storage, rejects_uri("embeddings"), "image_rejects").to_pylist()
    assert {(r["image_id"], r["source"], r["reason"]) for r in rejects} == {
        (CORRUPT, "embed", "corrupt_image"),
        (NO_BYTES, "embed", "missing_image"),
    }
    assert "not a decodable image" in next(r["detail"] for r in rejects if r["image_id"] == CORRUPT)

    table = artifacts.read_table(storage, "embeddings", "embeddings")
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    good = [i for i in images.column("image_id").to_pylist() if i not in (CORRUPT, NO_BYTES)]
    assert sorted(table.column("image_id").to_pylist()) == sorted(good)  # each once, none lost
    # The artifact holds what the image tower gives for these images, whatever batch they were embedded in.
    stored = dict(zip(table.column("image_id").to_pylist(), table.column("embedding").to_pylist()))
    some = images.filter(pc.is_in(images.column("image_id"), pa.array(good[::17])))
    direct = ImageEmbedder(job.embed.model, storage, batch_size=4)(some.select(["image_id", "image"]))
    assert direct.column("error").null_count == some.num_rows
    for image_id, emb in zip(direct.column("image_id").to_pylist(), direct.column("embedding").to_pylist()):
        np.testing.assert_allclose(stored[image_id], emb, rtol=1e-5, atol=1e-6)


def test_training_refuses_embeddings_of_another_model(embedded):
    from pcd_ray.train.data import _image_values

    job, storage, _, _ = embedded
    _write_pairs(storage, [("syn-train-000000", "syn-train-000001")])
    other = _train(job, model={"name": "pcd-micro"})
    with pytest.raises(ValueError, match=r"embeddings of model .*base/export.*train\.model is .*pcd-micro"):
        _image_values(other, storage, precomputed=True)
    # A random init is not a model identity: the embed actors and the train workers would each draw their own.
    random_init = {**job.embed.model_dump(mode="json"), "model": {"name": "pcd-micro"}}
    artifacts.write_table(
        pa.table(
            {
                "image_id": ["x"],
                "model": ["pcd-micro (random init)"],
                "embedding": pa.array([[0.0] * 32], pa.list_(pa.float32())),
            }
        ),
        storage,
        "embeddings-random",
        "embeddings",
        config=random_init,
    )
    with pytest.raises(ValueError, match="randomly initialised pcd-micro"):
        _image_values(_train(job, model={"name": "pcd-micro"}, embeddings="embeddings-random"), storage, True)
    # The same export named by its absolute URI is the same model: relative URIs resolve against storage.root.
    same = _train(job, model={"checkpoint": storage.resolve("base/export")})
    ds, column = _image_values(same, storage, precomputed=True)
    assert column == "embedding" and ds.columns() == ["image_id", "embedding"]
    assert ds.count() == NUM_TRAIN + NUM_TEST


def test_training_names_pair_images_without_an_embedding(embedded):
    from pcd_ray.train.data import _image_values

    job, storage, _, _ = embedded
    _write_pairs(
        storage,
        [
            ("syn-train-000000", CORRUPT),
            ("syn-train-000002", "syn-train-nowhere"),
            ("syn-train-000003", "syn-train-000004"),
        ],
    )
    with pytest.raises(ValueError, match=r"2 image\(s\) the pairs .* need have no embedding \(1 rejected") as err:
        _image_values(job.train, storage, precomputed=True)
    msg = str(err.value)
    assert f"{CORRUPT} (rejected: corrupt_image: not a decodable image" in msg
    assert "syn-train-nowhere (not in the artifact)" in msg


def test_split_selects_rows_and_caption_training_checks_its_split(embedded):
    """embed.split picks the rows the actors get (checked without starting them); caption training needs an
    embedding for every image of its split, here missing for the two bad train images."""
    from pcd_ray.embed.job import _input, run_embed
    from pcd_ray.train.data import _image_values

    job, storage, _, _ = embedded
    ds, rows, _ = _input(_job(job.storage.root, split="test").embed, storage)
    splits = [r["split"] for r in ds.select_columns(["split"]).take_all()]
    assert rows == NUM_TEST and splits == ["test"] * NUM_TEST
    with pytest.raises(ValueError, match=r"no images of split 'val' .*splits present: \['test', 'train'\]"):
        run_embed(_job(job.storage.root, split="val", output="embeddings-val"), storage)
    assert not artifacts.exists(storage, "embeddings-val")  # refused before writing anything

    captions = _train(job, data="captions", loss={"diff_weight": 0.0, "clip_weight": 1.0})
    ds, _ = _image_values(captions, storage, precomputed=True, split="test")
    assert ds.count() == NUM_TRAIN + NUM_TEST  # the whole artifact; the caption rows' inner join picks the split
    with pytest.raises(ValueError, match=r"2 image\(s\) the 'train' images need have no embedding \(2 rejected"):
        _image_values(captions, storage, precomputed=True, split="train")


def test_inline_embedding_shares_the_reject_split_and_stops_on_bad_images(embedded):
    """train.embeddings=null: the images are embedded at train start by the same embed-and-split code; a bad image
    there means a damaged images artifact, so training stops naming it."""
    from pcd_ray.train.data import _image_values

    job, storage, _, _ = embedded
    inline = _train(job, embeddings=None)
    with pytest.raises(ImageDecodeError, match=rf"2 images that do not decode.*({CORRUPT}|{NO_BYTES})"):
        _image_values(inline, storage, precomputed=True)
