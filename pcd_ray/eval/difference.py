"""Difference accuracy: the paper's sign test (docs/METHOD.md, "Evaluation") on attribute-labelled test images.

For an ordered pair (a, b) and the ground-truth sentence T ("the objects in the first picture are larger"):

    correct  iff  cos(f(T), normalise(g(a)/|g(a)| - g(b)/|g(b)|)) > 0          (chance: 50%)

Pairs, per seed and ordered attribute (size, brightness, count):

- ``hard`` (the headline): distinct test images whose tested attribute differs, everything else varies freely;
- ``easy`` (a sanity row that saturates quickly): the two images agree on every other attribute. Few such pairs may
  exist in a small test set; all of them are used then, and ``available_pairs`` says how many there were.

Directions are balanced exactly (half the pairs read "first has more", half "first has less"), the pair's order
follows from the drawn direction, and the held-out wording (``attributes.EVAL_TEMPLATES``) is drawn per pair, so a
model whose text embedding ignores the images, or always leans one way, scores about 50%.
Accuracies are percentages; mean and standard error are over seeds.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from pcd_ray.data.attributes import EVAL_TEMPLATES, ORDERED, eval_sentence
from pcd_ray.vectors import difference_direction, normalise

DEFAULT_ATTRIBUTES = tuple(ORDERED)
EPS = 1e-12
Mode = Literal["hard", "easy"]


def _values(attrs: Sequence[dict], attribute: str) -> np.ndarray:
    """Rank of each image's attribute value in ``ORDERED[attribute]``; ValueError names the first bad image."""
    order = ORDERED[attribute]
    out = np.empty(len(attrs), dtype=np.int64)
    for i, a in enumerate(attrs):
        try:
            out[i] = order.index(a[attribute])
        except (KeyError, TypeError, ValueError):
            value = a.get(attribute) if isinstance(a, dict) else a
            raise ValueError(f"image {i}: {attribute}={value!r} is not one of {order}") from None
    return out


def _cross_pairs(groups: list[np.ndarray]) -> np.ndarray:
    """Every unordered pair (i, j) with i and j from two different index groups, as an [m, 2] array."""
    out = [
        np.stack(np.meshgrid(gu, gw, indexing="ij"), -1).reshape(-1, 2)
        for u, gu in enumerate(groups)
        for gw in groups[u + 1 :]
    ]
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def _hard_candidates(values: np.ndarray, num_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Up to ``num_pairs`` distinct unordered pairs with different values, uniform over all such pairs."""
    n = len(values)
    order = np.argsort(values, kind="stable")
    uniq, starts, counts = np.unique(values[order], return_index=True, return_counts=True)
    available = int((n * n - np.sum(counts.astype(np.int64) ** 2)) // 2)
    if available <= 2 * num_pairs:  # few enough to list: exact, and no rejection loop near exhaustion
        return _cross_pairs([order[s : s + c] for s, c in zip(starts, counts)]), available
    # i with weight (n - n_v(i)), then j uniform among the other values: uniform over ordered differing pairs.
    group = np.searchsorted(uniq, values)
    weight = (n - counts[group]).astype(np.float64)
    seen: set[int] = set()
    pairs: list[tuple[int, int]] = []
    while len(pairs) < num_pairs:  # each draw is new with probability > 1/2, so this ends quickly
        i = rng.choice(n, size=2 * num_pairs, p=weight / weight.sum())
        r = rng.integers(0, n - counts[group[i]])
        # Position r in the value-sorted order with i's own block skipped.
        j = order[np.where(r < starts[group[i]], r, r + counts[group[i]])]
        for x, y in zip(i.tolist(), j.tolist()):
            key = min(x, y) * n + max(x, y)
            if key not in seen and len(pairs) < num_pairs:
                seen.add(key)
                pairs.append((x, y))
    return np.asarray(pairs, dtype=np.int64), available


def _easy_candidates(attrs: Sequence[dict], values: np.ndarray, attribute: str) -> np.ndarray:
    """Every unordered pair that differs in ``attribute`` and agrees on all other attributes."""
    by_rest: dict[str, list[int]] = {}
    for i, a in enumerate(attrs):
        key = repr(sorted((k, v) for k, v in a.items() if k != attribute))
        by_rest.setdefault(key, []).append(i)
    out = []
    for members in by_rest.values():
        members = np.asarray(members)
        groups = [members[values[members] == v] for v in np.unique(values[members])]
        out.append(_cross_pairs(groups))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def sample_pairs(
    attrs: Sequence[dict], attribute: str, num_pairs: int, rng: np.random.Generator, mode: Mode = "hard"
) -> tuple[np.ndarray, np.ndarray, int]:
    """Ordered test pairs for one attribute.

    Returns (pairs [m, 2] int64 indices (a, b), directions [m] of +1 (a has more) / -1, available) where m =
    min(num_pairs, available) and ``available`` counts the distinct unordered pairs that qualify. Exactly
    floor(m/2) or ceil(m/2) pairs go each way. Raises ValueError for an unknown mode or attribute value.
    """
    values = _values(attrs, attribute)
    if mode == "hard":
        cand, available = _hard_candidates(values, num_pairs, rng)
    elif mode == "easy":
        cand = _easy_candidates(attrs, values, attribute)
        available = len(cand)
    else:
        raise ValueError(f"mode must be 'hard' or 'easy', got {mode!r}")
    if len(cand) > num_pairs:
        cand = cand[rng.choice(len(cand), size=num_pairs, replace=False)]
    m = len(cand)
    target = np.where(np.arange(m) < m // 2, 1, -1)
    if m % 2:
        target[-1] = rng.choice([-1, 1])
    rng.shuffle(target)
    natural = np.sign(values[cand[:, 0]] - values[cand[:, 1]])
    pairs = np.where((natural == target)[:, None], cand, cand[:, ::-1])
    return pairs.astype(np.int64), target.astype(np.int64), available


def pair_scores(image_emb: np.ndarray, pairs: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """cos(text_k, normalise(ĝ(a) - ĝ(b))) per pair; text_emb is [m, D], one row per pair.

    Two images with the same embedding give a zero difference and score 0, which is not > 0: no credit.
    """
    g = normalise(image_emb, eps=EPS)  # once per image, not once per pair it appears in
    d, _ = difference_direction(g[pairs[:, 0]], g[pairs[:, 1]], eps=EPS, normalised=True)
    return np.sum(normalise(text_emb, eps=EPS) * d, axis=1)


def summarize(per_seed: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(mean, standard error) over seeds; None where undefined (no values; stderr with one seed)."""
    vals = np.asarray([v for v in per_seed if v is not None], dtype=np.float64)
    if not len(vals):
        return None, None
    stderr = float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else None
    return float(vals.mean()), stderr


def difference_accuracy(
    image_emb: np.ndarray,
    attrs: Sequence[dict],
    encode_texts: Callable[[list[str]], np.ndarray],
    *,
    attributes: Sequence[str] = DEFAULT_ATTRIBUTES,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    pairs_per_attribute: int = 500,
    mode: Mode = "hard",
) -> dict:
    """The sign test over seeds and attributes.

    Args:
        image_emb: [n, D] raw image embeddings (normalised here), row i belongs to attrs[i].
        attrs: per image the attribute dict (``attributes.sample_attributes`` keys).
        encode_texts: list of k sentences -> [k, D] text embeddings (raw); called once, on the distinct sentences.
        attributes: ordered attributes to test; seeds: one pair sample per seed; pairs_per_attribute: per seed.
        mode: "hard" or "easy" (module docstring).

    Returns ``{"mode", "chance", "seeds", "pairs_requested", "attributes": {attr: {...}}, "overall": {...}}`` where
    each entry has accuracy (mean %, None without pairs), stderr (None with < 2 seeds), per_seed, pairs_per_seed,
    and attribute entries also ``available_pairs``. Overall per seed is the mean over attributes that had pairs.
    Raises ValueError when shapes disagree or an attribute value is unknown.
    """
    image_emb = np.asarray(image_emb, dtype=np.float64)
    if image_emb.ndim != 2 or len(image_emb) != len(attrs):
        raise ValueError(f"image_emb must be [n, D] with n = len(attrs) = {len(attrs)}, got {image_emb.shape}")
    if not seeds:
        raise ValueError("at least one seed is needed")
    # Pass 1: draw every pair and sentence, so the text encoder runs once on the distinct sentences.
    draws: dict[tuple[str, int], tuple[np.ndarray, list[str]]] = {}
    available: dict[str, int] = {}
    for attribute in attributes:
        n_templates = len(EVAL_TEMPLATES[attribute])
        for seed in seeds:
            # Seeded per (seed, attribute): an attribute's pairs do not depend on which others are evaluated.
            rng = np.random.default_rng([seed, zlib.crc32(f"{mode}:{attribute}".encode())])
            pairs, directions, available[attribute] = sample_pairs(attrs, attribute, pairs_per_attribute, rng, mode)
            templates = rng.integers(n_templates, size=len(pairs))
            texts = [eval_sentence(attribute, int(d), int(t)) for d, t in zip(directions, templates)]
            draws[attribute, seed] = (pairs, texts)
    distinct = sorted({t for _, texts in draws.values() for t in texts})
    text_emb = np.asarray(encode_texts(distinct), dtype=np.float64) if distinct else np.zeros((0, 1))
    if len(text_emb) != len(distinct):
        raise ValueError(f"encode_texts returned {len(text_emb)} rows for {len(distinct)} texts")
    row = {t: k for k, t in enumerate(distinct)}

    # Pass 2: score.
    result: dict = {
        "mode": mode,
        "chance": 50.0,
        "seeds": list(seeds),
        "pairs_requested": pairs_per_attribute,
        "attributes": {},
    }
    for attribute in attributes:
        per_seed, counts = [], []
        for seed in seeds:
            pairs, texts = draws[attribute, seed]
            counts.append(len(pairs))
            if not len(pairs):
                per_seed.append(None)
                continue
            scores = pair_scores(image_emb, pairs, text_emb[[row[t] for t in texts]])
            per_seed.append(float(100.0 * np.mean(scores > 0)))
        mean, stderr = summarize(per_seed)
        result["attributes"][attribute] = {
            "accuracy": mean,
            "stderr": stderr,
            "per_seed": per_seed,
            "pairs_per_seed": counts,
            "available_pairs": available[attribute],
        }
    overall_seed = []
    for k in range(len(seeds)):
        accs = [v["per_seed"][k] for v in result["attributes"].values() if v["per_seed"][k] is not None]
        overall_seed.append(float(np.mean(accs)) if accs else None)
    mean, stderr = summarize(overall_seed)
    result["overall"] = {
        "accuracy": mean,
        "stderr": stderr,
        "per_seed": overall_seed,
        "pairs_per_seed": [
            sum(v["pairs_per_seed"][k] for v in result["attributes"].values()) for k in range(len(seeds))
        ],
    }
    return result
