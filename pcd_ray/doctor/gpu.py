"""The GPU stack: torch's CUDA build against the NVIDIA driver, and NCCL.

A driver older than the CUDA major that torch was built for is the classic failure that looks like "no GPU":
torch.cuda.is_available() is simply False and the job falls back to CPU or waits for GPUs forever. So a GPU counts
as present when nvidia-smi (or NVML) answers, even when torch cannot use it, and the driver is compared with
NVIDIA's minimum for the CUDA major (Linux, CUDA minor version compatibility).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass

from pcd_ray.doctor.packages import GPU_INSTALL
from pcd_ray.doctor.rows import FAIL, OK, SKIP, WARN, Row, one_line, quiet, relevant

MIN_DRIVER = {12: "525.60.13", 13: "580.65.06"}
"""Oldest Linux driver that runs every release of a CUDA major (minor version compatibility, per NVIDIA's CUDA
Toolkit release notes)."""
NO_GPU = "no GPU here: torch.cuda.is_available() is False and there is no nvidia-smi on PATH"


@dataclass(frozen=True)
class GpuFacts:
    torch_version: str | None = None
    torch_cuda: str | None = None
    """torch.version.cuda: the CUDA torch was built for; None for a CPU build."""
    cuda_available: bool = False
    device_count: int = 0
    nvidia_smi: str | None = None
    """Path of nvidia-smi, when on PATH."""
    driver: str | None = None
    driver_error: str | None = None
    nccl: str | None = None
    nccl_error: str | None = None
    cuda_warning: str | None = None
    """What torch warned while initialising CUDA (e.g. "The NVIDIA driver on your system is too old")."""

    @property
    def present(self) -> bool:
        return self.cuda_available or self.nvidia_smi is not None or self.driver is not None


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def gpu_row(facts: GpuFacts, needed: bool, why: str) -> Row:
    if not facts.present:
        return Row("gpu", SKIP, NO_GPU)
    if facts.torch_cuda is None:
        row = Row(
            "gpu",
            FAIL,
            f"torch {facts.torch_version} is a CPU build, but this machine has a GPU"
            f"{f' (driver {facts.driver})' if facts.driver else ''}",
            GPU_INSTALL,
        )
        return relevant(row, needed, why)
    if facts.driver is None:
        row = Row(
            "gpu",
            FAIL,
            f"a GPU is present but its driver version is unreadable: {facts.driver_error}",
            "run `nvidia-smi` on this node and fix what it reports",
        )
        return relevant(row, needed, why)
    major = int(facts.torch_cuda.split(".")[0])
    minimum = MIN_DRIVER.get(major)
    built = f"torch {facts.torch_version} is built for CUDA {facts.torch_cuda}"
    if minimum is None:
        return Row("gpu", WARN, f"driver {facts.driver}; no known minimum driver for CUDA {major} ({built})")
    if version_tuple(facts.driver) < version_tuple(minimum):
        row = Row(
            "gpu",
            FAIL,
            f"driver {facts.driver} is older than {minimum}, the minimum for CUDA {major} ({built})",
            f"upgrade the NVIDIA driver on this node to >= {minimum} (docs/CLUSTER.md)",
        )
        return relevant(row, needed, why)
    if not facts.cuda_available:
        said = f": {facts.cuda_warning}" if facts.cuda_warning else ""
        row = Row(
            "gpu",
            FAIL,
            f"driver {facts.driver} is new enough for CUDA {major}, but torch sees no GPU{said}",
            "check CUDA_VISIBLE_DEVICES and that this process can open /dev/nvidia*",
        )
        return relevant(row, needed, why)
    return Row("gpu", OK, f"{facts.device_count} GPU(s), driver {facts.driver} >= {minimum} for CUDA {major} ({built})")


def nccl_row(facts: GpuFacts, needed: bool, why: str) -> Row:
    if not facts.cuda_available:
        return Row("nccl", SKIP, "no GPU here" if not facts.present else "torch cannot use the GPU (see gpu)")
    if facts.nccl is None:
        row = Row("nccl", FAIL, f"torch {facts.torch_version} has no usable NCCL: {facts.nccl_error}", GPU_INSTALL)
        return relevant(row, needed, why)
    return Row("nccl", OK, f"NCCL {facts.nccl} (torch's)")


def read_driver(nvidia_smi: str | None) -> tuple[str | None, str | None]:
    """(driver version, error) from nvidia-smi, else NVML when pynvml is installed; (None, None) with neither."""
    if nvidia_smi:
        try:
            out = subprocess.run(
                [nvidia_smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError) as e:
            return None, one_line(e)
        versions = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if out.returncode or not versions:
            return None, one_line(f"nvidia-smi exited {out.returncode}: {out.stderr or out.stdout}")
        return versions[0], None
    try:
        import pynvml
    except ImportError:
        return None, None
    try:
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # NVMLError_* (no driver loaded, no device): the finding itself
        return None, one_line(e)
    return (version.decode() if isinstance(version, bytes) else version), None


def gather() -> GpuFacts:
    try:
        with quiet():
            import torch
    except Exception as e:  # a torch that does not import is reported by the packages row
        return GpuFacts(nvidia_smi=shutil.which("nvidia-smi"), driver_error=one_line(e))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    smi = shutil.which("nvidia-smi")
    driver, driver_error = read_driver(smi)
    nccl = nccl_error = None
    if available:
        try:
            nccl = ".".join(str(p) for p in torch.cuda.nccl.version())
        except Exception as e:  # a torch built without NCCL raises here
            nccl_error = one_line(e)
    return GpuFacts(
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=available,
        device_count=torch.cuda.device_count() if available else 0,
        nvidia_smi=smi,
        driver=driver,
        driver_error=driver_error,
        nccl=nccl,
        nccl_error=nccl_error,
        cuda_warning=one_line(str(caught[-1].message)) if caught else None,
    )
