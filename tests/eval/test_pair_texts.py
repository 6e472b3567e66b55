"""Difference texts for eval read from the generate stage's artifacts: CUB captions through data -> pairs -> generate
(the transformers engine on a tiny random Llama) into rows of the CUB evaluation set, and the checks on diffs
artifacts that are incomplete, stale or inconsistent with their pairs."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from eval_fixtures import write_cub

from pcd_ray import artifacts, provenance
from pcd_ray.config import JobConfig
from pcd_ray.data.pairs import pair_id
from pcd_ray.eval.class_difference import class_difference_accuracy, read_pair_texts
from pcd_ray.eval.datasets import DatasetError, read_dataset
from pcd_ray.eval.pair_texts import load_pair_texts, names_artifact, read_diff_texts
from pcd_ray.eval.protocol import FIXED
from pcd_ray.provenance import Ref
from pcd_ray.storage import Storage

sys.path.insert(0, str(Path(__file__).parents[1] / "generate"))
from tiny_llm import write_tiny_llm  # noqa: E402

DIFF_COLUMNS = ["pair_id", "text", "raw", "engine", "prompt_version"]


def _reed_captions(root: Path) -> None:
    """Ten captions per image of the CUB tree under ``root``, where Reed et al.'s archive puts them."""
    for line in (root / "CUB_200_2011" / "images.txt").read_text().splitlines():
        rel = Path(line.split()[1])
        path = root / "cvpr2016_cub" / "text_c10" / rel.with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"][len(line) % 8]
        path.write_text(
            "".join(
                f"a small {colour} bird on the left with a {c} tail.\n"
                for c in ["red", "blue", "green", "yellow", "white", "black", "purple", "orange", "grey", "brown"]
            )
        )


def test_cub_captions_to_eval_rows_through_the_pipeline(ray_local, tmp_path):
    from pcd_ray.pipeline import run_stage
    from pcd_ray.stages import BY_NAME

    root = tmp_path / "cub"
    write_cub(root, per_class=3)  # 3 classes x 6 images, half of them test
    _reed_captions(root)
    model = write_tiny_llm(tmp_path / "tiny")
    job = JobConfig.model_validate(
        {
            "storage": {"root": str(tmp_path / "run")},
            "data": {
                "source": "cub",
                "cub": {"root": str(root), "split": "test"},
                "output": "cub/images",
                "rejects": "cub/image_rejects",
            },
            "pairs": {"input": "cub/images", "output": "cub/pairs", "split": "test", "num_pairs": 30},
            "generate": {
                "engine": "transformers",
                "input": "cub/pairs",
                "output": "cub/diffs",
                "rejects": "cub/rejects",
                "llm": {"model": str(model)},
                "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 24},
                "batch_size": 8,
                "num_actors": 1,
            },
        }
    )
    storage = Storage(job.storage)
    for stage in ("data", "pairs", "generate"):
        run_stage(BY_NAME[stage], job, storage)

    ds = read_dataset(Storage(), "cub", str(root), "test")
    assert artifacts.read_manifest(storage, "cub/images")["num_rows"] == len(ds) == 9
    texts = load_pair_texts(storage, "cub/diffs", ds)
    diffs = artifacts.read_table(storage, "cub/diffs", "diffs")
    pairs = {r["pair_id"]: r for r in artifacts.read_table(storage, "cub/pairs", "pairs").to_pylist()}
    assert diffs.num_rows, "sampled output of the tiny model should pass the filter for some pairs"
    assert texts.skipped == 0 and len(texts.rows) == diffs.num_rows
    by_pair = dict(zip(diffs["pair_id"].to_pylist(), diffs["text"].to_pylist()))
    for a, b, text in texts.rows:  # eval's CUB ids, each row the text generated for that ordered pair
        assert a in ds.image_ids and b in ds.image_ids and a != b
        assert by_pair[pair_id(a, b)] == text and pairs[pair_id(a, b)]["image_id_a"] == a
    assert [pair_id(a, b) for a, b, _ in texts.rows] == sorted(by_pair)
    commit = {name: artifacts.read_manifest(storage, f"cub/{name}")["attempt"] for name in ("diffs", "pairs")}
    assert texts.source == {
        "uri": storage.resolve("cub/diffs"),
        "kind": "artifact",
        "commit": commit["diffs"],
        "pairs": {"uri": storage.resolve("cub/pairs"), "commit": commit["pairs"]},
        "rows": diffs.num_rows,
        "engine": "transformers",
        "model": str(model),
        "prompt_version": "paper-v1",
    }
    assert read_diff_texts(storage, "cub/diffs", ds) == (texts.rows, 0)

    # The same drop-in shape as a differences file: the sign test runs on the rows.
    emb = np.random.default_rng(0).normal(size=(len(ds), 4))
    encode = lambda t: np.random.default_rng(len(t)).normal(size=(len(t), 4))  # noqa: E731
    fewer = dataclasses.replace(FIXED, llm_pairs_per_seed=5)
    res = class_difference_accuracy(ds, emb, encode, "llm", seeds=[0, 1], protocol=fewer, pair_rows=texts.rows)
    assert res["pairs_per_seed"] == [min(5, len(texts.rows))] * 2

    # Pairs whose images the evaluated subset lacks are skipped and counted, as for a file.
    part = ds.subset(np.arange(4))
    rows, skipped = read_diff_texts(storage, "cub/diffs", part)
    inside = [r for r in texts.rows if r[0] in part.image_ids and r[1] in part.image_ids]
    assert rows == inside and skipped == len(texts.rows) - len(inside) > 0
    path = tmp_path / "diffs.jsonl"
    path.write_text("".join(json.dumps({"image_a": a, "image_b": b, "text": t}) + "\n" for a, b, t in texts.rows))
    assert read_pair_texts(storage, str(path), part) == (rows, skipped)

    # Pairs sampled again: the diffs no longer describe the pairs artifact they name.
    run_stage(BY_NAME["pairs"], job, storage)
    with pytest.raises(DatasetError, match=r"cub/diffs: generated from .*cub/pairs commit .* sampled again"):
        load_pair_texts(storage, "cub/diffs", ds)


def _artifacts(storage: Storage, rows: list[tuple[str, str, str]], extra_diffs: list[str] = ()) -> None:
    """A pairs artifact of (image_a, image_b) and a diffs artifact with one text per pair (plus ``extra_diffs``
    pair ids the pairs artifact lacks), stamped as the generate stage would be."""
    artifacts.write_table(
        pa.Table.from_pylist(
            [
                {"pair_id": pair_id(a, b), "image_id_a": a, "image_id_b": b, "caption_a": "x", "caption_b": "y"}
                for a, b, _ in rows
            ]
        ),
        storage,
        "pairs",
        "pairs",
    )
    diffs = [(pair_id(a, b), t) for a, b, t in rows] + [(p, "a text") for p in extra_diffs]
    artifacts.write_table(
        pa.table(
            {
                "pair_id": [p for p, _ in diffs],
                "text": [t for _, t in diffs],
                "raw": [t for _, t in diffs],
                "engine": ["rule"] * len(diffs),
                "prompt_version": ["v"] * len(diffs),
            }
        ),
        storage,
        "diffs",
        "diffs",
    )
    record = provenance.take(storage, "generate", {}, [Ref("pairs", "pairs", "artifact")])
    provenance.stamp(storage, Ref("diffs", "diffs", "artifact"), record)


def test_diffs_artifact_checks(tmp_path):
    write_cub(tmp_path / "cub")
    ds = read_dataset(Storage(), "cub", str(tmp_path / "cub"), "test")
    a, b, c = ds.image_ids[:3]
    storage = Storage(JobConfig.model_validate({"storage": {"root": str(tmp_path / "run")}}).storage)

    with pytest.raises(DatasetError, match=r"run/diffs: no committed artifact here"):
        load_pair_texts(storage, "diffs", ds)
    rows = [
        (a, b, "The first bird is darker."),
        (b, c, "The first bird is lighter."),
        (a, "nope/x.jpg", "x"),
        (c, c, "the same image twice"),
        (c, a, ""),
    ]
    _artifacts(storage, rows)
    texts = load_pair_texts(storage, "diffs", ds)
    assert sorted(texts.rows) == sorted(rows[:2]) and texts.skipped == 3 and texts.source["rows"] == 5
    assert [pair_id(x, y) for x, y, _ in texts.rows] == sorted(pair_id(x, y) for x, y, _ in rows[:2])
    with pytest.raises(DatasetError, match=r"expected a 'diffs' artifact, found 'pairs'"):
        load_pair_texts(storage, "pairs", ds)

    _artifacts(storage, rows[:2], extra_diffs=["p-0000000000000000"])
    with pytest.raises(DatasetError, match=r"1 diffs rows name pairs that .*pairs does not have.*p-0000000000000000"):
        load_pair_texts(storage, "diffs", ds)

    # Without provenance, the identity every generate run records names the pairs; with neither, nothing does.
    _artifacts(storage, rows[:2])
    manifest = artifacts.read_manifest(storage, "diffs")
    record = manifest.pop("provenance")["inputs"]["pairs"]
    storage.write_json(artifacts.manifest_uri(storage, "diffs"), manifest)
    with pytest.raises(DatasetError, match=r"names no pairs artifact"):
        load_pair_texts(storage, "diffs", ds)
    manifest["identity"] = {"input": record["uri"], "input_attempt": record["commit"]}
    storage.write_json(artifacts.manifest_uri(storage, "diffs"), manifest)
    assert load_pair_texts(storage, "diffs", ds).source["pairs"] == {"uri": record["uri"], "commit": record["commit"]}

    # A generate run that stopped part way: an incomplete artifact is resumed, not evaluated.
    artifacts.Appender(storage, "diffs", "diffs", columns=DIFF_COLUMNS, config={}, identity={}, resume=False)
    with pytest.raises(DatasetError, match=r"run/diffs: the diffs artifact is incomplete"):
        load_pair_texts(storage, "diffs", ds)


def test_a_differences_file_or_an_artifact(tmp_path):
    write_cub(tmp_path / "cub")
    ds = read_dataset(Storage(), "cub", str(tmp_path / "cub"), "test")
    a, b = ds.image_ids[:2]
    path = tmp_path / "diffs.jsonl"
    path.write_text(json.dumps({"image_a": a, "image_b": b, "text": "The first bird is darker."}) + "\n")
    texts = load_pair_texts(Storage(), str(path), ds)
    assert texts.rows == [(a, b, "The first bird is darker.")] and texts.skipped == 0
    assert texts.source["kind"] == "file" and texts.source["uri"] == str(path) and texts.source["commit"]
    assert [names_artifact(u) for u in ("cub/diffs", "s3://b/run/cub/diffs/", "d.jsonl", "d.CSV", "d.parquet")] == [
        True,
        True,
        False,
        False,
        False,
    ]
