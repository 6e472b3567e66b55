"""The evaluation protocols pinned to the authors' evaluation code: the sentences for a class pair, the AwA2
predicates, the pair sampling (all cross-class pairs among 100 images drawn by torch with the seed; 5,000 given
pairs for CUB), the prompts, alpha, the standard error, and for ``paper`` the classes and attribute columns their
numeric ids actually select against ``fixed``'s named ones. The references below follow the authors' loops."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from eval_fixtures import AWA2_ALL_PREDICATES, write_cifar100

from pcd_ray.config import ComparativeConfig, EvalConfig, EvalDatasetConfig, load_job
from pcd_ray.eval.class_difference import (
    attribute_columns,
    class_difference_accuracy,
    draw_pairs,
    seed_summary,
    selection,
)
from pcd_ray.eval.datasets import DatasetError, LabelledSet, read_dataset
from pcd_ray.eval.geometry import difference_distances
from pcd_ray.eval.protocol import FIXED, PAPER, PROTOCOLS, comparative_alpha, get, sample_images
from pcd_ray.storage import Storage

CIFAR100 = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank "
    "telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm"
).split()
AWA2 = (
    "antelope grizzly+bear killer+whale beaver dalmatian persian+cat horse german+shepherd blue+whale siamese+cat "
    "skunk mole tiger hippopotamus leopard moose spider+monkey humpback+whale elephant gorilla ox fox sheep seal "
    "chimpanzee hamster squirrel rhinoceros rabbit bat giraffe wolf chihuahua rat weasel otter buffalo zebra "
    "giant+panda deer bobcat pig lion mouse polar+bear collie walrus raccoon cow dolphin"
).split()
AWA2_TEST = [
    "chimpanzee",
    "giant+panda",
    "leopard",
    "persian+cat",
    "pig",
    "hippopotamus",
    "humpback+whale",
    "raccoon",
    "rat",
    "seal",
]  # testclasses.txt
# The authors' literals: their CIFAR-100 and Flowers102 ids, their AwA2 filter list and the names its comments give.
AUTHORS_LARGE, AUTHORS_SMALL = [15, 42, 43, 97], [36, 65, 74, 80]
AUTHORS_BLUE, AUTHORS_YELLOW = [2, 7], [4, 6, 10, 19]
AUTHORS_TO_FILTER = [34, 38, 40, 41, 51, 52, 53, 54, 56, 57, 58, 59, 60, 61, 62, 83]
AUTHORS_TO_FILTER_COMMENTS = [
    "smelly",
    "tunnels",
    "fast",
    "slow",
    "agility",
    "fish",
    "meat",
    "plankton",
    "insects",
    "forager",
    "grazer",
    "hunter",
    "scavenger",
    "skimmer",
    "stalker",
    "solitary",
]


def flowers_classes() -> list[str]:
    from torchvision.datasets import Flowers102

    return list(Flowers102.classes)


def labelled(kind: str, classes: list[str], labels, **kw) -> LabelledSet:
    """An in-memory split in the readers' display names, images in label order (as the readers' sorted ids)."""
    labels = np.asarray(labels, dtype=np.int64)
    return LabelledSet(
        kind, f"mem://{kind}", "test", classes, [f"{k:05d}.jpg" for k in range(len(labels))], labels, **kw
    )


def cifar_set(labels) -> LabelledSet:
    return labelled("cifar100", [c.replace("_", " ") for c in CIFAR100], labels)


def awa2_set(labels, matrix) -> LabelledSet:
    return labelled(
        "awa2",
        [c.replace("+", " ") for c in AWA2],
        labels,
        class_attributes=np.asarray(matrix),
        attribute_names=list(AWA2_ALL_PREDICATES),
    )


def with_attributes(rows: dict[str, list[str]]) -> np.ndarray:
    """A 50 x 85 0/1 matrix: the named classes have the named predicates, nothing else is set."""
    m = np.zeros((len(AWA2), len(AWA2_ALL_PREDICATES)), dtype=np.int64)
    for c, preds in rows.items():
        m[AWA2.index(c), [AWA2_ALL_PREDICATES.index(p) for p in preds]] = 1
    return m


# ------------------------------------------------------------------------------------ the authors' loops, as written
def authors_perm(n: int, seed: int) -> list[int]:
    """torch.manual_seed(seed); torch.randperm(n), on the global generator (restored afterwards)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.randperm(n).tolist()


def authors_group_pairs(labels, first, second, seed: int) -> list[tuple[int, int, int]]:
    """CIFAR100SizeClassificationDataset / FlowersColorClassificationDataset: (image i, image j, group of i)."""
    subset = [k for k in range(len(labels)) if labels[k] in first or labels[k] in second]
    rand = authors_perm(len(subset), seed)[:100]
    out = []
    for i in range(len(rand)):
        for j in range(i + 1, len(rand)):
            ci, cj = labels[subset[rand[i]]], labels[subset[rand[j]]]
            if ci != cj and ((ci in first and cj in second) or (ci in second and cj in first)):
                out.append((subset[rand[i]], subset[rand[j]], 0 if ci in first else 1))
    return out


def authors_awa2_sentence(m, names, i: int, j: int, to_filter) -> str:
    """gen_attribute_diff_string."""
    d1 = [k for k in range(len(m[i])) if m[i][k] == 1 and m[j][k] != 1 and k not in to_filter]
    d2 = [k for k in range(len(m[j])) if m[j][k] == 1 and m[i][k] != 1 and k not in to_filter]
    return "The first image has attributes of {}, while the second image has attributes of {}".format(
        ", ".join(names[k] for k in d1), ", ".join(names[k] for k in d2)
    )


def authors_awa2(labels_sorted, m, names, seed: int) -> list[tuple[int, int, str]]:
    """AwA2DifferenceClassificationDataset: labels are the sorted-folder labels, rows read at those labels."""
    rand = authors_perm(len(labels_sorted), seed)[:100]
    return [
        (
            rand[i],
            rand[j],
            authors_awa2_sentence(m, names, labels_sorted[rand[i]], labels_sorted[rand[j]], AUTHORS_TO_FILTER),
        )
        for i in range(len(rand))
        for j in range(i + 1, len(rand))
        if labels_sorted[rand[i]] != labels_sorted[rand[j]]
    ]


# ----------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ["paper", "fixed"])
def test_sentences_for_a_class_pair(name):
    p = get(name)
    larger = {
        "paper": "The first image contains a larger animal, whiel the second contains a smaller animal.",
        "fixed": "The first image contains a larger animal, while the second contains a smaller animal.",
    }[name]
    smaller = "The first image contains a smaller animal, while the second contains a larger animal."
    ds = cifar_set([CIFAR100.index("camel"), CIFAR100.index("hamster")])
    firsts = set()
    for seed in range(8):  # two images: the draw decides which comes first
        pairs, texts = draw_pairs(ds, "size", p, seed)
        assert len(pairs) == 1
        firsts.add(int(pairs[0, 0]))
        assert texts == [larger if pairs[0, 0] == 0 else smaller]
    assert firsts == {0, 1}

    blue, yellow = {"paper": ("canterbury bells", "english marigold"), "fixed": ("bolero deep blue", "sunflower")}[name]
    fl = flowers_classes()
    ds = labelled("flowers102", fl, [fl.index(blue), fl.index(yellow)])
    for seed in range(4):
        pairs, texts = draw_pairs(ds, "colour", p, seed)
        assert texts == [
            "The first flower is blue, while the second is yellow."
            if pairs[0, 0] == 0
            else "The first flower is yellow, while the second is blue."
        ]

    # AwA2: chimpanzee and giant panda. ``paper`` reads the matrix rows of antelope and grizzly bear (their sorted
    # test-class labels 0 and 1 index the 50-row matrix) and drops flys/walks, not smelly/tunnels.
    m = with_attributes(
        {
            "chimpanzee": ["black", "smelly", "flys", "hands"],
            "giant+panda": ["white", "tunnels", "walks"],
            "antelope": ["brown", "smelly", "flys"],
            "grizzly+bear": ["big", "tunnels", "walks"],
        }
    )
    ds = awa2_set([AWA2.index("chimpanzee"), AWA2.index("giant+panda")], m)
    expected = {"paper": ("brown, smelly", "big, tunnels"), "fixed": ("black, hands, flys", "white, walks")}[name]
    for seed in range(4):
        pairs, texts = draw_pairs(ds, "attributes", p, seed)
        a, b = expected if pairs[0, 0] == 0 else expected[::-1]
        assert texts == [f"The first image has attributes of {a}, while the second image has attributes of {b}"]


def test_awa2_predicates_dropped():
    ds = awa2_set([0, 1], with_attributes({}))
    kept = {name: attribute_columns(ds, p.attributes) for name, p in PROTOCOLS.items()}
    dropped = {name: [AWA2_ALL_PREDICATES[k] for k in range(85) if k not in cols] for name, cols in kept.items()}
    assert {name: len(cols) for name, cols in kept.items()} == {"paper": 69, "fixed": 69}
    # paper: the authors' numbers are predicates.txt's 1-based ones, applied to 0-based columns: one column on.
    assert (
        dropped["paper"]
        == [AWA2_ALL_PREDICATES[k] for k in AUTHORS_TO_FILTER]
        == [
            "flys",
            "walks",
            "slow",
            "strong",
            "fish",
            "meat",
            "plankton",
            "vegetation",
            "forager",
            "grazer",
            "hunter",
            "scavenger",
            "skimmer",
            "stalker",
            "newworld",
            "nestspot",
        ]
    )
    # fixed: the predicates their comments name, i.e. the same numbers read 1-based.
    assert dropped["fixed"] == [AWA2_ALL_PREDICATES[k - 1] for k in AUTHORS_TO_FILTER] == AUTHORS_TO_FILTER_COMMENTS
    assert PAPER.attributes.template == FIXED.attributes.template
    # A predicate list in another order is not the one the authors' columns index: an error naming each column.
    shuffled = dataclasses.replace(ds, attribute_names=sorted(AWA2_ALL_PREDICATES))
    with pytest.raises(DatasetError, match=r"predicate ids select by position.*34 \('flys', found"):
        attribute_columns(shuffled, PAPER.attributes)


def test_group_pair_sampling_is_the_authors(tmp_path):
    """All cross-group pairs among 100 images drawn by torch.randperm with the seed, in the authors' loop order."""
    rng = np.random.default_rng(0)
    # 500 images over all 100 classes plus 30 more of each of the 8 size classes: 100 of ~270 candidates are drawn.
    labels = np.concatenate([rng.integers(0, 100, 500), np.repeat(AUTHORS_LARGE + AUTHORS_SMALL, 30)])
    ds = cifar_set(labels)
    for p in PROTOCOLS.values():
        for seed in (0, 1, 4):
            pairs, texts = draw_pairs(ds, "size", p, seed)
            ref = authors_group_pairs(labels.tolist(), AUTHORS_LARGE, AUTHORS_SMALL, seed)
            assert pairs.tolist() == [[i, j] for i, j, _ in ref]
            assert texts == [p.size.groups[g].sentence for _, _, g in ref]
            assert len(np.unique(pairs)) == 100
    assert draw_pairs(ds, "size", FIXED, 0)[0].tolist() != draw_pairs(ds, "size", FIXED, 1)[0].tolist()

    fl = flowers_classes()
    labels = rng.integers(0, 102, 600)
    labels[:80] = np.repeat(
        AUTHORS_BLUE + AUTHORS_YELLOW + [fl.index(n) for n in ("bolero deep blue", "sunflower")], 10
    )
    ds = labelled("flowers102", fl, labels)
    pairs, texts = draw_pairs(ds, "colour", PAPER, 3)
    ref = authors_group_pairs(labels.tolist(), AUTHORS_BLUE, AUTHORS_YELLOW, 3)
    assert len(ref) > 0 and pairs.tolist() == [[i, j] for i, j, _ in ref]
    assert texts == [
        (
            "The first flower is blue, while the second is yellow.",
            "The first flower is yellow, while the second is blue.",
        )[g]
        for _, _, g in ref
    ]


def test_awa2_pair_sampling_and_rows_are_the_authors():
    """Every pair of two classes among 100 drawn images; ``paper``'s sentences from the sorted-position rows."""
    rng = np.random.default_rng(1)
    m = rng.integers(0, 2, (50, 85))
    test_classes = [AWA2.index(c) for c in AWA2_TEST]
    # The test split's images in id order, i.e. class folder by class folder, as ImageFolder lists them.
    folders = sorted(AWA2_TEST)
    counts = rng.integers(15, 40, len(folders))
    labels = np.repeat([AWA2.index(c) for c in folders], counts)
    ds = awa2_set(labels, m)
    sorted_labels = np.repeat(np.arange(len(folders)), counts).tolist()
    for seed in (0, 2):
        pairs, texts = draw_pairs(ds, "attributes", PAPER, seed)
        ref = authors_awa2(sorted_labels, m.tolist(), AWA2_ALL_PREDICATES, seed)
        assert pairs.tolist() == [[i, j] for i, j, _ in ref] and texts == [t for _, _, t in ref]
        assert len(np.unique(pairs)) == 100
        # fixed: the same pairs, each class with its own row and the named predicates dropped.
        fixed_pairs, fixed_texts = draw_pairs(ds, "attributes", FIXED, seed)
        assert fixed_pairs.tolist() == pairs.tolist()
        own = [AWA2_ALL_PREDICATES.index(n) for n in AUTHORS_TO_FILTER_COMMENTS]
        assert fixed_texts == [
            authors_awa2_sentence(m.tolist(), AWA2_ALL_PREDICATES, labels[i], labels[j], own) for i, j in pairs
        ]
    rows = selection(ds, "attributes", PAPER)["attribute_rows"]
    assert rows == {
        "chimpanzee": "antelope",
        "giant panda": "grizzly bear",
        "hippopotamus": "killer whale",
        "humpback whale": "beaver",
        "leopard": "dalmatian",
        "persian cat": "persian cat",
        "pig": "horse",
        "raccoon": "german shepherd",
        "rat": "blue whale",
        "seal": "siamese cat",
    }
    assert selection(ds, "attributes", FIXED)["attribute_rows"] == {
        c.replace("+", " "): c.replace("+", " ") for c in folders
    }
    assert set(test_classes) == set(np.unique(labels))


def test_cub_draws_5000_given_pairs_per_seed():
    ds = labelled("cub", ["a", "b"], np.arange(40) % 2)
    rng = np.random.default_rng(2)
    rows = [
        (ds.image_ids[i], ds.image_ids[j], f"text {k}")
        for k, (i, j) in enumerate(rng.integers(0, 40, (6000, 2)))
        if i != j
    ]
    for p in PROTOCOLS.values():
        assert p.llm_pairs_per_seed == 5000
        pairs, texts = draw_pairs(ds, "llm", p, 1, rows)
        take = authors_perm(len(rows), 1)[:5000]
        assert texts == [rows[k][2] for k in take]
        assert pairs.tolist() == [[int(rows[k][0][:5]), int(rows[k][1][:5])] for k in take]
    few = rows[:300]
    assert len(draw_pairs(ds, "llm", FIXED, 0, few)[0]) == 300
    assert sample_images(10, 100, 7).tolist() == authors_perm(10, 7)


def test_paper_selects_the_authors_ids_fixed_selects_names(tmp_path):
    cifar = cifar_set(np.arange(100))
    assert (
        selection(cifar, "size", PAPER)
        == selection(cifar, "size", FIXED)
        == {"larger": ["camel", "leopard", "lion", "wolf"], "smaller": ["hamster", "rabbit", "shrew", "squirrel"]}
    )
    fl = flowers_classes()
    flowers = labelled("flowers102", fl, np.arange(102))
    assert selection(flowers, "colour", PAPER) == {
        "blue": ["canterbury bells", "bird of paradise"],
        "yellow": ["english marigold", "moon orchid", "snapdragon", "giant white arum lily"],
    }
    assert [fl[i] for i in AUTHORS_BLUE + AUTHORS_YELLOW] == [
        *selection(flowers, "colour", PAPER)["blue"],
        *selection(flowers, "colour", PAPER)["yellow"],
    ]
    assert selection(flowers, "colour", FIXED) == {
        "blue": ["bolero deep blue", "grape hyacinth", "stemless gentian", "balloon flower"],
        "yellow": ["yellow iris", "buttercup", "common dandelion", "sunflower"],
    }
    # Ids select by position in the standard class order: a partial class list is an error, not other classes.
    write_cifar100(tmp_path)
    small = read_dataset(Storage(), "cifar100", str(tmp_path), "test")
    with pytest.raises(DatasetError, match=r"class ids select by position .* 15 \('camel', out of range\)"):
        draw_pairs(small, "size", PAPER, 0)
    assert len(draw_pairs(small, "size", FIXED, 0)[0]) == 64  # by name: 8 large x 8 small images


def test_prompts_alpha_and_geometry(tmp_path):
    for p in PROTOCOLS.values():
        assert p.zeroshot_template == "This is a photo of a {label}"
        assert p.geometry_template == "A photo of a {label}"
        assert p.alpha == 0.9 and p.images_per_seed == 100
    assert (PAPER.geometry_unit_prompts, FIXED.geometry_unit_prompts) == (False, True)
    # alpha: the protocol's unless the job sets one.
    assert comparative_alpha(ComparativeConfig(), PAPER) == 0.9
    assert comparative_alpha(ComparativeConfig(alpha=0.8), PAPER) == 0.8
    assert comparative_alpha(load_job("local", ["eval.comparative.alpha=0.7"]).eval.comparative, FIXED) == 0.7
    with pytest.raises(ValueError, match="unknown evaluation protocol 'authors'"):
        get("authors")

    # Raw prompt embeddings (paper): the longer one dominates the difference; unit ones (fixed) weigh both alike.
    t, comp = np.array([[10.0, 0.0], [0.0, 1.0]]), {(0, 1): np.array([1.0, -1.0])}
    assert difference_distances(t, comp, unit_prompts=True)["forward"] == pytest.approx(0.0, abs=1e-12)
    assert difference_distances(t, comp, unit_prompts=False)["forward"] == pytest.approx(1 - 11 / np.sqrt(2 * 101))

    from pcd_ray.eval.dataset_suite import evaluate_dataset

    write_cifar100(tmp_path)
    ds = read_dataset(Storage(), "cifar100", str(tmp_path), "test")
    seen: list[str] = []

    def encode(texts):
        seen.extend(texts)
        return np.stack([np.random.default_rng(abs(hash(x)) % 2**32).normal(size=4) for x in texts])

    cfg = EvalConfig(
        images=None,
        seeds=[0],
        templates=["paper"],
        datasets={"c": EvalDatasetConfig(kind="cifar100", root=str(tmp_path))},
    )
    comps = {(1, 4): "a camel has a hump", (4, 1): "a lion has a mane"}
    out = evaluate_dataset(
        ds,
        np.random.default_rng(0).normal(size=(len(ds), 4)),
        encode,
        cfg.datasets["c"],
        cfg,
        Storage(),
        {"comparatives": comps},
    )
    assert "This is a photo of a camel" in seen and "A photo of a camel" in seen
    assert out["comparative"]["alpha"] == 0.9 and out["geometry"]["template"] == "A photo of a {label}"
    assert out["difference"]["protocol"] == "fixed"


def test_standard_error_over_seeds():
    vals = [50.0, 60.0, 80.0]
    assert seed_summary(vals, PAPER.stderr_ddof) == (pytest.approx(190 / 3), pytest.approx(np.std(vals) / np.sqrt(3)))
    assert seed_summary(vals, FIXED.stderr_ddof)[1] == pytest.approx(np.std(vals, ddof=1) / np.sqrt(3))
    assert seed_summary([None, 70.0], 1) == (70.0, None) and seed_summary([70.0], 0) == (70.0, 0.0)
    ds = cifar_set(np.repeat(AUTHORS_LARGE + AUTHORS_SMALL, 20))
    emb = np.random.default_rng(3).normal(size=(len(ds), 4))
    encode = lambda t: np.random.default_rng(4).normal(size=(len(t), 4))  # noqa: E731
    for p in PROTOCOLS.values():
        res = class_difference_accuracy(ds, emb, encode, "size", seeds=[0, 1, 2, 3, 4], protocol=p)
        assert res["stderr"] == pytest.approx(np.std(res["per_seed"], ddof=p.stderr_ddof) / np.sqrt(5))
