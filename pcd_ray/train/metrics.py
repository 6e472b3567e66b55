"""Training metrics on rank 0: a progress line per logged step, ``<output>/metrics.csv`` kept current on storage,
every column as a ``train/<column>`` scalar through ``pcd_ray.metrics.MetricsWriter`` (TensorBoard event files in
the run directory, W&B, MLflow), and a training-curve PNG at the end.

The CSV is rewritten whole (storage may be s3://, which cannot append) at most every ``flush_every_s`` and before
every checkpoint, so after a crash it holds at least the steps the restored checkpoint covers; the event file of a
remote run directory is uploaded at the same moments. A resumed run keeps the rows up to its restored step and drops
the ones after it (those steps are trained again), and TensorBoard hides them.
"""

from __future__ import annotations

import csv
import io
import time

from pcd_ray.metrics import MetricsWriter
from pcd_ray.storage import Storage, join

PROGRESS_SHARE = 0.2
"""A progress line is printed each time training passes another fifth of its steps."""
PROGRESS = (
    "[{label}] step {step}/{total} ({pct:.0f}%) loss {loss:.4f} (diff {diff_loss:.4f}, clip {clip_loss:.4f}) "
    "lr {lr:.2e} {samples_per_s:.0f} samples/s, data wait {wait:.0f}%"
)


class MetricsLog:
    def __init__(
        self,
        storage: Storage,
        output: str,
        *,
        resume_step: int = 0,
        flush_every_s: float = 30.0,
        writer: MetricsWriter | None = None,
        label: str = "train",
    ):
        self.storage, self.uri = storage, join(output, "metrics.csv")
        self.writer = writer
        self.label = label  # the job section training: progress lines start with it
        self.flush_every_s = flush_every_s
        self.rows: list[dict] = []
        if resume_step and storage.exists(self.uri):
            old = csv.DictReader(io.StringIO(storage.read_text(self.uri)))
            self.rows = [r for r in old if int(r["step"]) <= resume_step]
        self.t0 = time.perf_counter()
        self.flushed = time.perf_counter()
        self.wall0 = float(self.rows[-1]["wall_s"]) if self.rows else 0.0  # wall_s runs on across restarts
        self.shown = 0  # the last step printed

    def add(self, row: dict, total_steps: int) -> None:
        self.rows.append(dict(row, wall_s=round(self.wall0 + time.perf_counter() - self.t0, 2)))
        if self.writer:
            self.writer.scalars(row["step"], {k: v for k, v in self.rows[-1].items() if k != "step"}, prefix="train")
        # The terminal gets a line per fifth of the run (and the last step); metrics.csv and TensorBoard get every
        # logged step. A short demo run logs hundreds of rows, which would bury the results.
        share = PROGRESS_SHARE * max(1, total_steps)
        if row["step"] >= total_steps or row["step"] // share > self.shown // share or not self.shown:
            self.shown = row["step"]
            peak = f", peak GPU memory {row['peak_gpu_mem_gib']:.1f} GiB" if "peak_gpu_mem_gib" in row else ""
            print(
                PROGRESS.format(
                    label=self.label,
                    total=total_steps,
                    pct=100 * row["step"] / max(1, total_steps),
                    wait=100 * row["data_wait_frac"],
                    **row,
                )
                + peak,
                flush=True,
            )
        if time.perf_counter() - self.flushed > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        buf = io.StringIO()
        # Every column any row has: rows kept from before a resume may lack one a later row adds (peak_gpu_mem_gib
        # exists only on CUDA), or have one it lacks.
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in self.rows for k in r)), restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        self.storage.write_text(self.uri, buf.getvalue())
        if self.writer:
            self.writer.flush()
        self.flushed = time.perf_counter()

    def close(self) -> None:
        if self.rows:
            self.flush()
            self.storage.write_bytes(join(self.uri.rsplit("/", 1)[0], "training_curve.png"), self._plot())
        if self.writer:
            self.writer.close()

    def _plot(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def series(key: str) -> list[float]:
            return [float(r[key]) for r in self.rows]

        steps = series("step")
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.4))
        for key in ("loss", "diff_loss", "clip_loss"):
            if any(series(key)):
                axes[0].plot(steps, series(key), label=key)
        axes[0].set(title="loss (global, and rank 0's parts)", xlabel="step")
        axes[0].legend()
        axes[1].plot(steps, series("lr"))
        axes[1].set(title="learning rate", xlabel="step")
        axes[2].plot(steps, series("samples_per_s"))
        axes[2].set(title="throughput (samples/s)", xlabel="step")
        axes[3].plot(steps, [100 * v for v in series("data_wait_frac")], label="data wait %")
        axes[3].plot(steps, series("skipped_steps"), label="skipped steps (NaN)")
        axes[3].plot(steps, series("masked_pairs"), label="masked pairs")
        axes[3].set(title="data wait and dropped work", xlabel="step")
        axes[3].legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return buf.getvalue()
