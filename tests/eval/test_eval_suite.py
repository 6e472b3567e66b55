"""The eval stage on labelled datasets (fixture layouts), the dataset suite on fixed embeddings, and --compare."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_fixtures import (
    AWA2_ALL_PREDICATES,
    make_export,
    write_awa2,
    write_cifar100,
    write_coco,
    write_cub,
    write_eurosat,
    write_flowers102,
    write_sun397,
)

from pcd_ray.config import ConfigError, EvalConfig, EvalDatasetConfig, JobConfig, ModelSpec, StorageConfig, load_job
from pcd_ray.eval.datasets import read_dataset
from pcd_ray.storage import Storage

WRITERS = {
    "cifar100": write_cifar100,
    "cub": write_cub,
    "eurosat": write_eurosat,
    "sun397": write_sun397,
    "awa2": lambda root: write_awa2(root, predicates=AWA2_ALL_PREDICATES),
    "coco": write_coco,
    "flowers102": lambda root: write_flowers102(root, ["bolero deep blue", "grape hyacinth", "sunflower", "buttercup"]),
}
SPLITS = {"awa2": "all", "coco": "val2014"}


def hashed_encoder(dim: int = 8):
    """A deterministic text encoder: each distinct text gets a fixed random vector."""
    cache: dict = {}

    def encode(texts):
        return (
            np.stack([cache.setdefault(t, np.random.default_rng(abs(hash(t)) % 2**32).normal(size=dim)) for t in texts])
            if texts
            else np.zeros((0, dim))
        )

    return encode


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_dataset_suite_on_fixed_embeddings(kind, tmp_path):
    from pcd_ray.eval.dataset_suite import evaluate_dataset

    WRITERS[kind](tmp_path)
    split = SPLITS.get(kind, "test")
    ds = read_dataset(Storage(), kind, str(tmp_path), split)
    cfg = EvalConfig(
        images=None,
        seeds=[0, 1],
        pairs_per_attribute=20,
        datasets={kind: EvalDatasetConfig(kind=kind, root=str(tmp_path), split=split)},
    )
    emb = np.random.default_rng(0).normal(size=(len(ds), 8))
    out = evaluate_dataset(ds, emb, hashed_encoder(), cfg.datasets[kind], cfg, Storage())
    assert out["num_images"] == len(ds)
    if kind == "coco":
        assert set(out["retrieval"]["captions"]["text_to_image"]) == {"R@1", "R@5", "R@10"}
        assert out["retrieval"]["captions"]["num_captions"] == 8
        return
    assert set(out["zeroshot"]) == {"paper", "ensemble"}
    assert out["zeroshot"]["paper"]["num_images"] == len(ds)
    expected_task = {"cifar100": "size", "flowers102": "colour", "awa2": "attributes"}.get(kind)
    assert (out.get("difference") or {}).get("task") == expected_task
    # Every image is drawn (fewer than the protocol's 100), so each seed scores every qualifying pair: CIFAR-100's
    # 8 larger x 8 smaller images, Flowers102's 2 blue x 2 yellow, AwA2's 66 - 4 x 3 pairs of two classes.
    if expected_task:
        assert (
            out["difference"]["pairs_per_seed"] == {"cifar100": [64, 64], "flowers102": [4, 4], "awa2": [54, 54]}[kind]
        )


def test_eval_config_rejects_unknown_keys_and_empty_eval(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("eval:\n  datasets:\n    c: {kind: cifar100, root: /x, splitt: test}\n")
    with pytest.raises(ConfigError, match=r"eval.datasets.c.splitt"):
        load_job(str(job), [])
    with pytest.raises(ConfigError, match="kind"):
        load_job("local", ["eval.datasets={c: {kind: imagenet, root: /x}}"])
    with pytest.raises(ConfigError, match="at least one entry in datasets"):
        load_job("local", ["eval.images=null"])
    assert load_job("local", ["eval.comparative.alpha=0.8"]).eval.comparative.alpha == 0.8


@pytest.mark.integration
def test_run_eval_on_datasets_and_compare(ray_local, tmp_path, s3_root):
    from pcd_ray.cli import main
    from pcd_ray.eval.job import run_eval

    storage = Storage(StorageConfig(root=str(tmp_path)))
    write_cifar100(tmp_path / "data", per_class=3)
    write_cub(tmp_path / "data")
    cub = read_dataset(storage, "cub", "data", "test")
    (tmp_path / "cub_diffs.jsonl").write_text(
        "\n".join(
            json.dumps({"image_a": a, "image_b": b, "text": "The first bird has a darker back than the second bird."})
            for a, b in zip(cub.image_ids, cub.image_ids[1:])
        )
        + "\n"
    )
    (tmp_path / "cmp.csv").write_text(
        "class_i,class_j,text\n"
        + "".join(
            f"{a},{b},the first animal is {a} while the second is {b}\n"
            for a in ("camel", "lion", "wolf")
            for b in ("camel", "lion", "wolf")
            if a != b
        )
    )
    models = {
        "base": ModelSpec(checkpoint=make_export(storage, "exports/base", 0)),
        "finetuned": ModelSpec(checkpoint=make_export(storage, "exports/finetuned", 1)),
    }
    job = JobConfig(
        storage=storage.cfg,
        eval=EvalConfig(
            images=None,
            models=models,
            seeds=[0, 1],
            pairs_per_attribute=30,
            batch_size=32,
            output=f"{s3_root}/eval",
            datasets={
                "cifar": EvalDatasetConfig(kind="cifar100", root="data", comparatives="cmp.csv"),
                "cub": EvalDatasetConfig(kind="cub", root="data", differences="cub_diffs.jsonl"),
            },
        ),
    )
    report = run_eval(job, storage)

    assert report["data"]["datasets"]["cifar"]["num_images"] == 30 and "images" not in report["data"]
    for name in ("base", "finetuned"):
        entry = report["models"][name]["datasets"]
        assert entry["cifar"]["num_embedded"] == 30 and entry["cifar"]["difference"]["task"] == "size"
        assert entry["cub"]["difference"]["task"] == "llm" and entry["cub"]["difference"]["pairs_per_seed"] == [5, 5]
        comp = entry["cifar"]["comparative"]["protocols"]["paper"]
        assert all({a, b} <= {"camel", "lion", "wolf"} for a, b, _ in comp["pairs"])
        assert entry["cifar"]["geometry"]["distances"]["num_pairs"] == 6
        # Stored embeddings: one committed artifact per model and set.
        assert storage.exists(f"{s3_root}/eval/embeddings/{name}/cifar/_manifest.json")
    md = storage.read_text(f"{s3_root}/eval/report.md")
    assert "Zero-shot classification (labelled datasets" in md and "Difference accuracy (labelled datasets" in md
    assert "Comparative prompting (labelled datasets" in md and "| cub | llm |" in md
    for png in ("report", "comparative_alpha"):  # no synthetic set: the datasets' bars are report.png
        assert storage.read_bytes(f"{s3_root}/eval/{png}.png")[:4] == b"\x89PNG"
    assert not storage.exists(f"{s3_root}/eval/datasets.png")

    # --compare: the same report twice, side by side, written to a third place.
    rc = main(
        [
            "eval",
            "--config",
            "local",
            f"storage.root={tmp_path}",
            f"eval.output={tmp_path}/cmp",
            "--compare",
            f"{s3_root}/eval",
            f"{s3_root}/eval",
        ]
    )
    assert rc == 0
    merged = json.loads((tmp_path / "cmp" / "report.json").read_text())
    run = s3_root.rsplit("/", 1)[-1]  # an output dir named "eval" is labelled by its run root
    assert list(merged["models"]) == [f"{run}/base", f"{run}/finetuned", f"{run}-2/base", f"{run}-2/finetuned"]
    assert merged["baseline"] == f"{run}/base" and set(merged["runs"]) == {run, f"{run}-2"}
    assert f"Δ {run}-2/finetuned" in (tmp_path / "cmp" / "report.md").read_text()
    with pytest.raises(FileNotFoundError, match="no report.json"):
        main(["eval", "--config", "local", f"storage.root={tmp_path}", "--compare", str(tmp_path / "nothing")])


def rule_comparatives() -> dict:
    """The synthetic set's comparatives as the comparatives stage writes them with the rule engine (no Ray):
    {task: {(i, j): text}}."""
    from pcd_ray.config import GenerateConfig
    from pcd_ray.eval.synthetic_suite import COMPARATIVE_TASKS, comparatives_name, task_comparatives
    from pcd_ray.generate.comparatives import all_pairs, pair_rows, synthetic_sets
    from pcd_ray.generate.rule import RuleEngine

    sets = synthetic_sets()
    rows = pair_rows(sets, {s.name: all_pairs(len(s.classes)) for s in sets})
    texts = RuleEngine(GenerateConfig()).generate(
        {c: np.asarray(rows.column(c).to_pylist(), dtype=object) for c in rows.column_names}
    )
    names = {s.name: s.classes for s in sets}
    by_set: dict = {}
    for r, text in zip(rows.to_pylist(), texts):
        dataset = r["pair_id"].rsplit("/", 2)[0]
        by_set.setdefault(dataset, []).append(
            {"class_i": names[dataset][r["i"]], "class_j": names[dataset][r["j"]], "text": text}
        )
    return {task: task_comparatives(task, by_set[comparatives_name(task)]) for task in COMPARATIVE_TASKS}


def test_synthetic_suite_report_tables_and_plots(tmp_path):
    import io

    from PIL import Image

    from pcd_ray.data.attributes import caption, sample_attributes
    from pcd_ray.eval.report import format_table, write_report
    from pcd_ray.eval.synthetic_suite import evaluate_synthetic

    rng = np.random.default_rng(3)
    attrs = [sample_attributes(rng) for _ in range(160)]
    captions = [caption(a, rng) for a in attrs]
    cfg = EvalConfig(seeds=[0, 1], pairs_per_attribute=40, analogies_per_seed=30, conditioned_queries=30)
    models = {
        name: {
            "source": name,
            "num_embedded": 160,
            "embedding_errors": 0,
            **evaluate_synthetic(
                np.random.default_rng(seed).normal(size=(160, 8)),
                attrs,
                captions,
                hashed_encoder(),
                cfg,
                rule_comparatives(),
            ),
        }
        for seed, name in enumerate(["base", "finetuned"])
    }
    report = {
        "data": {"images": "/x", "split": "test", "num_images": 160},
        "settings": {"seeds": [0, 1], "pairs_per_attribute": 40},
        "baseline": "base",
        "models": models,
    }
    paths = write_report(report, Storage(StorageConfig(root=str(tmp_path))), "eval")
    md = (tmp_path / "eval" / "report.md").read_text()
    for title in (
        "Difference accuracy, hard pairs",
        "Zero-shot classification, template ensemble",
        "Comparative prompting (synthetic set",
        "Geometry (synthetic set)",
        "Analogy accuracy",
        "Retrieval (synthetic set",
    ):
        assert title in md, title
    base, tuned = models["base"], models["finetuned"]
    an_b, an_t = base["geometry"]["analogy"]["text"], tuned["geometry"]["analogy"]["text"]
    assert f"| {an_b['accuracy']:.1f} ± {an_b['stderr']:.1f} | {an_t['accuracy']:.1f} ± {an_t['stderr']:.1f} |" in md
    cp = base["comparative"]["size+colour"]["protocols"]["heldout"]
    cell = f"{cp['zeroshot']['confused']:.1f} → {cp['comparative']['confused']:.1f}"
    assert cell in md and cell in format_table(report)
    fwd = base["geometry"]["distances"]["size"]["forward"]
    assert f"{fwd:.3f}" in md
    assert "![confusion](confusion.png)" in md
    assert set(paths["plots"]) == {"report", "comparative_alpha", "confusion"}
    for name, uri in paths["plots"].items():
        img = Image.open(io.BytesIO(Storage().read_bytes(uri)))
        assert img.width > 800 and img.height > 300, name
