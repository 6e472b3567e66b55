"""Training metrics on rank 0: a progress line per report, then metrics.csv and a training-curve PNG in the run dir."""

from __future__ import annotations

import csv
import io
import time

from pcd_ray.storage import Storage, join


class MetricsLog:
    def __init__(self, storage: Storage, output: str):
        self.storage, self.output = storage, output
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()

    def add(self, row: dict, total_steps: int) -> None:
        self.rows.append(dict(row, wall_s=round(time.perf_counter() - self.t0, 2)))
        pct = 100 * row["step"] / max(1, total_steps)
        print(f"[train] step {row['step']}/{total_steps} ({pct:.0f}%) loss {row['loss']:.4f} "
              f"(diff {row['diff_loss']:.4f}, clip {row['clip_loss']:.4f}) lr {row['lr']:.2e} "
              f"{row['samples_per_s']:.0f} samples/s, data wait {100 * row['data_wait_frac']:.0f}%", flush=True)

    def close(self) -> None:
        if not self.rows:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        self.storage.write_text(join(self.output, "metrics.csv"), buf.getvalue())
        self.storage.write_bytes(join(self.output, "training_curve.png"), self._plot())

    def _plot(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.rows]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        for key in ("loss", "diff_loss", "clip_loss"):
            if any(r[key] for r in self.rows):
                axes[0].plot(steps, [r[key] for r in self.rows], label=key)
        axes[0].set(title="loss", xlabel="step")
        axes[0].legend()
        axes[1].plot(steps, [r["lr"] for r in self.rows])
        axes[1].set(title="learning rate", xlabel="step")
        axes[2].plot(steps, [r["samples_per_s"] for r in self.rows], label="samples/s")
        axes[2].set(title="throughput (samples/s)", xlabel="step")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return buf.getvalue()
