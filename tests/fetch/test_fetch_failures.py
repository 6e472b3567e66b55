"""What goes wrong on the way: dropped connections resume, corrupt or damaged downloads fail with the file and the
digests named and leave nothing at the target, servers that refuse are reported once, bad usage is a usage error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fetch_archives import BUILDERS, md5, sha256, tar_gz, with_checksums, zip_bytes

from pcd_ray.cli import main
from pcd_ray.errors import StageError
from pcd_ray.eval.datasets import read_dataset
from pcd_ray.fetch import specs
from pcd_ray.fetch.job import fetch
from pcd_ray.storage import Storage


@pytest.fixture
def cifar(server):
    files = BUILDERS["cifar100"]()
    server.files.update(files)
    return files["cifar-100-python.tar.gz"], with_checksums("cifar100", files)


def run(spec, server, to, cache, **kw):
    return fetch(
        spec, str(to), cache_dir=cache, base_url=server.url, progress=False, backoff_s=0.01, out=lambda line: None, **kw
    )


def test_dropped_connection_resumes_with_range(server, cifar, tmp_path):
    data, spec = cifar
    server.drop_after["cifar-100-python.tar.gz"] = [1000, 2500]
    manifest = run(spec, server, tmp_path / "to", tmp_path / "cache")
    assert server.requests == [
        ("cifar-100-python.tar.gz", None),
        ("cifar-100-python.tar.gz", "bytes=1000-"),
        ("cifar-100-python.tar.gz", "bytes=3500-"),
    ]
    assert manifest["parts"]["all"]["sources"][0]["sha256"] == sha256(data)
    assert (tmp_path / "cache" / "cifar100" / "cifar-100-python.tar.gz").read_bytes() == data
    assert len(read_dataset(Storage(), "cifar100", str(tmp_path / "to"), "test")) == 4


def test_failed_run_leaves_nothing_at_the_target_and_the_next_run_resumes(server, cifar, tmp_path):
    data, spec = cifar
    to, cache = tmp_path / "to", tmp_path / "cache"
    server.drop_after["cifar-100-python.tar.gz"] = [1234, 0, 0]  # progress, then none twice
    with pytest.raises(StageError, match=r"gave up after 1 retries .* 1234 bytes received are kept"):
        run(spec, server, to, cache, retries=1)
    assert not to.exists()
    assert (cache / "cifar100" / "cifar-100-python.tar.gz.part").stat().st_size == 1234
    server.requests.clear()
    run(spec, server, to, cache)
    assert server.requests == [("cifar-100-python.tar.gz", "bytes=1234-")]
    assert json.loads((to / "_fetch_cifar100.json").read_text())["parts"]["all"]["sources"][0]["md5"] == md5(data)


def test_server_that_ignores_range_restarts_the_file(server, cifar, tmp_path):
    data, spec = cifar
    server.ignore_range = True
    server.drop_after["cifar-100-python.tar.gz"] = [700]
    manifest = run(spec, server, tmp_path / "to", tmp_path / "cache")
    assert [r for _, r in server.requests] == [None, "bytes=700-"]
    assert manifest["parts"]["all"]["sources"][0]["sha256"] == sha256(data)


def test_corrupt_download_fails_names_the_digests_and_is_downloaded_again(server, monkeypatch, cifar, tmp_path, capsys):
    data, spec = cifar
    monkeypatch.setitem(specs.DATASETS, "cifar100", spec)
    bad = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    server.files["cifar-100-python.tar.gz"] = bad
    to, cache = tmp_path / "to", tmp_path / "cache"
    argv = ["fetch", "cifar100", "--to", str(to), "--cache", str(cache), "--base-url", server.url, "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "cifar-100-python.tar.gz: md5 mismatch" in err
    assert f"expected {md5(data)}, got {md5(bad)}" in err
    assert not to.exists()
    assert [p.name for p in (cache / "cifar100").iterdir() if p.name != ".lock"] == []  # no file, no partial
    server.files["cifar-100-python.tar.gz"] = data
    server.requests.clear()
    assert main(argv) == 0
    assert server.requests == [("cifar-100-python.tar.gz", None)]  # from the start, not resumed
    assert len(read_dataset(Storage(), "cifar100", str(to), "test")) == 4


def test_damaged_archive_without_checksum_fails_and_is_deleted(server, tmp_path):
    good = BUILDERS["awa2"]()["AwA2-data.zip"]
    server.files["AwA2-data.zip"] = good[: len(good) // 2]  # served whole: only extraction can tell
    to, cache = tmp_path / "to", tmp_path / "cache"
    with pytest.raises(StageError, match=r"AwA2-data.zip: damaged or not a zip archive .* download was deleted"):
        run(specs.get("awa2"), server, to, cache)
    assert not to.exists()
    assert not (cache / "awa2" / "AwA2-data.zip").exists()
    server.files["AwA2-data.zip"] = good
    run(specs.get("awa2"), server, to, cache)
    assert len(read_dataset(Storage(), "awa2", str(to), "all")) == 9


def test_archive_without_the_expected_layout_writes_nothing(server, tmp_path):
    server.files["AwA2-data.zip"] = zip_bytes({"AwA2/classes.txt": b"1 antelope\n"})
    to = tmp_path / "to"
    to.mkdir()
    (to / "keep.txt").write_text("mine")
    with pytest.raises(StageError, match=r"did not contain Animals_with_Attributes2/classes.txt"):
        run(specs.get("awa2"), server, to, tmp_path / "cache")
    assert sorted(p.name for p in to.iterdir()) == ["keep.txt"]


def test_captions_filter_that_matches_nothing_is_an_error(server, tmp_path):
    server.files["cvpr2016_cub.tar.gz"] = tar_gz({"cvpr2016_cub/images/001.t7": b"x"})
    with pytest.raises(StageError, match=r"no members matching \['cvpr2016_cub/text_c10/\*.txt'\]"):
        run(specs.get("cub"), server, tmp_path / "to", tmp_path / "cache", only=["captions"])
    assert not (tmp_path / "to").exists()


def test_http_error_is_reported_once_and_html_page_is_refused(server, tmp_path):
    with pytest.raises(StageError, match=r"/AwA2-data.zip: HTTP 404"):
        run(specs.get("awa2"), server, tmp_path / "to", tmp_path / "cache")
    assert len(server.requests) == 1
    server.files["cvpr2016_cub.tar.gz"] = b"<html>Google Drive can't scan this file for viruses</html>"
    server.content_type["cvpr2016_cub.tar.gz"] = "text/html; charset=utf-8"
    with pytest.raises(StageError, match=r"sent an HTML page instead of cvpr2016_cub.tar.gz"):
        run(specs.get("cub"), server, tmp_path / "to", tmp_path / "cache", only=["captions"])
    assert not (tmp_path / "to").exists()


def test_transient_status_is_retried_then_given_up(server, tmp_path):
    server.status["AwA2-data.zip"] = 503
    with pytest.raises(StageError, match=r"gave up after 2 retries without progress \(HTTP 503"):
        run(specs.get("awa2"), server, tmp_path / "to", tmp_path / "cache", retries=2)
    assert len(server.requests) == 3


def test_dry_run_touches_nothing(server, tmp_path, capsys):
    to, cache = tmp_path / "to", tmp_path / "cache"
    assert (
        main(
            [
                "fetch",
                "coco",
                "--to",
                str(to),
                "--cache",
                str(cache),
                "--dry-run",
                "--only",
                "val2014",
                "--url",
                f"val2014.zip={server.url}/v.zip",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "val2014.zip" in out and f"{server.url}/v.zip" in out and "no published checksum" in out
    assert "train2014.zip" not in out
    assert not server.requests and not to.exists() and not cache.exists()


def test_list_names_every_dataset(capsys):
    assert main(["fetch", "--list"]) == 0
    out = capsys.readouterr().out
    for name in specs.DATASETS:
        assert f"\n{name} " in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["fetch", "imagenet", "--to", "x"], "unknown dataset 'imagenet'"),
        (["fetch", "coco"], "--to URI is required"),
        (["fetch", "coco", "--to", "x", "--only", "test2014"], "coco has no part 'test2014'"),
        (["fetch", "coco", "--to", "x", "--url", "nope.zip=http://127.0.0.1/x"], "coco has no file 'nope.zip'"),
        (["fetch", "coco", "--to", "x", "data.source=coco"], "fetch takes no key=value overrides"),
    ],
)
def test_bad_usage_is_a_config_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_fetch_imports_nothing_heavy():
    code = (
        "import sys, pcd_ray.cli; pcd_ray.cli.build_parser(); import pcd_ray.fetch.job; "
        "print(sorted(m for m in ('torch', 'ray', 'torchvision', 'open_clip') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
