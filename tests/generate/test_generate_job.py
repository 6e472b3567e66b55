"""The generate stage: prompts, the rule engine, the actor's reject handling, and the Ray job end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest

from pcd_ray import artifacts
from pcd_ray.config import GenerateConfig, JobConfig
from pcd_ray.data.pairs import pair_id, sample_pairs
from pcd_ray.data.synthetic import make_images
from pcd_ray.generate.actor import ENGINES, EngineFailure, GenerateActor, make_engine
from pcd_ray.generate.filter import REASONS
from pcd_ray.generate.job import run_generate
from pcd_ray.generate.prompts import PROMPTS, build_prompt
from pcd_ray.generate.rule import RuleEngine
from pcd_ray.storage import Storage

A1 = {"kind": "circle", "colour": "red", "size": "large", "brightness": "bright", "count": 1, "position": "left"}
A2 = {"kind": "square", "colour": "blue", "size": "small", "brightness": "dark", "count": 3, "position": "right"}
SAME_TEXT = "The two images look the same."


def _batch(rows: list[tuple[str, dict | None, dict | None]]) -> dict[str, np.ndarray]:
    """A numpy batch as Ray Data hands it to the actor: (pair_id, attrs_a, attrs_b) per row."""
    col = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {
        "pair_id": col([r[0] for r in rows]),
        "caption_a": col([f"caption of {r[0]} a" for r in rows]),
        "caption_b": col([f"caption of {r[0]} b" for r in rows]),
        "attributes_a": col([None if r[1] is None else json.dumps(r[1]) for r in rows]),
        "attributes_b": col([None if r[2] is None else json.dumps(r[2]) for r in rows]),
    }


# ---------------------------------------------------------------------------------------------- no Ray needed
def test_build_prompt_is_the_papers_and_versions_are_closed():
    assert build_prompt("paper-v1", "a red circle", "two blue squares") == (
        "What is the visual difference between an image with a description of a red circle and an image with a "
        "description of two blue squares?"
    )
    with pytest.raises(
        KeyError,
        match=r"unknown prompt version 'v9'; known: \['class-v1', 'instruct-v1', "
        r"'paper-v1'\]",
    ):
        build_prompt("v9", "a", "b")
    assert set(PROMPTS) == {"paper-v1", "instruct-v1", "class-v1"}
    assert build_prompt("instruct-v1", "x", "y").startswith("Image A is described as: x\nImage B")


def test_make_engine_and_unknown_names():
    assert isinstance(make_engine(GenerateConfig()), RuleEngine) and set(ENGINES) == {"rule", "transformers", "vllm"}
    with pytest.raises(KeyError, match=r"unknown engine 'gpt'; known: \['rule', 'transformers', 'vllm'\]"):
        make_engine(GenerateConfig.model_construct(engine="gpt", seed=0))


def test_rule_engine_is_stable_per_pair_whatever_the_batch():
    engine = RuleEngine(GenerateConfig(seed=0))
    alone = engine.generate(_batch([("p-1", A1, A2)]))
    mixed = engine.generate(_batch([("p-0", A2, A1), ("p-1", A1, A2), ("p-2", A1, A2)]))
    assert mixed[1] == alone[0] and alone[0].endswith(".")
    # Other pair ids (or another seed) may pick other wordings; over many pairs some must differ.
    many = engine.generate(_batch([(f"p-{k}", A1, A2) for k in range(40)]))
    assert len(set(many)) > 1
    assert RuleEngine(GenerateConfig(seed=1)).generate(_batch([(f"p-{k}", A1, A2) for k in range(40)])) != many


def test_actor_marks_every_row_kept_or_rejected_with_a_reason():
    actor = GenerateActor(GenerateConfig().model_dump())
    out = actor.run(_batch([("p-ok", A1, A2), ("p-same", A1, A1), ("p-none", A1, None), ("p-bad", {"kind": 1}, A2)]))
    rows = {r["pair_id"]: r for r in out.to_pylist()}
    assert out.column_names == ["pair_id", "raw", "text", "reason", "engine", "prompt_version", "tokens"]
    assert rows["p-ok"]["reason"] is None and rows["p-ok"]["text"] == rows["p-ok"]["raw"]
    assert len(rows["p-ok"]["text"]) >= 60
    assert rows["p-same"] == {
        "pair_id": "p-same",
        "raw": SAME_TEXT,
        "text": None,
        "reason": "too_short",
        "engine": "rule",
        "prompt_version": "paper-v1",
        "tokens": 0,
    }
    assert (rows["p-none"]["raw"], rows["p-none"]["text"], rows["p-none"]["reason"]) == ("", None, "no_attributes")
    assert (rows["p-bad"]["text"], rows["p-bad"]["reason"]) == (None, "empty")


def test_actor_logs_progress(monkeypatch, caplog):
    import pcd_ray.generate.actor as actor_module

    monkeypatch.setattr(actor_module, "PROGRESS_EVERY_S", 0.0)
    actor = GenerateActor(GenerateConfig())
    with caplog.at_level("INFO", logger="pcd_ray.generate.actor"):
        actor.run(_batch([("p-1", A1, A2), ("p-2", A1, A1)]))
    assert "generate actor: 2 pairs (1 kept)" in caplog.text


class _Exploding:
    name = "exploding"
    requires = ()

    def generate(self, batch):
        raise ZeroDivisionError("boom")


def test_an_engine_exception_is_a_fault_never_a_reject(tmp_path):
    """Tried faults.batch_attempts times with the engine recovered between tries, recorded each time; past that a
    direct caller gets EngineFailure and no row exists."""
    actor = GenerateActor(
        GenerateConfig(faults={"batch_attempts": 3, "backoff_s": 0}),
        storage={"root": str(tmp_path)},
        faults_uri="faults",
    )
    engine = actor.engine = _Exploding()
    recovered = []
    engine.recover = recovered.append
    with pytest.raises(EngineFailure, match="ZeroDivisionError: boom"):
        actor.run(_batch([("p-1", A1, A2), ("p-2", A2, A1)]))
    assert len(recovered) == 2
    records = sorted(
        (json.loads(r.read_text()) for r in (tmp_path / "faults").glob("*.json")), key=lambda r: r["attempt"]
    )
    assert [(r["attempt"], r["final"]) for r in records] == [(1, False), (2, False), (3, True)]
    assert {r["error"] for r in records} == {"ZeroDivisionError"}


def test_generate_stage_imports_no_torch():
    code = textwrap.dedent("""
        import sys
        import ray.data
        import pcd_ray.generate.job
        from pcd_ray.config import GenerateConfig
        from pcd_ray.generate.actor import GenerateActor
        import numpy as np
        attrs = '{"kind": "circle", "colour": "red", "size": "large", "brightness": "bright", "count": 1, ' \\
                '"position": "left"}'
        col = lambda v: np.array(v, dtype=object)
        GenerateActor(GenerateConfig()).run({"pair_id": col(["p"]), "caption_a": col(["a"]),
                                             "caption_b": col(["b"]), "attributes_a": col([attrs]),
                                             "attributes_b": col([attrs])})
        print(sorted(m for m in ("torch", "torchvision", "open_clip") if m in sys.modules))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------------------------ with Ray
def _job(root: str) -> JobConfig:
    return JobConfig.model_validate(
        {
            "storage": {"root": root},
            "data": {
                "synthetic": {"num_train": 200, "num_test": 20, "image_size": 32, "seed": 11, "rows_per_shard": 110}
            },
            "pairs": {"num_pairs": 500, "seed": 0},
            "generate": {"batch_size": 64, "num_actors": 1},
        }
    )


def _add_crafted_pairs(storage: Storage) -> tuple[list[str], str]:
    """Append pairs of distinct images with identical attributes, and one pair without attributes.

    Returns (ids of the identical-attribute pairs, id of the attribute-less pair).
    """
    images = artifacts.read_table(
        storage, "images", "images", columns=["image_id", "split", "caption", "attributes"]
    ).to_pylist()
    pairs = artifacts.read_table(storage, "pairs", "pairs")
    taken = set(pairs["pair_id"].to_pylist())
    by_attrs: dict[str, list[dict]] = {}
    for img in images:
        by_attrs.setdefault(img["attributes"], []).append(img)
    extra = []
    for group in by_attrs.values():
        if len(group) > 1 and pair_id(group[0]["image_id"], group[1]["image_id"]) not in taken:
            extra.append((group[0], group[1], True))
    assert extra, "seed 11 should give some images with identical attributes"
    extra = extra[:4]
    a, b = images[0], images[1]
    if pair_id(b["image_id"], a["image_id"]) in taken:
        b = images[2]
    extra.append((b, a, False))
    rows = [
        {
            "pair_id": pair_id(x["image_id"], y["image_id"]),
            "image_id_a": x["image_id"],
            "image_id_b": y["image_id"],
            "caption_a": x["caption"],
            "caption_b": y["caption"],
            "attributes_a": x["attributes"] if keep else None,
            "attributes_b": y["attributes"] if keep else None,
        }
        for x, y, keep in extra
    ]
    table = pa.concat_tables([pairs, pa.Table.from_pylist(rows, schema=pairs.schema)])
    artifacts.write_table(table, storage, "pairs", "pairs")
    return [r["pair_id"] for r in rows[:-1]], rows[-1]["pair_id"]


def _check_end_to_end(root: str) -> None:
    job = _job(root)
    storage = Storage(job.storage)
    make_images(job, storage)
    sample_pairs(job, storage)
    same_ids, no_attr_id = _add_crafted_pairs(storage)
    pairs = artifacts.read_table(storage, "pairs", "pairs")

    summary = run_generate(job, storage)

    diffs = artifacts.read_table(storage, "diffs", "diffs")
    rejects = artifacts.read_table(storage, "rejects", "rejects")
    assert diffs.column_names == ["pair_id", "text", "raw", "engine", "prompt_version"]
    assert rejects.column_names == ["pair_id", "raw", "reason", "engine", "prompt_version"]
    assert summary["pairs_in"] == pairs.num_rows == 500 + len(same_ids) + 1
    assert summary["written"] == diffs.num_rows and summary["rejected"] == rejects.num_rows
    assert diffs.num_rows + rejects.num_rows == pairs.num_rows
    kept, dropped = set(diffs["pair_id"].to_pylist()), set(rejects["pair_id"].to_pylist())
    assert not kept & dropped and kept | dropped == set(pairs["pair_id"].to_pylist())

    reasons = dict(zip(rejects["pair_id"].to_pylist(), rejects["reason"].to_pylist()))
    assert all(r in REASONS or r == "no_attributes" for r in reasons.values())
    assert all(reasons[p] == "too_short" for p in same_ids)
    assert reasons[no_attr_id] == "no_attributes"
    raw = dict(zip(rejects["pair_id"].to_pylist(), rejects["raw"].to_pylist()))
    assert all(raw[p] == SAME_TEXT for p in same_ids)
    assert sum(summary["rejected_by_reason"].values()) == rejects.num_rows
    assert summary["rejected_by_reason"]["no_attributes"] == 1

    assert all(len(t) >= 60 for t in diffs["text"].to_pylist())
    assert set(diffs["engine"].to_pylist()) == {"rule"} and set(diffs["prompt_version"].to_pylist()) == {"paper-v1"}
    # The job's text for a pair is what the engine writes for that pair alone.
    first = {k: v[0] for k, v in diffs.slice(0, 1).to_pydict().items()}
    row = pairs.filter(pa.compute.equal(pairs["pair_id"], first["pair_id"])).to_pylist()[0]
    batch = {k: np.array([row[k]], dtype=object) for k in ("pair_id", "attributes_a", "attributes_b")}
    assert RuleEngine(job.generate).generate(batch) == [first["text"]]

    for uri, kind in (("diffs", "diffs"), ("rejects", "rejects")):
        manifest = artifacts.read_manifest(storage, uri, kind)
        assert manifest["summary"] == summary and manifest["config"]["engine"] == "rule"


def test_generate_end_to_end_local(ray_local, tmp_path):
    _check_end_to_end(str(tmp_path / "run"))


def test_generate_end_to_end_s3(ray_local, s3_root):
    _check_end_to_end(s3_root)


def test_no_rejects_still_writes_an_empty_rejects_artifact(ray_local, tmp_path):
    job = JobConfig.model_validate({"storage": {"root": str(tmp_path)}, "generate": {"batch_size": 2}})
    storage = Storage(job.storage)
    rows = [
        {
            "pair_id": f"p-{k}",
            "image_id_a": "a",
            "image_id_b": "b",
            "caption_a": "x",
            "caption_b": "y",
            "attributes_a": json.dumps(A1),
            "attributes_b": json.dumps(A2),
        }
        for k in range(5)
    ]
    artifacts.write_table(pa.Table.from_pylist(rows), storage, "pairs", "pairs")
    summary = run_generate(job, storage)
    assert (summary["written"], summary["rejected"], summary["rejected_by_reason"]) == (5, 0, {})
    rejects = artifacts.read_table(storage, "rejects", "rejects")
    assert rejects.num_rows == 0 and rejects.column_names == ["pair_id", "raw", "reason", "engine", "prompt_version"]
    assert artifacts.read_manifest(storage, "rejects", "rejects")["num_rows"] == 0
