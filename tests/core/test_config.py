"""Config loading: every shipped job validates; typos and wrong types fail naming the key path and the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pcd_ray.config import JOBS_DIR, ConfigError, JobConfig, TrainConfig, apply_overrides, dump, load_job

SHIPPED = sorted(JOBS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_job_validates_and_round_trips(path):
    job = load_job(path)
    assert isinstance(job, JobConfig)
    # The dumped config is itself a valid job file (what `config show` prints and artifacts record).
    assert JobConfig.model_validate(__import__("yaml").safe_load(dump(job))) == job


def test_name_resolves_to_shipped_job():
    assert load_job("local") == load_job(JOBS_DIR / "local.yaml")


def test_unknown_key_names_path_file_and_suggestion(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  optimizer:\n    lr: 0.1\n    wieght_decay: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_job(f)
    msg = str(e.value)
    assert str(f) in msg
    assert "train.optimizer.wieght_decay: unknown key" in msg
    assert "did you mean 'train.optimizer.weight_decay'" in msg


def test_unknown_top_level_section(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("trian: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_job(f)


def test_wrong_type_names_path_and_value():
    with pytest.raises(ConfigError) as e:
        load_job("local", ["train.batch_size=lots"])
    msg = str(e.value)
    assert "train.batch_size" in msg and "'lots'" in msg and "jobs/local.yaml" in msg
    assert "overrides ['train.batch_size=lots']" in msg


def test_misspelled_override_is_an_error_not_a_new_key():
    with pytest.raises(ConfigError, match=r"train\.optimzer: unknown key"):
        load_job("local", ["train.optimzer.lr=1"])


def test_overrides_parse_yaml_values():
    job = load_job(
        "local",
        ["train.optimizer.lr=3e-4", "train.max_steps=null", "eval.seeds=[1, 2]", "storage.root=s3://bucket/run"],
    )
    assert job.train.optimizer.lr == 3e-4 and job.train.max_steps is None
    assert job.eval.seeds == [1, 2] and job.storage.root == "s3://bucket/run"


def test_override_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["novalue"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="not divisible by scaling.num_workers"):
        load_job("local", ["train.batch_size=129", "train.scaling.num_workers=2"])
    with pytest.raises(ValueError, match="nothing to train"):
        TrainConfig.model_validate({"loss": {"diff_weight": 0, "clip_weight": 0}})
    with pytest.raises(ValueError, match="data=captions has no difference texts"):
        TrainConfig.model_validate({"data": "captions"})


def test_missing_job_file_lists_shipped():
    with pytest.raises(ConfigError, match=r"no shipped job of that name \(shipped: .*local"):
        load_job("nope")


def _run(*args):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2]
    )


def test_cli_help_and_config_show_load_no_heavy_libraries():
    code = (
        "import sys; from pcd_ray.cli import main; rc = main(['config', 'show', 'train.epochs=3']); "
        "heavy = [m for m in ('torch', 'ray', 'open_clip', 'deepspeed', 'vllm') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    out = _run("-c", code)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    assert "epochs: 3" in out.stdout
    helped = _run("-m", "pcd_ray", "--help")
    assert helped.returncode == 0 and "demo" in helped.stdout and "pipeline" in helped.stdout


def test_cli_reports_config_errors_with_exit_code_2():
    out = _run("-m", "pcd_ray", "train", "train.optimizer.lrr=1")
    assert out.returncode == 2
    assert "train.optimizer.lrr: unknown key" in out.stderr


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_job_file_loads(path):
    from pcd_ray.config import load_job

    job = load_job(str(path), [])
    assert job.storage.root


def test_cli_overrides_may_follow_options():
    out = subprocess.run(
        [sys.executable, "-m", "pcd_ray", "config", "show", "--config", "local", "train.epochs=7"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "  epochs: 7\n" in out.stdout.split("\ntrain:\n", 1)[1]
    bad = subprocess.run(
        [sys.executable, "-m", "pcd_ray", "config", "show", "--bogus"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
