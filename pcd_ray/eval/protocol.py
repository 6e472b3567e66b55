"""The evaluation protocols (``eval.protocol``): every choice of the labelled-dataset evaluation in one place.

- ``paper``: the authors' evaluation code, choice for choice, including what their numeric indices actually select
  (not what their comments say they select);
- ``fixed`` (the default): the same choices with the index errors fixed (selections by name) and three plain bugs
  fixed (a misspelt sentence, the standard error's ddof, un-normalised geometry prompts).

Where each choice comes from in the authors' code, and what each index error selects, is tabled in docs/EVAL.md
("Protocols"). The eval functions take a ``Protocol``; nothing else holds these choices.

Pair sampling is the authors' for both protocols: per seed, ``torch.manual_seed(seed); torch.randperm(n)[:k]``
picks k of the n candidate images (``sample_images``) and every pair (i, j), i before j in that draw, whose images
differ in what the task compares is kept, in draw order, the first image first (``ordered_pairs``). CUB draws k of
its given pairs the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pcd_ray.eval.templates import GEOMETRY_TEMPLATE, PAPER_TEMPLATE


@dataclass(frozen=True)
class Group:
    """One side of a two-group difference task (e.g. the larger animals)."""

    name: str
    classes: tuple[str, ...]
    """Class names; with ``ids``, the names those ids hold in the dataset's standard class order (checked)."""
    sentence: str
    """The difference sentence when an image of this group comes first."""
    ids: tuple[int, ...] | None = None
    """The authors' class ids (0-based positions in the standard class order): selection by position; None selects
    by name."""


@dataclass(frozen=True)
class GroupTask:
    """A difference task between two groups of classes: pairs with one image of each group, either first."""

    first: Group
    second: Group

    @property
    def groups(self) -> tuple[Group, Group]:
        return self.first, self.second


@dataclass(frozen=True)
class AttributeTask:
    """AwA2: the sentence names the attributes each class has and the other lacks, from the class-attribute matrix."""

    template: str
    """``{a}``: attributes of the first image's class only, ``{b}``: the second's only (", "-joined, column order)."""
    dropped: tuple[str, ...]
    """Predicates left out of the sentences; with ``dropped_ids``, the names those columns hold (checked)."""
    dropped_ids: tuple[int, ...] | None
    """The authors' 0-based columns: selection by position; None selects by name."""
    rows: Literal["class", "sorted_position"]
    """Which matrix row a class's attributes come from: ``class``, its own; ``sorted_position``, the row at the
    class's position among the split's classes sorted by folder name (what the authors' code reads)."""


@dataclass(frozen=True)
class Protocol:
    name: str
    size: GroupTask
    """CIFAR-100: larger vs smaller animals."""
    colour: GroupTask
    """Flowers102: blue vs yellow flowers."""
    attributes: AttributeTask
    """AwA2."""
    images_per_seed: int
    """Images drawn per seed for the class-derived tasks (every qualifying pair among them is scored)."""
    llm_pairs_per_seed: int
    """Given pairs drawn per seed for the ``llm`` task (CUB)."""
    zeroshot_template: str
    """Zero-shot and comparative-prompting class prompt."""
    geometry_template: str
    """Class prompt of the difference distances."""
    geometry_unit_prompts: bool
    """Whether the difference distances normalise the class prompt embeddings before taking their difference."""
    alpha: float
    """Comparative prompting's weight of the plain class embedding, unless the job sets one."""
    stderr_ddof: int
    """Delta degrees of freedom of the standard deviation in the standard error over seeds."""

    def summary(self) -> dict:
        """Every choice, JSON-ready (the report records it)."""
        return dataclasses.asdict(self)


CIFAR_LARGER = ("camel", "leopard", "lion", "wolf")
CIFAR_SMALLER = ("hamster", "rabbit", "shrew", "squirrel")
SIZE_LARGER_FIRST = "The first image contains a larger animal, whiel the second contains a smaller animal."
SIZE_SMALLER_FIRST = "The first image contains a smaller animal, while the second contains a larger animal."
COLOUR_BLUE_FIRST = "The first flower is blue, while the second is yellow."
COLOUR_YELLOW_FIRST = "The first flower is yellow, while the second is blue."
AWA2_TEMPLATE = "The first image has attributes of {a}, while the second image has attributes of {b}"
AWA2_DROPPED_IDS = (34, 38, 40, 41, 51, 52, 53, 54, 56, 57, 58, 59, 60, 61, 62, 83)
"""The authors' filter list: the 1-based numbers of predicates.txt, applied to 0-based columns."""
AWA2_DROPPED_INTENDED = (
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
)
"""The predicates their filter list's comments name (those numbers, 1-based): behaviour and diet."""
AWA2_DROPPED_ACTUAL = (
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
)
"""The predicates their filter list removes (those numbers as 0-based columns of the 85)."""

PAPER = Protocol(
    name="paper",
    size=GroupTask(
        Group("larger", CIFAR_LARGER, SIZE_LARGER_FIRST, ids=(15, 42, 43, 97)),
        Group("smaller", CIFAR_SMALLER, SIZE_SMALLER_FIRST, ids=(36, 65, 74, 80)),
    ),
    # The ids' comments say bluebells, blue poppy / sunflowers, goldenrod, yellow iris, daffodil; in Flowers102's
    # label order (torchvision's, which their loader uses) the ids are these classes.
    colour=GroupTask(
        Group("blue", ("canterbury bells", "bird of paradise"), COLOUR_BLUE_FIRST, ids=(2, 7)),
        Group(
            "yellow",
            ("english marigold", "moon orchid", "snapdragon", "giant white arum lily"),
            COLOUR_YELLOW_FIRST,
            ids=(4, 6, 10, 19),
        ),
    ),
    attributes=AttributeTask(AWA2_TEMPLATE, AWA2_DROPPED_ACTUAL, AWA2_DROPPED_IDS, rows="sorted_position"),
    images_per_seed=100,
    llm_pairs_per_seed=5000,
    zeroshot_template=PAPER_TEMPLATE,
    geometry_template=GEOMETRY_TEMPLATE,
    geometry_unit_prompts=False,
    alpha=0.9,
    stderr_ddof=0,
)

FIXED = dataclasses.replace(
    PAPER,
    name="fixed",
    # By name; CIFAR-100's ids were right, so only the misspelt "whiel" changes.
    size=GroupTask(
        Group("larger", CIFAR_LARGER, SIZE_LARGER_FIRST.replace("whiel", "while")),
        Group("smaller", CIFAR_SMALLER, SIZE_SMALLER_FIRST),
    ),
    # Their comments' bluebells, blue poppy and goldenrod are not Flowers102 classes: clearly blue and clearly yellow
    # species by name instead.
    colour=GroupTask(
        Group("blue", ("bolero deep blue", "grape hyacinth", "stemless gentian", "balloon flower"), COLOUR_BLUE_FIRST),
        Group("yellow", ("yellow iris", "buttercup", "common dandelion", "sunflower"), COLOUR_YELLOW_FIRST),
    ),
    attributes=AttributeTask(AWA2_TEMPLATE, AWA2_DROPPED_INTENDED, None, rows="class"),
    geometry_unit_prompts=True,
    stderr_ddof=1,
)

PROTOCOLS: dict[str, Protocol] = {"paper": PAPER, "fixed": FIXED}


def get(name: str) -> Protocol:
    """The protocol of ``eval.protocol``; ValueError for an unknown name."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r} (known: {', '.join(PROTOCOLS)})")
    return PROTOCOLS[name]


def sample_images(n: int, k: int, seed: int) -> np.ndarray:
    """The authors' draw of k of n items for one seed: ``torch.manual_seed(seed); torch.randperm(n)[:k]`` (a
    generator of its own, seeded alike, so the global one is left alone) -> int64 [min(n, k)] positions."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:k].numpy().astype(np.int64)


def ordered_pairs(picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) of every pair (picks[i], picks[j]) with i < j, in the authors' loop order."""
    i, j = np.triu_indices(len(picks), k=1)
    return np.asarray(picks)[i], np.asarray(picks)[j]


def comparative_alpha(configured, protocol: Protocol) -> float:
    """Comparative prompting's alpha: the job's ``eval.comparative.alpha`` when it sets one, else the protocol's.

    ``configured`` is the ComparativeConfig; a value it holds only as its default counts as unset."""
    if configured.alpha is None or "alpha" not in configured.model_fields_set:
        return protocol.alpha
    return float(configured.alpha)
