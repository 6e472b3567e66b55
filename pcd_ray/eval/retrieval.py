"""Retrieval from stored embeddings: text-to-image and image-to-text recall@k on a captioned split, and
difference-conditioned retrieval ("find the image that is like A but larger").

Recall@k: a query is a hit when a correct item ranks in the top k. The rank of the best correct item counts only
candidates scoring strictly higher, so candidates that tie with it (identical caption texts, common in the synthetic
set's loose captions) do not push it down. Similarities are computed in query chunks, so memory stays
O(chunk x candidates) for large test sets.

Difference-conditioned retrieval: the finetuning aligns normalise(ĝ(x1) - ĝ(x2)) with f(T) for a sentence T saying
how x1 differs from x2. For a query image A and the sentence "the first image has more <attribute>" the query
vector is ĝ(A) + m * f̂(T), with m the median distance |ĝ(x) - ĝ(y)| between two random test images (the scale at
which differences live); the answer set is every other image of A's kind and colour whose attribute is larger
(or smaller, for the "less" sentence). The image-only query ĝ(A) is the reference it must beat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pcd_ray.data.attributes import ORDERED, eval_sentence
from pcd_ray.eval.difference import summarize
from pcd_ray.vectors import normalise

EPS = 1e-12
CHUNK = 2048
MAX_CELLS = 1 << 24  # 16M similarities (128 MB) per block, whatever the number of candidates


def _flat(lists: Sequence[np.ndarray], start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) index arrays of ragged per-query index lists[start:stop], rows relative to start."""
    part = [np.asarray(x, dtype=np.int64) for x in lists[start:stop]]
    rows = np.repeat(np.arange(len(part)), [len(x) for x in part])
    return rows, (np.concatenate(part) if part else np.zeros(0, dtype=np.int64))


def best_correct_rank(
    queries: np.ndarray,
    candidates: np.ndarray,
    correct: Sequence[np.ndarray],
    exclude: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Per query, how many candidates score strictly above its best correct candidate (0 = top); -1 when the
    query has no correct candidate. ``exclude`` removes candidates per query (the query image itself)."""
    q, c = normalise(queries, eps=EPS, dtype=np.float64), normalise(candidates, eps=EPS, dtype=np.float64)
    ranks = np.full(len(q), -1, dtype=np.int64)
    chunk = max(1, min(CHUNK, MAX_CELLS // max(len(c), 1)))  # bounds the [chunk, candidates] similarity block
    for s in range(0, len(q), chunk):
        sims = q[s : s + chunk] @ c.T
        if exclude is not None:
            sims[_flat(exclude, s, s + len(sims))] = -np.inf
        mask = np.zeros(sims.shape, dtype=bool)
        mask[_flat(correct, s, s + len(sims))] = True
        best = np.where(mask, sims, -np.inf).max(axis=1)
        has = mask.any(axis=1)
        ranks[s : s + len(sims)] = np.where(has, np.sum(sims > best[:, None], axis=1), -1)
    return ranks


def recall_at_k(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float | None]:
    valid = ranks[ranks >= 0]
    return {f"R@{k}": (float(100.0 * np.mean(valid < k)) if len(valid) else None) for k in ks}


def caption_retrieval(
    image_emb: np.ndarray, caption_emb: np.ndarray, caption_image: np.ndarray, ks: Sequence[int]
) -> dict:
    """Recall@k both ways; caption_emb [m, D] with caption_image [m] the index of the image each caption describes."""
    caption_image = np.asarray(caption_image, dtype=np.int64)
    t2i = best_correct_rank(caption_emb, image_emb, [np.asarray([i]) for i in caption_image])
    order = np.argsort(caption_image, kind="stable")  # group caption indices by image in O(m log m)
    by_image = np.split(order, np.searchsorted(caption_image[order], np.arange(1, len(image_emb))))
    i2t = best_correct_rank(image_emb, caption_emb, by_image)
    return {
        "text_to_image": recall_at_k(t2i, ks),
        "image_to_text": recall_at_k(i2t, ks),
        "num_images": int(len(image_emb)),
        "num_captions": int(len(caption_emb)),
    }


def difference_scale(image_emb: np.ndarray, rng: np.random.Generator, samples: int = 2000) -> float:
    """Median |ĝ(x) - ĝ(y)| over random pairs of distinct images."""
    g = normalise(image_emb, eps=EPS, dtype=np.float64)
    i, j = rng.integers(len(g), size=samples), rng.integers(len(g), size=samples)
    keep = i != j
    return float(np.median(np.linalg.norm(g[i[keep]] - g[j[keep]], axis=1))) if keep.any() else 0.0


def conditioned_retrieval(
    image_emb: np.ndarray,
    attrs: Sequence[dict],
    encode_texts: Callable[[list[str]], np.ndarray],
    *,
    ks: Sequence[int],
    seeds: Sequence[int],
    queries_per_seed: int,
    attributes: Sequence[str] = tuple(ORDERED),
) -> dict:
    """ "Like A but more/less <attribute>" over seeds (module docstring). Hits in %; mean ± s.e. over seeds of the
    mean over attributes, per k, for the text-conditioned query and the image-only reference."""
    g = normalise(image_emb, eps=EPS, dtype=np.float64)
    rank = {a: np.asarray([ORDERED[a].index(x[a]) for x in attrs]) for a in attributes}
    ident = np.asarray([f"{x['kind']}/{x['colour']}" for x in attrs])
    sentences = {(a, d): eval_sentence(a, d, 0) for a in attributes for d in (1, -1)}
    text = dict(zip(sentences, normalise(encode_texts(list(sentences.values())), eps=EPS, dtype=np.float64)))
    per_seed: dict[str, dict[int, list]] = {"text": {k: [] for k in ks}, "image": {k: [] for k in ks}}
    counts = []
    for seed in seeds:
        rng = np.random.default_rng([seed, 17])
        m = difference_scale(image_emb, rng)
        hits = {"text": {k: [] for k in ks}, "image": {k: [] for k in ks}}
        n = 0
        for a in attributes:
            for d in (1, -1):
                # Targets depend only on (identity, rank): one mask per distinct key, not per image.
                keys = {(ident[i], rank[a][i]) for i in range(len(g))}
                by_key = {k: np.flatnonzero((ident == k[0]) & (np.sign(rank[a] - k[1]) == d)) for k in keys}
                targets = [by_key[ident[i], rank[a][i]] for i in range(len(g))]
                eligible = np.flatnonzero([len(t) > 0 for t in targets])
                if not len(eligible):
                    continue
                pick = rng.choice(
                    eligible, size=min(queries_per_seed // (2 * len(attributes)) or 1, len(eligible)), replace=False
                )
                n += len(pick)
                for mode, q in (("text", g[pick] + m * text[a, d]), ("image", g[pick])):
                    r = best_correct_rank(q, g, [targets[i] for i in pick], exclude=[np.asarray([i]) for i in pick])
                    for k in ks:
                        hits[mode][k].append(r < k)
        counts.append(n)
        for mode in hits:
            for k in ks:
                per_seed[mode][k].append(float(100 * np.mean(np.concatenate(hits[mode][k]))) if n else None)
    out: dict = {"queries_per_seed": counts, "attributes": list(attributes)}
    for mode, by_k in per_seed.items():
        out[mode] = {}
        for k, vals in by_k.items():
            mean, stderr = summarize(vals)
            out[mode][f"R@{k}"] = {"accuracy": mean, "stderr": stderr, "per_seed": vals}
    return out
