"""The rule engine: the synthetic set's ground-truth difference sentences, from the pairs' attributes.

It needs no model and runs on any CPU; the offline demo and the tests generate with it (``generate.engine: rule``).
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


class RuleEngine:
    """Ground-truth differences of the synthetic set: ``attributes.difference_sentence`` per pair.

    The wording choice of a pair depends only on (cfg.seed, pair_id), so a pair gets the same text whatever batch
    or actor it lands in. Rows whose attributes are not a JSON object of the synthetic vocabulary get "".
    """

    name = "rule"
    requires = ("attributes_a", "attributes_b")

    def __init__(self, cfg: GenerateConfig):
        self.seed = cfg.seed

    def _one(self, pair_id: str, attrs_a: Any, attrs_b: Any) -> str:
        try:
            a, b = json.loads(attrs_a), json.loads(attrs_b)
            return A.difference_sentence(a, b, np.random.default_rng(pair_seed(self.seed, pair_id)))
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            log.warning("rule engine: pair %s has unusable attributes (%s: %s)", pair_id, type(e).__name__, e)
            return ""

    def generate(self, batch: dict[str, np.ndarray]) -> list[str]:
        return [self._one(str(p), a, b) for p, a, b in
                zip(batch["pair_id"].tolist(), batch["attributes_a"].tolist(), batch["attributes_b"].tolist())]
