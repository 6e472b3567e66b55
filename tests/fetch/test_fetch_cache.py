"""The download cache and the target's bookkeeping: a file put in the cache by hand is used (and checked), leftovers
of a killed fetch are cleaned up, --force and --clean-cache do what they say, a relative --to is relative to cwd."""

from __future__ import annotations

import json

import pytest
from fetch_archives import BUILDERS, sha256, with_checksums

from pcd_ray.cli import main
from pcd_ray.errors import StageError
from pcd_ray.eval.datasets import read_dataset
from pcd_ray.fetch import specs
from pcd_ray.fetch.job import fetch
from pcd_ray.storage import Storage


def run(spec, server, to, cache, **kw):
    return fetch(
        spec, str(to), cache_dir=cache, base_url=server.url, progress=False, backoff_s=0.01, out=lambda line: None, **kw
    )


def test_file_placed_in_the_cache_is_used_and_checked(server, tmp_path):
    """The way around a host that refuses scripted downloads (Google Drive's quota page)."""
    reed = BUILDERS["cub"]()["cvpr2016_cub.tar.gz"]
    cache = tmp_path / "cache"
    (cache / "cub").mkdir(parents=True)
    (cache / "cub" / "cvpr2016_cub.tar.gz").write_bytes(reed)
    manifest = run(specs.get("cub"), server, tmp_path / "to", cache, only=["captions"])
    assert server.requests == []
    assert manifest["parts"]["captions"]["sources"][0]["sha256"] == sha256(reed)
    assert manifest["complete"] is False  # the images part is still to fetch

    files = BUILDERS["cifar100"]()
    spec = with_checksums("cifar100", files)
    (cache / "cifar100").mkdir()
    (cache / "cifar100" / "cifar-100-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(StageError, match="cifar-100-python.tar.gz: md5 mismatch"):
        run(spec, server, tmp_path / "cifar", cache)
    assert not (cache / "cifar100" / "cifar-100-python.tar.gz").exists()


def test_stale_staging_force_and_clean_cache(server, tmp_path):
    files = BUILDERS["cifar100"]()
    server.files.update(files)
    spec = with_checksums("cifar100", files)
    to, cache = tmp_path / "to", tmp_path / "cache"
    stale = to / ".fetch-staging-cifar100-all-0badc0de"  # what a killed fetch leaves
    (stale / "cifar-100-python").mkdir(parents=True)
    run(spec, server, to, cache)
    assert not stale.exists()
    assert sorted(p.name for p in to.iterdir()) == ["_fetch_cifar100.json", "cifar-100-python"]
    assert (cache / "cifar100" / "cifar-100-python.tar.gz").exists()

    first = json.loads((to / "_fetch_cifar100.json").read_text())["parts"]["all"]["fetched_at"]
    server.requests.clear()
    run(spec, server, to, cache, force=True, clean_cache=True)
    assert server.requests == []  # forced: extracted again from the cached download, which is then deleted
    assert [p.name for p in (cache / "cifar100").iterdir() if p.name != ".lock"] == []
    assert json.loads((to / "_fetch_cifar100.json").read_text())["parts"]["all"]["fetched_at"] >= first
    assert len(read_dataset(Storage(), "cifar100", str(to), "test")) == 4


def test_relative_to_is_relative_to_the_working_directory(server, monkeypatch, tmp_path):
    files = BUILDERS["eurosat"]()
    server.files.update(files)
    monkeypatch.setitem(specs.DATASETS, "eurosat", with_checksums("eurosat", files))
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            ["fetch", "eurosat", "--to", "data/eurosat", "--base-url", server.url, "--cache", "cache", "--no-progress"]
        )
        == 0
    )
    assert (tmp_path / "data" / "eurosat" / "eurosat" / "2750" / "Forest" / "Forest_1.jpg").is_file()
    assert (tmp_path / "cache" / "eurosat" / "EuroSAT.zip").is_file()
