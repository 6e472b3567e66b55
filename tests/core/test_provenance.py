"""Provenance and the stage graph without Ray: every stage of jobs/local.yaml is run by a stand-in that writes its
declared outputs (small artifacts, exports with weights files, a report), through the real ``run_stage``, which
records and stamps provenance. Then ``plan`` (what `pcd-ray status` prints) must find what changed, on a local root
and on s3:// (moto). The same flow through the real stages and CLI: tests/e2e/test_cli_pipeline.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid

import pyarrow as pa
import pytest

from pcd_ray import artifacts, provenance
from pcd_ray.cli import main
from pcd_ray.config import load_job
from pcd_ray.generate import comparatives
from pcd_ray.model.factory import EXPORT_CONFIG, EXPORT_WEIGHTS
from pcd_ray.pipeline import plan, run_stage
from pcd_ray.stages import ordered
from pcd_ray.storage import Storage, join

COLUMNS = dict(
    artifacts.SCHEMAS,
    image_rejects=["image_id", "reason"],
    comparatives=comparatives.COLUMNS,
    comparative_rejects=comparatives.REJECT_COLUMNS,
)


def _write_output(storage: Storage, ref, salt: str) -> None:
    if ref.kind == "artifact":
        table = pa.table({c: [f"{salt}-{c}"] for c in COLUMNS[ref.name]})
        artifacts.write_table(table, storage, ref.uri, ref.name)
    elif ref.kind == "export":
        base = storage.resolve(ref.uri)
        storage.write_bytes(join(base, EXPORT_WEIGHTS), f"weights {salt}".encode())
        storage.write_json(join(base, EXPORT_CONFIG), {"model_cfg": {}, "preprocess_cfg": {}})
        storage.write_json(join(base, "pcd_ray.json"), {"step": 1})
    else:
        storage.write_json(join(storage.resolve(ref.uri), "report.json"), {"salt": salt})


def run_fake(job, storage, name: str, salt: str = "") -> None:
    """run_stage with a stand-in runner that writes the stage's declared outputs."""
    stage = next(s for s in ordered(job, storage) if s.name == name)

    def write(job, storage):
        for ref in stage.outputs(job):
            _write_output(storage, ref, salt or uuid.uuid4().hex)

    run_stage(dataclasses.replace(stage, run=write), job, storage)


def states(job, storage) -> dict[str, tuple[str, str, bool]]:
    return {s.stage: (s.state.status, s.state.reason, s.runs) for s in plan(job, storage)}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, s3_server):
    return str(tmp_path / "run") if request.param == "local" else f"s3://pcd-test/prov-{uuid.uuid4().hex[:8]}"


def made(root: str, *overrides: str):
    job = load_job("local", [f"storage.root={root}", *overrides])
    storage = Storage(job.storage)
    for stage in ordered(job, storage):
        run_fake(job, storage, stage.name)
    return job, storage


def test_order_follows_the_declared_inputs(tmp_path):
    job = load_job("local", [f"storage.root={tmp_path}"])
    names = [s.name for s in ordered(job, Storage(job.storage))]
    assert names == ["data", "pairs", "generate", "comparatives", "base_train", "embed", "train", "eval"]
    # Comparatives of the pairs the base model confuses most: after the stage that makes the base model.
    confused = load_job("local", [f"storage.root={tmp_path}", "comparatives.select=confused"])
    names = [s.name for s in ordered(confused, Storage(confused.storage))]
    assert names.index("base_train") < names.index("comparatives") < names.index("eval")
    # Without the embed section train reads no embeddings, and nothing else changes.
    no_embed = load_job("local", [f"storage.root={tmp_path}", "embed=null", "train.embeddings=null"])
    assert "embed" not in [s.name for s in ordered(no_embed, Storage(no_embed.storage))]


def test_everything_up_to_date_after_a_run(root):
    job, storage = made(root)
    got = states(job, storage)
    assert all(status == "up to date" and not runs for status, _, runs in got.values()), got


def test_a_new_generate_run_makes_train_and_eval_stale_naming_the_diffs(root):
    job, storage = made(root)
    seven = load_job("local", [f"storage.root={root}", "generate.seed=7"])
    before = states(seven, storage)
    assert before["generate"][0] == "stale" and "config changed: generate.seed" in before["generate"][1]
    run_fake(seven, storage, "generate")  # `pcd-ray generate ... generate.seed=7`
    got = states(seven, storage)
    for name in ("data", "pairs", "base_train", "embed", "generate"):
        assert got[name][0] == "up to date" and not got[name][2], (name, got[name])
    assert got["train"][0] == "stale" and "input diffs changed" in got["train"][1] and got["train"][2]
    assert got["eval"][0] == "stale" and "train runs first" in got["eval"][1] and got["eval"][2]


def test_replaced_base_weights_make_embed_train_and_eval_stale(root):
    job, storage = made(root)
    storage.write_bytes(join(storage.resolve("base/export"), EXPORT_WEIGHTS), b"other weights")
    got = states(job, storage)
    assert got["base_train"][0] == "up to date"  # the export itself: its record is about its inputs
    for name in ("embed", "train"):
        assert got[name][0] == "stale" and "model model changed" in got[name][1], got[name]
    assert got["eval"][0] == "stale" and "models.base changed" in got["eval"][1]
    # The same bytes again under a new file: the id is a content hash, so nothing is stale.
    job2, storage2 = made(root)
    weights = join(storage2.resolve("base/export"), EXPORT_WEIGHTS)
    storage2.write_bytes(weights, storage2.read_bytes(weights))
    assert all(not runs for _, _, runs in states(job2, storage2).values())


def test_config_change_missing_and_incomplete_outputs(tmp_path):
    root = str(tmp_path)
    job, storage = made(root)
    lr = load_job("local", [f"storage.root={root}", "train.optimizer.lr=3e-4"])
    assert states(lr, storage)["train"][:2] == ("stale", "config changed: train.optimizer.lr")
    storage.rm("embeddings")
    got = states(job, storage)
    assert got["embed"][0] == "missing" and got["train"][0] == "stale"
    # A generate run that was killed: its manifests say incomplete, and a re-run resumes.
    manifest = artifacts.read_manifest(storage, "diffs")
    storage.write_json(artifacts.manifest_uri(storage, "diffs"), dict(manifest, complete=False))
    assert states(job, storage)["generate"][0] == "incomplete"


def test_output_without_a_record_is_stale(tmp_path):
    job, storage = made(str(tmp_path))
    _write_output(storage, provenance.Ref("pairs", "pairs", "artifact"), "direct")  # a write outside run_stage
    got = states(job, storage)
    assert got["pairs"][0] == "stale" and "no provenance" in got["pairs"][1]
    assert got["generate"][2] and got["train"][2]


def test_status_command_prints_the_graph(tmp_path, capsys):
    root = str(tmp_path)
    made(root)
    assert main(["status", "--config", "local", f"storage.root={root}", "generate.seed=7"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^generate +stale: config changed: generate.seed", out, re.M), out
    assert "pipeline would run: generate, train, eval" in out
    assert main(["pipeline", "--dry-run", "--config", "local", f"storage.root={root}"]) == 0
    assert "pipeline would run: nothing (all up to date)" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(root, "job.yaml")), "a dry run writes nothing"


def test_comparatives_feed_eval_and_follow_the_engine_not_its_seed(tmp_path):
    job, storage = made(str(tmp_path))
    run_fake(job, storage, "comparatives")  # `pcd-ray comparatives` again: a new commit of the artifact
    got = states(job, storage)
    assert got["comparatives"][0] == "up to date"
    assert got["eval"][0] == "stale" and "input comparatives changed" in got["eval"][1] and got["eval"][2]
    # The rule engine words class pairs by their class indices: generate's seed changes no comparative.
    seven = load_job("local", [f"storage.root={tmp_path}", "generate.seed=7"])
    assert states(seven, storage)["comparatives"][0] == "up to date"
    llm = load_job("local", [f"storage.root={tmp_path}", "generate.engine=transformers"])
    status, reason, runs = states(llm, storage)["comparatives"]
    assert status == "stale" and "comparatives.generate.engine" in reason and runs
    # Without the section, eval declares no comparatives input (it reads the artifact only if one is there).
    no_section = load_job("local", [f"storage.root={tmp_path}", "comparatives=null"])
    assert "comparatives" not in [s.name for s in ordered(no_section, storage)]
    assert states(no_section, storage)["eval"][0] == "stale"  # its record names an input it no longer reads
