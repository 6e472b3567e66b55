"""Metrics where users look: TensorBoard event files in the run directory (read back record by record), W&B and
MLflow through their client calls, a clear error when one is configured without its package, and a real training
run's event file."""

from __future__ import annotations

import csv
import struct
import sys
import types
from pathlib import Path

import pytest

from pcd_ray.config import ConfigError, MetricsConfig, StorageConfig
from pcd_ray.metrics import SINKS_FILE, MetricsWriter, numeric_leaves, require_sinks
from pcd_ray.storage import Storage


# ------------------------------------------------------------------------------------------- reading event files
def _records(data: bytes) -> list[bytes]:
    """The TFRecord framing of an event file (length, masked CRC of the length, payload, masked CRC of the
    payload), CRCs checked: what TensorBoard reads."""
    from tensorboardX.record_writer import masked_crc32c

    out, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("Q", header)
        assert struct.unpack("I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header)
        payload = data[pos + 12 : pos + 12 + length]
        assert struct.unpack("I", data[pos + 12 + length : pos + 16 + length])[0] == masked_crc32c(payload)
        out.append(payload)
        pos += 16 + length
    assert pos == len(data), "a truncated record"
    return out


def read_series(files: list[bytes]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard plots a directory's event files (given in name order): every value
    in the order read, except that a session START at step s hides the values at steps >= s read before it."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out: dict[str, list[tuple[int, float]]] = {}
    for data in files:
        for rec in _records(data):
            ev = Event.FromString(rec)
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                out = {tag: [(s, v) for s, v in series if s < ev.step] for tag, series in out.items()}
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def read_scalars(files: list[bytes]) -> dict[str, dict[int, float]]:
    """{tag: {step: value}}, after checking that no tag shows a step twice."""
    out = {}
    for tag, series in read_series(files).items():
        steps = [s for s, _ in series]
        assert steps == sorted(set(steps)), (tag, steps)
        out[tag] = dict(series)
    return out


def local_events(logdir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(logdir.glob("events.out.tfevents.*"))]


# ---------------------------------------------------------------------------------------------------- TensorBoard
def test_scalars_read_back_with_their_tags_and_steps(tmp_path):
    rows = {
        1: {"loss": 2.5, "lr": 1e-3, "epoch": 0},
        2: {"loss": 2.25, "lr": 5e-4, "epoch": 0},
        4: {"loss": 1.75, "lr": 2.5e-4, "epoch": 1},
    }
    with MetricsWriter(str(tmp_path / "run"), MetricsConfig(), resume_step=0) as w:
        for step, row in rows.items():
            w.scalars(step, row, prefix="train")
        # visible before the writer closes: a local TensorBoard follows the file as it grows
        assert read_scalars(local_events(tmp_path / "run"))["train/loss"] == {1: 2.5, 2: 2.25, 4: 1.75}
        w.scalars(4, {"accuracy": 0.5}, prefix="eval")
    got = read_scalars(local_events(tmp_path / "run"))
    assert set(got) == {"train/loss", "train/lr", "train/epoch", "eval/accuracy"}
    for key in ("loss", "lr", "epoch"):
        assert got[f"train/{key}"] == pytest.approx({s: r[key] for s, r in rows.items()}, rel=1e-6)
    assert got["eval/accuracy"] == {4: 0.5}


def test_a_value_that_is_not_a_number_is_an_error(tmp_path):
    with MetricsWriter(str(tmp_path), MetricsConfig()) as w:
        with pytest.raises(TypeError, match="'note': 'str'"):
            w.scalars(1, {"loss": 1.0, "note": "nan?"})


def test_a_nested_report_gives_its_numbers_as_tags(tmp_path):
    report = {
        "zeroshot": {"cifar100": {"top1": 0.5, "n": 100}, "uri": "s3://b/x"},
        "complete": True,
        "difference": {"seeds": [0, 1], "accuracy": 0.25, "stderr": None},
    }
    assert numeric_leaves(report) == {
        "zeroshot/cifar100/top1": 0.5,
        "zeroshot/cifar100/n": 100.0,
        "difference/accuracy": 0.25,
    }
    with MetricsWriter(str(tmp_path), MetricsConfig()) as w:
        w.scalars(7, numeric_leaves(report), prefix="eval/finetuned")
    assert read_scalars(local_events(tmp_path))["eval/finetuned/difference/accuracy"] == {7: 0.25}


def test_resume_hides_steps_trained_again_and_an_eval_hides_nothing(tmp_path):
    """An attempt logs steps 1-5 and dies after its checkpoint at step 3; the resumed attempt trains 4-6 again.
    TensorBoard shows every step once, steps 4-5 from the resumed attempt. A later writer that only adds (an eval,
    resume_step=None) hides nothing."""
    run = str(tmp_path / "run")
    first = MetricsWriter(run, MetricsConfig(), resume_step=0)
    for step in range(1, 6):
        first.scalars(step, {"loss": 10.0 + step}, prefix="train")
    first.close()
    with MetricsWriter(run, MetricsConfig(), resume_step=3) as resumed:
        for step in range(4, 7):
            resumed.scalars(step, {"loss": 20.0 + step}, prefix="train")
    with MetricsWriter(run, MetricsConfig()) as evaluation:
        evaluation.scalars(6, {"accuracy": 0.75}, prefix="eval")
    assert len(local_events(tmp_path / "run")) == 3
    got = read_scalars(local_events(tmp_path / "run"))
    assert got["train/loss"] == {1: 11.0, 2: 12.0, 3: 13.0, 4: 24.0, 5: 25.0, 6: 26.0}
    assert got["eval/accuracy"] == {6: 0.75}


def test_an_s3_run_directory_gets_the_event_file_at_each_flush(s3_root):
    storage = Storage(StorageConfig(root=s3_root))
    run = f"{s3_root}/train/pcd-abc"
    w = MetricsWriter(run, MetricsConfig(), storage, resume_step=0)

    def remote() -> list[bytes]:
        return [storage.read_bytes(u) for u in storage.find(run) if "/events.out.tfevents." in u]

    w.scalars(1, {"loss": 3.0}, prefix="train")
    w.flush()  # the trainer flushes with metrics.csv: every 30 s and before every checkpoint
    assert read_scalars(remote())["train/loss"] == {1: 3.0}
    w.scalars(2, {"loss": 2.0}, prefix="train")
    w.close()
    assert read_scalars(remote())["train/loss"] == {1: 3.0, 2: 2.0}
    assert not Path(w._tb.local).exists()  # the local copy goes with the writer


# ------------------------------------------------------------------------------------------ missing optional sinks
@pytest.mark.parametrize(
    "setting, module, without",
    [
        ({"wandb_project": "pcd"}, "wandb", "unset metrics.wandb_project"),
        ({"mlflow_experiment": "pcd"}, "mlflow", "unset metrics.mlflow_experiment"),
        ({"tensorboard": True}, "tensorboardX", "set metrics.tensorboard: false"),
    ],
)
def test_a_sink_without_its_package_fails_at_the_start_naming_the_install(
    tmp_path, monkeypatch, setting, module, without
):
    from train_helpers import train_job

    from pcd_ray.train.trainer import run_train

    monkeypatch.setitem(sys.modules, module, None)  # an import of it fails, installed or not
    cfg = MetricsConfig(**setting)
    with pytest.raises(ConfigError, match=f"pip install {module} .*, or {without}$"):
        require_sinks(cfg)
    with pytest.raises(ConfigError, match=f"pip install {module}"):
        MetricsWriter(str(tmp_path / "run"), cfg)
    assert not (tmp_path / "run").exists()
    # The training job stops before it starts Ray or builds any data.
    job = train_job(str(tmp_path / "root"), metrics=setting)
    with pytest.raises(ConfigError, match=f"pip install {module}"):
        run_train(job, Storage(job.storage))
    assert not (tmp_path / "root").exists()


def test_unknown_or_incomplete_metrics_settings_are_rejected():
    with pytest.raises(ValueError, match="extra"):
        MetricsConfig.model_validate({"tensorboard": True, "wandb": {"project": "x"}})
    with pytest.raises(ValueError, match="wandb_project"):
        MetricsConfig(wandb_entity="team")
    with pytest.raises(ValueError, match="mlflow_experiment"):
        MetricsConfig(mlflow_tracking_uri="http://127.0.0.1:5000")


# ------------------------------------------------------------------------------- W&B and MLflow: the calls they get
class _Calls(list):
    def __call__(self, _call, *args, **kwargs):
        self.append((_call, args, kwargs))

    def named(self, call):
        return [(a, k) for n, a, k in self if n == call]


def _fake_wandb(calls: _Calls) -> types.ModuleType:
    """The part of the wandb API the writer uses: wandb.init(...) -> run; run.log(data, step=); run.finish()."""
    mod = types.ModuleType("wandb")

    class Run:
        def log(self, data, step=None):
            calls("log", dict(data), step=step)

        def finish(self):
            calls("finish")

    def init(**kwargs):
        calls("init", **kwargs)
        return Run()

    mod.init = init
    return mod


def test_wandb_gets_every_scalar_at_its_step_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    calls = _Calls()
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    cfg = MetricsConfig(tensorboard=False, wandb_project="pcd", wandb_entity="lab")
    run = str(tmp_path / "pcd-1234abcd")
    with MetricsWriter(run, cfg, resume_step=0, params={"lr": 1e-5, "loss": {"diff_weight": 1.0}}) as w:
        w.scalars(20, {"loss": 1.5, "lr": 1e-5}, prefix="train")
        w.scalars(40, {"loss": 1.25, "lr": 5e-6}, prefix="train")
    ((_, init),) = calls.named("init")
    assert init["project"] == "pcd" and init["entity"] == "lab" and init["name"] == "pcd-1234abcd"
    assert init["resume"] == "allow" and init["config"] == {"lr": 1e-5, "loss": {"diff_weight": 1.0}}
    assert [(a[0], k["step"]) for a, k in calls.named("log")] == [
        ({"train/loss": 1.5, "train/lr": 1e-5}, 20),
        ({"train/loss": 1.25, "train/lr": 5e-6}, 40),
    ]
    assert len(calls.named("finish")) == 1
    assert not local_events(tmp_path / "pcd-1234abcd")  # tensorboard: false

    calls.clear()
    with MetricsWriter(run, cfg.model_copy(update={"run_name": "renamed"}), resume_step=40, params={"lr": 2}) as w:
        w.scalars(60, {"loss": 1.0}, prefix="train")
    ((_, again),) = calls.named("init")
    assert again["id"] == init["id"] and again["resume"] == "allow"
    assert again["config"] is None and again["name"] == "renamed"  # the run's config is not rewritten on resume
    assert [(a[0], k["step"]) for a, k in calls.named("log")] == [({"train/loss": 1.0}, 60)]

    calls.clear()  # another project is another run
    with MetricsWriter(run, cfg.model_copy(update={"wandb_project": "other"})):
        pass
    ((_, other),) = calls.named("init")
    assert other["id"] != init["id"] and other["project"] == "other"


def _fake_mlflow(calls: _Calls, store: dict) -> tuple[types.ModuleType, types.ModuleType]:
    """The part of MLflow's client API the writer uses, with MLflow's signatures."""
    mod, entities = types.ModuleType("mlflow"), types.ModuleType("mlflow.entities")

    class Metric:
        def __init__(self, key, value, timestamp, step):
            self.key, self.value, self.timestamp, self.step = key, value, timestamp, step

    class Param:
        def __init__(self, key, value):
            self.key, self.value = key, value

    class MlflowClient:
        def __init__(self, tracking_uri=None):
            calls("client", tracking_uri=tracking_uri)

        def get_experiment_by_name(self, name):
            exp_id = store["experiments"].get(name)
            return None if exp_id is None else types.SimpleNamespace(experiment_id=exp_id)

        def create_experiment(self, name):
            calls("create_experiment", name)
            store["experiments"][name] = str(len(store["experiments"]) + 1)
            return store["experiments"][name]

        def create_run(self, experiment_id, start_time=None, tags=None, run_name=None):
            calls("create_run", experiment_id, run_name=run_name)
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id=f"run-{len(calls)}"))

        def update_run(self, run_id, status=None, name=None):
            calls("update_run", run_id, status=status)

        def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
            calls(
                "log_batch",
                run_id,
                metrics=[(m.key, m.value, m.step) for m in metrics],
                params={p.key: p.value for p in params},
            )

        def set_terminated(self, run_id, status=None, end_time=None):
            calls("set_terminated", run_id)

    entities.Metric, entities.Param = Metric, Param
    mod.MlflowClient, mod.entities = MlflowClient, entities
    return mod, entities


def test_mlflow_gets_params_once_and_every_scalar_at_its_step(tmp_path, monkeypatch):
    calls, store = _Calls(), {"experiments": {}}
    mod, entities = _fake_mlflow(calls, store)
    monkeypatch.setitem(sys.modules, "mlflow", mod)
    monkeypatch.setitem(sys.modules, "mlflow.entities", entities)
    cfg = MetricsConfig(tensorboard=False, mlflow_experiment="pcd", mlflow_tracking_uri="http://127.0.0.1:5000")
    run = str(tmp_path / "pcd-1234abcd")
    with MetricsWriter(run, cfg, resume_step=0, params={"lr": 1e-5, "loss": {"diff_weight": 1.0}}) as w:
        w.scalars(20, {"loss": 1.5, "lr": 1e-5}, prefix="train")
    assert calls.named("client") == [((), {"tracking_uri": "http://127.0.0.1:5000"})]
    assert calls.named("create_experiment") == [(("pcd",), {})]
    ((args, kw),) = calls.named("create_run")
    assert args == ("1",) and kw == {"run_name": "pcd-1234abcd"}
    batches = calls.named("log_batch")
    run_id = batches[0][0][0]
    assert batches == [
        ((run_id,), {"metrics": [], "params": {"lr": "1e-05", "loss.diff_weight": "1.0"}}),
        ((run_id,), {"metrics": [("train/loss", 1.5, 20), ("train/lr", 1e-5, 20)], "params": {}}),
    ]
    assert calls.named("set_terminated") == [((run_id,), {})]
    assert Storage().read_json(str(tmp_path / "pcd-1234abcd" / SINKS_FILE))["mlflow"]["run_id"] == run_id

    calls.clear()  # resumed: the same run, running again, no params (MLflow refuses to change one)
    with MetricsWriter(run, cfg, resume_step=20, params={"lr": 2}) as w:
        w.scalars(40, {"loss": 1.25}, prefix="train")
    assert not calls.named("create_run") and not calls.named("create_experiment")
    assert calls.named("update_run") == [((run_id,), {"status": "RUNNING"})]
    assert calls.named("log_batch") == [((run_id,), {"metrics": [("train/loss", 1.25, 40)], "params": {}})]


def test_training_logs_to_the_mlflow_store_the_driver_resolves(monkeypatch):
    """Rank 0 runs in a Ray worker's directory: MLflow's default store there would be lost, so a train section
    without a tracking URI gets the driver's."""
    from pcd_ray.config import TrainConfig
    from pcd_ray.train.trainer import run_dir_name, with_driver_sinks

    mod = types.ModuleType("mlflow")
    mod.get_tracking_uri = lambda: "file:///home/user/project/mlruns"
    monkeypatch.setitem(sys.modules, "mlflow", mod)
    cfg = TrainConfig(metrics={"mlflow_experiment": "pcd"})
    resolved = with_driver_sinks(cfg)
    assert resolved.metrics.mlflow_tracking_uri == "file:///home/user/project/mlruns"
    assert run_dir_name(resolved) == run_dir_name(cfg) == run_dir_name(TrainConfig())  # metrics never move a run
    explicit = TrainConfig(metrics={"mlflow_experiment": "pcd", "mlflow_tracking_uri": "http://127.0.0.1:5000"})
    assert with_driver_sinks(explicit) == explicit


# ---------------------------------------------------------------------------------------------- a real training run
@pytest.mark.integration
def test_training_writes_every_csv_column_to_the_run_directory(prepared):
    """One CPU worker, 3 steps: the run directory holds an event file with train/<column> for every metrics.csv
    column at every logged step, the same values; a longer relaunch resumes and each step still shows once."""
    from train_helpers import train_job

    from pcd_ray.train.trainer import run_dir_name, run_train

    settings = {
        "output": "train-metrics",
        "log_every": 1,
        "checkpoint_every": None,
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "deepspeed": {"zero_stage": 1, "gradient_accumulation_steps": 1},
    }
    job = train_job(prepared, max_steps=2, **settings)
    summary = run_train(job, Storage(job.storage))
    run_dir = Path(prepared) / "train-metrics" / run_dir_name(job.train)
    assert summary["run_dir"] == str(run_dir)
    resumed = run_train(train_job(prepared, max_steps=3, **settings), Storage(job.storage))
    assert resumed["final_metrics"]["resumed_from_step"] == 2

    events = local_events(run_dir)
    assert len(events) == 2  # one per attempt
    got = read_scalars(events)
    rows = list(csv.DictReader((Path(prepared) / "train-metrics" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    columns = set(rows[0]) - {"step"}
    assert {
        "loss",
        "diff_loss",
        "clip_loss",
        "lr",
        "samples_per_s",
        "data_wait_frac",
        "logit_scale",
        "wall_s",
    } <= columns
    assert set(got) == {f"train/{c}" for c in columns}
    for c in columns:
        assert got[f"train/{c}"] == pytest.approx({int(r["step"]): float(r[c]) for r in rows}, rel=1e-6), c
