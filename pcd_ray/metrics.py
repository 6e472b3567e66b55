"""The one place metrics fan out to where people look at them: TensorBoard event files in a run directory (by
default), W&B and MLflow (when ``MetricsConfig`` names them; their packages are optional and imported only then).

Training's rank 0 and the eval driver each hold one ``MetricsWriter`` per run; nothing else writes to its sinks::

    with MetricsWriter(run_dir, cfg.metrics, storage, resume_step=0) as w:
        w.scalars(step, {"loss": 0.7, "lr": 1e-5}, prefix="train")   # tags train/loss, train/lr at that step

Steps are global steps, so a run resumed from a checkpoint continues the same curves: ``resume_step`` makes
TensorBoard hide what an interrupted attempt logged after the checkpoint it resumed (those steps are trained again).
W&B and MLflow continue the same run (their ids are kept in ``<run dir>/metrics_sinks.json``).
"""

from __future__ import annotations

import importlib
import logging
import numbers
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pcd_ray.config import ConfigError, MetricsConfig
from pcd_ray.storage import Storage, is_remote, join

log = logging.getLogger(__name__)
SINKS_FILE = "metrics_sinks.json"  # the W&B / MLflow run ids of a run directory, so a resume logs to the same runs

# sink -> (module imported, package to install, the setting that asks for it, how to do without)
_PACKAGES = {
    "tensorboard": ("tensorboardX", "tensorboardX", "metrics.tensorboard", "set metrics.tensorboard: false"),
    "wandb": ("wandb", "wandb", "metrics.wandb_project", "unset metrics.wandb_project"),
    "mlflow": ("mlflow", "mlflow", "metrics.mlflow_experiment", "unset metrics.mlflow_experiment"),
}


def enabled_sinks(cfg: MetricsConfig) -> list[str]:
    return [
        name
        for name, on in (
            ("tensorboard", cfg.tensorboard),
            ("wandb", cfg.wandb_project),
            ("mlflow", cfg.mlflow_experiment),
        )
        if on
    ]


def _import(sink: str):
    module, package, setting, without = _PACKAGES[sink]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"{setting} is set but the {module!r} package is not installed in this environment: "
            f"pip install {package} (on every node of a cluster), or {without}"
        ) from e


def require_sinks(cfg: MetricsConfig) -> None:
    """Import every configured sink's package now, so a missing one stops the job at its start with the pip
    install to run, rather than after the data is built or at the first logged step."""
    for sink in enabled_sinks(cfg):
        _import(sink)


def tensorboard_command(logdir: str) -> str:
    return f"tensorboard --logdir {logdir}"


def numeric_leaves(tree: Mapping[str, Any], sep: str = "/") -> dict[str, float]:
    """The numbers of a nested report as flat keys (``{"zeroshot": {"top1": 0.5}}`` -> ``{"zeroshot/top1": 0.5}``),
    ready for ``MetricsWriter.scalars``. Other leaves (names, URIs, flags, None, lists) are descriptions, not
    metrics."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out |= {f"{k}{sep}{kk}": vv for kk, vv in numeric_leaves(v, sep).items()}
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out


class MetricsWriter:
    """Scalars by step to every sink ``cfg`` enables. Only the process that owns the run creates one.

    logdir: the run directory (local or s3://) where the event files go. resume_step: this writer continues a run
    from a checkpoint at that step (0: from the start); None: it only adds to the run (an evaluation of a finished
    run), hiding nothing. name: the run's name in W&B and MLflow unless cfg.run_name sets one (default: the logdir's
    name). params: a config to record with a W&B or MLflow run when the run is created."""

    def __init__(
        self,
        logdir: str,
        cfg: MetricsConfig | None = None,
        storage: Storage | None = None,
        *,
        resume_step: int | None = None,
        name: str | None = None,
        params: Mapping[str, Any] | None = None,
    ):
        self.cfg = cfg or MetricsConfig()
        self.storage = storage or Storage()
        self.logdir = self.storage.resolve(logdir)
        self.name = self.cfg.run_name or name or self.logdir.rstrip("/").rsplit("/", 1)[-1]
        require_sinks(self.cfg)
        self._tb = _TensorBoard(self.storage, self.logdir, resume_step) if self.cfg.tensorboard else None
        self._runs: list[_Wandb | _Mlflow] = []
        self.closed = False
        try:
            self._start_runs(params)
        except BaseException:
            self.close()
            raise

    def _start_runs(self, params: Mapping[str, Any] | None) -> None:
        if not (self.cfg.wandb_project or self.cfg.mlflow_experiment):
            return
        ids_uri = join(self.logdir, SINKS_FILE)
        ids = self.storage.read_json(ids_uri) if self.storage.exists(ids_uri) else {}
        if self.cfg.wandb_project:
            self._runs.append(_Wandb(self.cfg, self.name, ids, params))
        if self.cfg.mlflow_experiment:
            self._runs.append(_Mlflow(self.cfg, self.name, ids, params))
        self.storage.write_json(ids_uri, ids | {run.key: run.ids for run in self._runs})
        for run in self._runs:
            log.info("metrics of %s also go to %s run %s", self.logdir, run.key, run.ids)

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        """One value per tag (``<prefix>/<key>``) at global step ``step``. A value that is not a number is an error:
        a sink would drop it or fail later, far from the caller."""
        bad = {k: type(v).__name__ for k, v in values.items() if not isinstance(v, numbers.Real)}
        if bad:
            raise TypeError(f"metrics must be numbers; got {bad} at step {step}")
        tagged = {f"{prefix}/{k}" if prefix else k: float(v) for k, v in values.items()}
        if self._tb:
            self._tb.write(int(step), tagged)
        for run in self._runs:
            run.log(int(step), tagged)

    def flush(self) -> None:
        """Make what was logged so far visible where the run directory is (uploads the event file to s3://)."""
        if self._tb and not self.closed:
            self._tb.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._tb:
            self._tb.close()
        for run in self._runs:
            run.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TensorBoard:
    """One event file per writer, written synchronously with tensorboardX's record writer.

    tensorboardX can write s3:// itself, but only through boto3 with its own endpoint variable (not the job's
    storage settings), re-uploading from a background thread whose queue a flush does not drain. So the file is
    written locally -- in the run directory itself when that is local, where TensorBoard reads it as it grows -- and
    for a remote run directory copied there through Storage at every flush and at the end."""

    def __init__(self, storage: Storage, logdir: str, resume_step: int | None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.storage, self.logdir = storage, logdir
        self.local = Path(tempfile.mkdtemp(prefix="pcd-tensorboard-")) if is_remote(logdir) else Path(logdir)
        self.local.mkdir(parents=True, exist_ok=True)
        # The file is named by the second it starts in: a suffix of its own keeps two writers starting in the same
        # second apart (the record writer truncates what is there) and in the order they started (see below).
        suffix = f".{time.time_ns()}.{os.getpid()}"
        self.writer = EventsWriter(str(self.local / "events"), suffix)
        (self.path,) = self.local.glob(f"events.out.tfevents.*{suffix}")
        if resume_step is not None:
            # TensorBoard reads a directory's event files in name (time) order; a session START at step s hides
            # every step >= s the earlier files hold: the steps an interrupted attempt logged after its checkpoint.
            self.writer.write_event(
                Event(wall_time=time.time(), step=resume_step + 1, session_log=SessionLog(status=SessionLog.START))
            )
        self.writer.flush()

    def write(self, step: int, values: dict[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import scalar

        summary = Summary(value=[v for tag, x in values.items() for v in scalar(tag, x).value])
        self.writer.write_event(Event(wall_time=time.time(), step=step, summary=summary))
        self.writer.flush()  # a local TensorBoard sees each logged step as it comes

    def flush(self) -> None:
        self.writer.flush()
        if is_remote(self.logdir):
            self.storage.write_bytes(join(self.logdir, self.path.name), self.path.read_bytes())

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if is_remote(self.logdir):
            shutil.rmtree(self.local, ignore_errors=True)


class _Wandb:
    """A W&B run, resumed by id when the run directory has logged to the same project before. W&B ignores a step
    lower than one it already has, so steps trained again after a resume keep their first values there."""

    key = "wandb"

    def __init__(self, cfg: MetricsConfig, name: str, ids: dict, params: Mapping[str, Any] | None):
        wandb = _import("wandb")
        where = {"project": cfg.wandb_project, "entity": cfg.wandb_entity}
        old = ids.get(self.key)
        resume = bool(old) and {k: old.get(k) for k in where} == where
        run_id = old["id"] if resume else uuid.uuid4().hex[:16]
        self.run = wandb.init(
            **where, name=name, id=run_id, resume="allow", config=None if resume else dict(params or {})
        )
        self.ids = where | {"id": run_id}

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    """An MLflow run, continued by id when the run directory has logged to the same experiment and server before.
    MLflow keeps every value it is sent: steps trained again after a resume show a second value, the later one
    being the model that went on."""

    key = "mlflow"

    def __init__(self, cfg: MetricsConfig, name: str, ids: dict, params: Mapping[str, Any] | None):
        mlflow = _import("mlflow")
        from mlflow.entities import Param

        self.client = mlflow.MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)
        where = {"tracking_uri": cfg.mlflow_tracking_uri, "experiment": cfg.mlflow_experiment}
        old = ids.get(self.key)
        if old and {k: old.get(k) for k in where} == where:
            self.run_id = old["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(cfg.mlflow_experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(cfg.mlflow_experiment)
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            # Params only when the run is created: MLflow refuses to change one, and a resume may change some
            # (max_steps, ...).
            flat = [Param(k, str(v)) for k, v in _flatten(dict(params or {})).items()]
            for i in range(0, len(flat), 100):  # MLflow's limit of params per request
                self.client.log_batch(self.run_id, params=flat[i : i + 100])
        self.ids = where | {"run_id": self.run_id}

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
