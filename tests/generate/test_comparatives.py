"""The comparatives stage: class pairs of the evaluation sets through the generate machinery, into an artifact that
eval reads by default (and names in its report).

Without Ray: the class prompt, the rule engine's wording of the synthetic classes (the sentences eval always scored),
which sets a job asks for and refuses, the stage's declarations. With Ray: the rule engine on a small synthetic set
(rows, resume, eval reading it, staleness), the transformers engine on a tiny random Llama over a CIFAR-like
fixture, and ``select: confused`` against eval's own pick of the first model's most-confused pairs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pcd_ray import artifacts
from pcd_ray.config import (
    ComparativesConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    GenerateConfig,
    JobConfig,
    ModelSpec,
    StorageConfig,
    SyntheticConfig,
)
from pcd_ray.data import attributes as A
from pcd_ray.eval.synthetic_suite import COMPARATIVE_TASKS, TASKS, class_label, evaluate_synthetic, task_classes
from pcd_ray.generate.actor import GenerateActor
from pcd_ray.generate.comparatives import (
    COLUMNS,
    REJECT_COLUMNS,
    all_pairs,
    class_sets,
    pair_rows,
    run_comparatives,
    synthetic_sets,
)
from pcd_ray.generate.prompts import CLASS_PROMPTS, build_prompt
from pcd_ray.generate.rule import PROTOTYPE
from pcd_ray.pipeline import run_stage, stage_state
from pcd_ray.stages import BY_NAME
from pcd_ray.storage import Storage

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "eval"))
from eval_fixtures import CIFAR_NAMES, make_export, write_cifar100, write_coco  # noqa: E402
from tiny_llm import write_tiny_llm  # noqa: E402

SIZES = {"synthetic/kind": 6, "synthetic/size": 6, "synthetic/size+colour": 18 * 17}
CIFAR_CLASSES = [n.replace("_", " ") for n in CIFAR_NAMES]


def rule_sentence(task: str, i: int, j: int) -> str:
    """How the evaluation has always worded a class-i prototype against a class-j prototype."""
    classes = task_classes(task)
    a = {**PROTOTYPE, **dict(zip(TASKS[task], classes[i]))}
    b = {**PROTOTYPE, **dict(zip(TASKS[task], classes[j]))}
    return A.difference_sentence(a, b, np.random.default_rng([i, j]))


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    return {
        c: np.asarray(table.column(c).to_pylist(), dtype=np.int64 if c in ("i", "j") else object)
        for c in table.column_names
    }


def small_job(root: Path, **sections) -> JobConfig:
    return JobConfig.model_validate({"storage": {"root": str(root)}, "comparatives": {}, **sections})


# ---------------------------------------------------------------------------------------------- no Ray needed
def test_class_prompt_asks_the_papers_question_about_two_classes():
    assert CLASS_PROMPTS == ("class-v1",)
    assert build_prompt("class-v1", "camel", "aquarium fish") == (
        "What is the visual difference between an image with a description of a photo of a camel and an image with a "
        "description of a photo of a aquarium fish?"
    )


@pytest.mark.parametrize("seed", [0, 7])
def test_rule_engine_words_synthetic_classes_as_evaluation_always_did(seed):
    """Every ordered class pair of the comparative tasks goes through the actor (engine and filter) and comes out
    kept, with the sentence of its own two classes: the demo's comparative numbers stay what they were."""
    sets = synthetic_sets()
    assert [s.name for s in sets] == [f"synthetic/{t}" for t in COMPARATIVE_TASKS]
    rows = pair_rows(sets, {s.name: all_pairs(len(s.classes)) for s in sets})
    assert rows.num_rows == sum(SIZES.values())
    out = GenerateActor(GenerateConfig(prompt_version="class-v1", seed=seed)).run(numpy_batch(rows)).to_pylist()
    assert [r["pair_id"] for r in out] == rows.column("pair_id").to_pylist()
    for r, row in zip(out, rows.to_pylist()):
        task = r["pair_id"].split("/")[1]
        assert r["reason"] is None, r
        assert r["text"] == rule_sentence(task, row["i"], row["j"])
        assert (row["caption_a"], row["caption_b"]) == (
            class_label(task, task_classes(task)[row["i"]]),
            class_label(task, task_classes(task)[row["j"]]),
        )
    assert {r["prompt_version"] for r in out} == {"class-v1"}


def test_sets_asked_for_skipped_and_refused(tmp_path):
    write_cifar100(tmp_path / "cifar", per_class=1)
    write_coco(tmp_path / "coco")
    datasets = {
        "cifar": {"kind": "cifar100", "root": str(tmp_path / "cifar")},
        "captions": {"kind": "coco", "root": str(tmp_path / "coco"), "split": "val2014"},
    }
    storage = Storage(StorageConfig(root=str(tmp_path)))
    # The rule engine cannot describe real classes: every set asked for -> the real ones are skipped, saying why.
    job = small_job(tmp_path, eval={"datasets": datasets})
    sets, skipped = class_sets(job, storage)
    assert [s.name for s in sets] == [f"synthetic/{t}" for t in COMPARATIVE_TASKS]
    assert set(skipped) == {"cifar", "captions"} and "rule engine" in skipped["cifar"]
    # An LLM engine describes CIFAR's classes, by the names eval reads them with; COCO has none.
    llm = small_job(
        tmp_path,
        eval={"images": None, "datasets": datasets},
        generate={"engine": "transformers", "llm": {"model": str(tmp_path / "any")}},
    )
    sets, skipped = class_sets(llm, storage)
    assert [(s.name, s.classes) for s in sets] == [("cifar", CIFAR_CLASSES)] and "COCO" in skipped["captions"]
    # Named sets are never skipped silently.
    with pytest.raises(ConfigError, match=r"comparatives.datasets names 'cifar', but the rule engine"):
        class_sets(small_job(tmp_path, eval={"datasets": datasets}, comparatives={"datasets": ["cifar"]}), storage)
    with pytest.raises(ConfigError, match=r"names 'captions', but a COCO set has captions"):
        class_sets(llm.model_copy(update={"comparatives": ComparativesConfig(datasets=["captions"])}), storage)
    with pytest.raises(
        ConfigError,
        match=r"\['cifra'\] are not evaluation sets of this job; known: \['synthetic', "
        r"'cifar', 'captions'\]",
    ):
        class_sets(small_job(tmp_path, eval={"datasets": datasets}, comparatives={"datasets": ["cifra"]}), storage)
    with pytest.raises(ConfigError, match=r"synthetic needs eval.images"):
        class_sets(llm.model_copy(update={"comparatives": ComparativesConfig(datasets=["synthetic"])}), storage)
    with pytest.raises(ConfigError, match=r"no class pairs to write \(cifar: the rule engine"):
        class_sets(small_job(tmp_path, eval={"images": None, "datasets": datasets}), storage)
    with pytest.raises(ConfigError, match=r"'paper-v1' is not a class prompt; known: \['class-v1'\]"):
        run_comparatives(small_job(tmp_path, comparatives={"prompt_version": "paper-v1"}), storage)


def test_stage_declarations(tmp_path):
    from pcd_ray.provenance import Ref

    stage, evaluation = BY_NAME["comparatives"], BY_NAME["eval"]
    job = small_job(tmp_path)
    assert stage.inputs(job) == [Ref("images", "images", "artifact")]
    assert stage.outputs(job) == [
        Ref("comparatives", "comparatives", "artifact"),
        Ref("comparative_rejects", "comparative_rejects", "artifact"),
    ]
    assert Ref("comparatives", "comparatives", "artifact") in evaluation.inputs(job)
    assert stage.config(job)["generate"] == {"engine": "rule", "filter": job.generate.filter}
    # confused: the first eval model is an input too; without the section eval declares no comparatives.
    confused = small_job(
        tmp_path,
        comparatives={"select": "confused"},
        eval={"models": {"mine": {"checkpoint": "x/export"}, "other": {}}},
    )
    assert stage.inputs(confused)[-1] == Ref("models.mine", "x/export", "export")
    plain = JobConfig(storage=StorageConfig(root=str(tmp_path)))
    assert all(r.name != "comparatives" for r in evaluation.inputs(plain))


def test_synthetic_tasks_without_comparatives_are_left_out_of_the_report(tmp_path):
    from pcd_ray.data.attributes import caption, sample_attributes
    from pcd_ray.eval.report import format_table, write_report

    rng = np.random.default_rng(0)
    attrs = [sample_attributes(rng) for _ in range(90)]
    captions = [caption(a, rng) for a in attrs]
    cache: dict = {}
    encode = lambda texts: np.stack([cache.setdefault(t, rng.normal(size=8)) for t in texts])  # noqa: E731
    cfg = EvalConfig(seeds=[0], pairs_per_attribute=20, analogies_per_seed=10, conditioned_queries=10)
    only_size = {"size": {(i, j): rule_sentence("size", i, j) for i, j in all_pairs(3)}}
    images = rng.normal(size=(90, 8))
    with_size = evaluate_synthetic(images, attrs, captions, encode, cfg, only_size)
    assert set(with_size["comparative"]) == {"size"} and set(with_size["geometry"]["distances"]) == {"size"}
    none = evaluate_synthetic(images, attrs, captions, encode, cfg)
    assert "comparative" not in none and none["geometry"]["distances"] == {}
    report = {
        "data": {
            "images": "/x",
            "split": "test",
            "num_images": 90,
            "comparatives": {"uri": "/runs/comparatives", "commit": None, "rows": 0, "complete": None, "sets": {}},
        },
        "settings": {"seeds": [0], "pairs_per_attribute": 20},
        "baseline": "m",
        "models": {"m": {"source": "m", **none}},
    }
    write_report(report, Storage(StorageConfig(root=str(tmp_path))), "eval")
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "## Analogy accuracy" in md and "## Comparative prompting" not in md and "## Geometry" not in md
    assert (
        "Comparatives: none at `/runs/comparatives`" in md
        and "Comparatives: none at /runs/comparatives" in format_table(report)
    )


# ------------------------------------------------------------------------------------------------------ with Ray
@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> str:
    return str(write_tiny_llm(tmp_path_factory.mktemp("tiny-llm")))


def synthetic_job(storage: Storage, models: dict, **comparatives) -> JobConfig:
    return JobConfig(
        storage=storage.cfg,
        data=DataConfig(synthetic=SyntheticConfig(num_train=8, num_test=90, image_size=32)),
        comparatives=ComparativesConfig(**comparatives),
        eval=EvalConfig(
            models=models,
            seeds=[0],
            pairs_per_attribute=20,
            batch_size=32,
            analogies_per_seed=10,
            conditioned_queries=10,
            templates=["paper"],
        ),
    )


@pytest.mark.integration
def test_rule_engine_on_the_synthetic_set_resumes_and_eval_reads_it(ray_local, tmp_path):
    from pcd_ray.data.synthetic import make_images
    from pcd_ray.eval.report import format_table

    storage = Storage(StorageConfig(root=str(tmp_path)))
    job = synthetic_job(storage, {"base": ModelSpec(checkpoint=make_export(storage, "exports/base", 0))})
    make_images(job, storage)
    stage = BY_NAME["comparatives"]
    first = run_stage(stage, job, storage)
    assert (first["pairs_in"], first["written"], first["rejected"], first["processed"]) == (318, 318, 0, 318)
    assert first["datasets"] == {name: {"classes": {6: 3, 306: 18}[n], "pairs": n} for name, n in SIZES.items()}
    assert first["engine"] == "rule" and first["prompt_version"] == "class-v1" and first["skipped_datasets"] == {}

    table = artifacts.read_table(storage, "comparatives", "comparatives")
    assert table.column_names == COLUMNS
    rows = table.to_pylist()
    assert {d: sum(r["dataset"] == d for r in rows) for d in SIZES} == SIZES
    for r in rows:
        task = r["dataset"].split("/", 1)[1]
        classes = task_classes(task)
        assert r["class_i"] == class_label(task, classes[r["i"]]) and r["class_j"] == class_label(task, classes[r["j"]])
        assert r["text"] == r["raw"] == rule_sentence(task, r["i"], r["j"])
        assert r["pair_id"] == f"{r['dataset']}/{r['i']}/{r['j']}" and r["engine"] == "rule"
    rejects = artifacts.read_manifest(storage, "comparative_rejects", "comparative_rejects")
    assert rejects["num_rows"] == 0 and rejects["columns"] == REJECT_COLUMNS
    manifest = artifacts.read_manifest(storage, "comparatives", "comparatives")
    images = artifacts.read_manifest(storage, "images")["attempt"]
    assert manifest["provenance"]["inputs"]["images"]["commit"] == images

    # Resume: everything is committed, so a second run writes nothing and keeps the same shards.
    second = run_stage(stage, job, storage)
    assert (second["processed"], second["skipped"], second["resumed"], second["written"]) == (0, 318, True, 318)
    again = artifacts.read_manifest(storage, "comparatives", "comparatives")
    assert again["files"] == manifest["files"]

    # Eval reads the artifact by default and names the commit it read.
    report = run_stage(BY_NAME["eval"], job, storage)
    commit = again["attempt"]
    assert report["data"]["comparatives"] == {
        "uri": storage.resolve("comparatives"),
        "commit": commit,
        "rows": 318,
        "complete": True,
        "sets": SIZES,
    }
    entry = report["models"]["base"]
    assert set(entry["comparative"]) == set(COMPARATIVE_TASKS)
    assert entry["geometry"]["distances"]["size+colour"]["num_pairs"] == 306
    assert f"commit `{commit}`" in storage.read_text("eval/report.md") and f"commit {commit}" in format_table(report)
    assert stage_state(BY_NAME["eval"], job, storage).current
    # A new comparatives commit makes the report stale, naming it.
    run_stage(stage, job, storage)
    state = stage_state(BY_NAME["eval"], job, storage)
    assert state.status == "stale" and "input comparatives changed" in state.reason


@pytest.mark.integration
def test_transformers_engine_on_a_labelled_dataset(ray_local, tmp_path, tiny_llm):
    """A random model's answers are mostly rejected by the filter: every class pair is still accounted for, once,
    and what is kept carries its own classes' names."""
    write_cifar100(tmp_path / "cifar", per_class=1)
    job = JobConfig.model_validate(
        {
            "storage": {"root": str(tmp_path / "run")},
            "generate": {
                "engine": "transformers",
                "llm": {"model": tiny_llm},
                "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 24},
                "batch_size": 16,
            },
            "comparatives": {},
            "eval": {"images": None, "datasets": {"cifar": {"kind": "cifar100", "root": str(tmp_path / "cifar")}}},
        }
    )
    storage = Storage(job.storage)
    summary = run_comparatives(job, storage)
    assert summary["pairs_in"] == 90 and summary["datasets"] == {"cifar": {"classes": 10, "pairs": 90}}
    assert summary["engine"] == "transformers" and summary["model"] == tiny_llm and summary["tokens"] > 0

    kept = artifacts.read_table(storage, "comparatives", "comparatives").to_pylist()
    rejected = artifacts.read_table(storage, "comparative_rejects", "comparative_rejects").to_pylist()
    assert len(kept) + len(rejected) == 90 == summary["written"] + summary["rejected"]
    assert sorted((r["i"], r["j"]) for r in kept + rejected) == all_pairs(10)
    assert kept, "sampled output of the tiny model should pass the filter for some class pairs"
    for r in kept + rejected:
        assert r["dataset"] == "cifar" and r["pair_id"] == f"cifar/{r['i']}/{r['j']}"
        assert (r["class_i"], r["class_j"]) == (CIFAR_CLASSES[r["i"]], CIFAR_CLASSES[r["j"]])
        assert r["engine"] == "transformers" and r["prompt_version"] == "class-v1"
    assert all(len(r["text"]) >= 20 and r["raw"] and "<|" not in r["text"] for r in kept)
    assert all(r["reason"] for r in rejected)
    assert summary["rejected_by_reason"] == {
        k: sum(r["reason"] == k for r in rejected) for k in {r["reason"] for r in rejected}
    }


@pytest.mark.integration
def test_confused_selects_the_first_models_most_confused_pairs(ray_local, tmp_path):
    """The stage's pairs are the first model's most-confused ones on the evaluated images, in both orders: with only
    those comparatives available, eval's paper protocol (which picks the model's most-confused pairs among the
    pairs that have comparatives) picks exactly them, with the same confusion counts."""
    from pcd_ray.data.synthetic import make_images
    from pcd_ray.eval.job import run_eval

    storage = Storage(StorageConfig(root=str(tmp_path)))
    models = {
        "first": ModelSpec(checkpoint=make_export(storage, "exports/first", 3)),
        "second": ModelSpec(checkpoint=make_export(storage, "exports/second", 4)),
    }
    job = synthetic_job(storage, models, select="confused", num_pairs=2)
    make_images(job, storage)
    summary = run_stage(BY_NAME["comparatives"], job, storage)
    picked = summary["confused"]
    assert set(picked) == set(SIZES) and all(len(p) == 2 and p[0][2] >= p[1][2] > 0 for p in picked.values())
    rows = artifacts.read_table(storage, "comparatives", "comparatives").to_pylist()
    for dataset, pairs in picked.items():
        got = sorted((r["class_i"], r["class_j"]) for r in rows if r["dataset"] == dataset)
        assert got == sorted(p for a, b, _ in pairs for p in ((a, b), (b, a)))
    assert summary["datasets"]["synthetic/size+colour"] == {"classes": 18, "pairs": 4}
    record = artifacts.read_manifest(storage, "comparatives")["provenance"]["inputs"]
    assert record["models.first"]["kind"] == "export"
    assert artifacts.exists(storage, "comparatives/_confusion/first/synthetic")

    report = run_eval(job, storage)
    for task in COMPARATIVE_TASKS:
        paper = report["models"]["first"]["comparative"][task]["protocols"]["paper"]
        assert paper["pairs"] == picked[f"synthetic/{task}"], task
    assert json.loads(json.dumps(report["data"]["comparatives"]["sets"])) == {d: 4 for d in SIZES}


def test_eval_reads_a_datasets_rows_from_the_artifact_and_its_own_file_first(ray_local, tmp_path):
    from pcd_ray.eval.datasets import DatasetError
    from pcd_ray.eval.job import read_sets

    write_cifar100(tmp_path / "cifar", per_class=1)
    storage = Storage(StorageConfig(root=str(tmp_path)))
    rows = [
        {"dataset": "cifar", "class_i": "camel", "class_j": "lion", "i": 1, "j": 4, "text": "humped, not maned"},
        {"dataset": "cifar", "class_i": "lion", "class_j": "camel", "i": 4, "j": 1, "text": "maned, not humped"},
        {"dataset": "other", "class_i": "x", "class_j": "y", "i": 0, "j": 1, "text": "another set's row"},
    ]
    table = pa.Table.from_pylist(
        [
            dict(r, raw=r["text"], engine="e", prompt_version="class-v1", pair_id=f"{r['dataset']}/{r['i']}/{r['j']}")
            for r in rows
        ]
    )
    manifest = artifacts.write_table(table.select(COLUMNS), storage, "comparatives", "comparatives")
    cfg = EvalConfig(images=None, datasets={"cifar": {"kind": "cifar100", "root": str(tmp_path / "cifar")}})
    sets, data = read_sets(cfg, storage)
    assert sets["cifar"]["inputs"]["comparatives"] == {(1, 4): "humped, not maned", (4, 1): "maned, not humped"}
    assert data["comparatives"] == {
        "uri": storage.resolve("comparatives"),
        "commit": manifest["attempt"],
        "rows": 3,
        "complete": True,
        "sets": {"cifar": 2},
    }
    assert data["datasets"]["cifar"]["comparatives"] == storage.resolve("comparatives")
    # The dataset's own file takes precedence over the artifact.
    own = tmp_path / "own.csv"
    own.write_text("class_i,class_j,text\nwolf,lion,a wolf is grey\n")
    cfg.datasets["cifar"].comparatives = str(own)
    sets, data = read_sets(cfg, storage)
    assert sets["cifar"]["inputs"]["comparatives"] == {(8, 4): "a wolf is grey"}
    assert data["comparatives"]["sets"] == {} and data["datasets"]["cifar"]["comparatives"] == str(own)
    # An artifact class the dataset lacks is an error naming the artifact.
    table = pa.Table.from_pylist(
        [dict(rows[0], class_j="unicorn", raw="r", engine="e", prompt_version="class-v1", pair_id="cifar/1/99")]
    )
    artifacts.write_table(table.select(COLUMNS), storage, "comparatives", "comparatives")
    cfg.datasets["cifar"].comparatives = None
    with pytest.raises(DatasetError, match=r"comparatives: .*\['unicorn'\] not found"):
        read_sets(cfg, storage)
