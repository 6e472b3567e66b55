"""The rule engine: the synthetic set's ground-truth difference sentences, from the pairs' attributes.

It needs no model and runs on any CPU; the offline demo and the tests generate with it (``generate.engine: rule``).
It also words the synthetic set's class comparatives (the comparatives stage): a class such as "large red shape" is
its ``class_prototype``, and the sentence says how one class's prototype differs from the other's.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from pcd_ray.config import GenerateConfig
from pcd_ray.data import attributes as A
from pcd_ray.generate.base import pair_seed

log = logging.getLogger(__name__)

PROTOTYPE: A.Attributes = {
    "kind": "circle",
    "colour": "red",
    "size": "medium",
    "brightness": "bright",
    "count": 1,
    "position": "center",
}
"""The shape every synthetic class is drawn as: two classes' prototypes differ only in the attributes that tell the
classes apart, so their sentence names exactly those."""


def class_prototype(values: dict[str, Any]) -> A.Attributes:
    """A synthetic class (its attribute values, e.g. {"size": "large", "colour": "red"}) as one shape's attributes."""
    return {**PROTOTYPE, **values}


class RuleEngine:
    """Ground-truth differences of the synthetic set: ``attributes.difference_sentence`` per pair.

    The wording choice of a pair depends only on (cfg.seed, pair_id), so a pair gets the same text whatever batch
    or actor it lands in. Class pairs (rows with the class indices ``i`` and ``j``, as the comparatives stage
    writes them) are worded by (i, j) alone: the sentences evaluation has always scored the synthetic set's
    comparatives with. Rows whose attributes are not a JSON object of the synthetic vocabulary get "".
    """

    name = "rule"
    requires = ("attributes_a", "attributes_b")

    def __init__(self, cfg: GenerateConfig):
        self.seed = cfg.seed

    def _one(self, pair_id: str, attrs_a: Any, attrs_b: Any, seed: list[int]) -> str:
        try:
            a, b = json.loads(attrs_a), json.loads(attrs_b)
            return A.difference_sentence(a, b, np.random.default_rng(seed))
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            log.warning("rule engine: pair %s has unusable attributes (%s: %s)", pair_id, type(e).__name__, e)
            return ""

    def generate(self, batch: dict[str, np.ndarray]) -> list[str]:
        pair_ids = [str(p) for p in batch["pair_id"].tolist()]
        if "i" in batch and "j" in batch:
            seeds = [[int(i), int(j)] for i, j in zip(batch["i"].tolist(), batch["j"].tolist())]
        else:
            seeds = [pair_seed(self.seed, p) for p in pair_ids]
        return [
            self._one(p, a, b, s)
            for p, a, b, s in zip(pair_ids, batch["attributes_a"].tolist(), batch["attributes_b"].tolist(), seeds)
        ]
