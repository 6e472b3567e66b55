"""A small prepared run root (images, pairs, diffs of the synthetic set) shared by the Ray Train tests."""

from __future__ import annotations

import pytest
from train_helpers import train_job

from pcd_ray.storage import Storage


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, ray_local):
    from pcd_ray.data.pairs import sample_pairs
    from pcd_ray.data.synthetic import make_images
    from pcd_ray.generate.job import run_generate

    root = str(tmp_path_factory.mktemp("train-run"))
    job = train_job(root)
    storage = Storage(job.storage)
    make_images(job, storage)
    sample_pairs(job, storage)
    run_generate(job, storage)
    return root
