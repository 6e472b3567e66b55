"""The training set's global order: new every epoch, reproducible, and a resumed run starting at epoch e draws the
order epoch e had (through Ray Data's per-execution seeding, whose counter ``start_at_epoch`` sets)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from pcd_ray.train.data import shuffled_per_epoch, start_at_epoch

pytestmark = pytest.mark.integration


def _epochs(ray, n: int, *, start: int = 0, splits: int = 2) -> list[list[int]]:
    """Each epoch's rows as the train workers see them: one streaming_split per run, iterated once per epoch."""
    ds = shuffled_per_epoch(ray.data.range(96, override_num_blocks=4), seed=7)
    ds.context.execution_options.preserve_order = True  # compare orders, not task timing
    start_at_epoch(ds, start)
    shards = ds.streaming_split(splits, equal=True)
    out = []
    for _ in range(n):
        # One consumer per shard at the same time, as Ray Train's workers (a split hands out blocks on demand).
        with ThreadPoolExecutor(splits) as pool:
            parts = list(pool.map(lambda shard: [r["id"] for r in shard.iter_rows()], shards))
        out.append([i for part in parts for i in part])
    return out


def test_order_changes_every_epoch_and_a_resume_continues_it(ray_local):
    first = _epochs(ray_local, 3)
    assert all(sorted(e) == list(range(96)) for e in first)  # every row once per epoch
    assert len({tuple(e) for e in first}) == 3  # a new order each epoch
    assert _epochs(ray_local, 3) == first  # reproducible from the seed
    assert _epochs(ray_local, 2, start=1) == first[1:]  # resumed at epoch 1: epochs 1, 2 as before
