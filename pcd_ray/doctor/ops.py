"""DeepSpeed's compiled ops that the config's train sections will make DeepSpeed build.

An op DeepSpeed needs and finds neither prebuilt (``deepspeed.git_version_info.installed_ops``) nor buildable is a
crash inside ``deepspeed.initialize`` on every worker, after the cluster has spun up and the data pipeline started.
Which ops a run needs follows from DeepSpeed's own config (``engine.deepspeed_config``) and DeepSpeed 0.19's
choices in ``runtime/engine.py`` and ``comm/torch.py``:

- pcd-ray hands DeepSpeed torch's fused Adam as a client optimizer, so by default a GPU worker needs no op;
- an ``optimizer`` section in ``deepspeed.overrides`` makes DeepSpeed build its own: FusedAdam (``fused_adam``),
  or with ZeRO-Offload its CPU Adam (``cpu_adam``); Lamb and Lion likewise;
- NVMe offload needs ``async_io``;
- every CPU worker loads the shared-memory collectives (``deepspeed_shm_comm``) when its builder is compatible,
  JIT-compiled with the host C++ compiler on the first ``deepspeed.initialize``.

A JIT build needs the C++ compiler torch's extension loader uses ($CXX, else c++), ninja, and for a CUDA op the
toolkit's nvcc (found as torch finds it, CUDA_HOME) of torch's CUDA major.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from pcd_ray.config import JobConfig, TrainConfig
from pcd_ray.doctor.packages import BASE_INSTALL
from pcd_ray.doctor.rows import FAIL, OK, Row, one_line, quiet

CHECK = "deepspeed ops"

# DeepSpeed optimizer type -> (op, builder) it builds without and with an offloaded optimizer (None: a torch one).
OPTIMIZER_OPS: dict[str, tuple[tuple[str, str] | None, tuple[str, str] | None]] = {
    "adam": (("fused_adam", "FusedAdamBuilder"), ("cpu_adam", "CPUAdamBuilder")),
    "adamw": (("fused_adam", "FusedAdamBuilder"), ("cpu_adam", "CPUAdamBuilder")),
    "lamb": (("fused_lamb", "FusedLambBuilder"), ("fused_lamb", "FusedLambBuilder")),
    "lion": (("fused_lion", "FusedLionBuilder"), ("cpu_lion", "CPULionBuilder")),
    "adagrad": (None, ("cpu_adagrad", "CPUAdagradBuilder")),
}


@dataclass(frozen=True)
class OpNeed:
    op: str
    """DeepSpeed's op name (the key of installed_ops)."""
    builder: str
    """Builder class name, as the workers' accelerator resolves it."""
    device: str
    """The workers' DeepSpeed accelerator: "cuda" (GPU workers) or "cpu"."""
    reason: str
    """Why the section needs it (the rows name the sections)."""
    avoid: str | None = None
    """The config change that makes the op unnecessary, if there is one."""
    optional: bool = False
    """DeepSpeed does without the op when its builder is not compatible with the machine."""


@dataclass(frozen=True)
class OpFacts:
    implemented: bool
    """The accelerator has a real builder for the op (not DeepSpeed's not-implemented stand-in)."""
    prebuilt: bool = False
    compatible: bool = False
    cuda: bool = False
    """Built with nvcc (a CUDAOpBuilder)."""
    build_var: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Toolchain:
    deepspeed: str
    cxx: str | None = None
    ninja: bool = False
    nvcc: str | None = None
    """CUDA release of CUDA_HOME's nvcc ("13.0"); None when there is none."""
    nvcc_error: str | None = None
    torch_cuda: str | None = None


def train_sections(job: JobConfig) -> list[tuple[str, TrainConfig]]:
    sections = [("base_train", job.base_train)] if job.base_train is not None else []
    return sections + [("train", job.train)]


def needed_ops(section: str, ds: dict, use_gpu: bool) -> tuple[list[OpNeed], str | None]:
    """(the ops a train section's DeepSpeed config needs, DeepSpeed's refusal of the config or None)."""
    device = "cuda" if use_gpu else "cpu"
    zero = ds.get("zero_optimization") or {}
    offload = {k: (zero.get(k) or {}).get("device") for k in ("offload_optimizer", "offload_param")}
    offloaded = offload["offload_optimizer"] in ("cpu", "nvme")
    needs, refusal = [], None
    optimizer = ds.get("optimizer")
    if optimizer is not None:
        kind = str(optimizer.get("type", "")).lower()
        torch_adam = kind in ("adam", "adamw") and (optimizer.get("params") or {}).get("torch_adam")
        entry = None if torch_adam else OPTIMIZER_OPS.get(kind, (None, None))[1 if offloaded else 0]
        if entry is not None:
            needs.append(
                OpNeed(
                    entry[0],
                    entry[1],
                    device,
                    f"deepspeed.overrides.optimizer type {optimizer.get('type')}{', offloaded' if offloaded else ''}",
                    avoid=f"drop `optimizer` from {section}.deepspeed.overrides (pcd-ray then hands "
                    f"DeepSpeed torch's fused Adam)",
                )
            )
    elif offloaded and ds.get("zero_force_ds_cpu_optimizer", True):
        refusal = (
            f"{section}: DeepSpeed refuses a client optimizer under ZeRO-Offload while "
            f"zero_force_ds_cpu_optimizer is true"
        )
    for key, where in offload.items():
        if where == "nvme":
            needs.append(
                OpNeed(
                    "async_io",
                    "AsyncIOBuilder",
                    device,
                    f"{key} to nvme",
                    avoid=f"offload to cpu: {section}.deepspeed.overrides.zero_optimization.{key}",
                )
            )
    if not use_gpu:
        needs.append(
            OpNeed(
                "deepspeed_shm_comm",
                "ShareMemCommBuilder",
                "cpu",
                "CPU workers: DeepSpeed's shared-memory collectives",
                optional=True,
            )
        )
    return needs, refusal


def nvcc_problem(tools: Toolchain) -> str | None:
    if tools.nvcc is None:
        return f"no nvcc ({tools.nvcc_error or 'CUDA_HOME not found'})"
    if tools.torch_cuda is None:
        return "torch is a CPU build"
    if tools.nvcc.split(".")[0] != tools.torch_cuda.split(".")[0]:
        return f"nvcc is CUDA {tools.nvcc}, torch is built for CUDA {tools.torch_cuda}"
    return None


def op_row(need: OpNeed, sections: list[str], facts: OpFacts, tools: Toolchain, avoid: str | None = None) -> Row:
    """One op, needed by these train sections: ok when prebuilt or JIT-buildable here. ``avoid`` defaults to the
    need's own (several sections join theirs)."""
    avoid = avoid or need.avoid
    head = f"{need.op} for {', '.join(sections)} ({need.reason})"
    prebuild = (
        (f"prebuild it: {facts.build_var}=1 pip install --no-cache-dir --force-reinstall deepspeed=={tools.deepspeed}")
        if facts.build_var
        else None
    )
    fix = "; or ".join(f for f in (avoid, prebuild) if f)
    if not facts.implemented:
        return Row(
            CHECK,
            FAIL,
            f"{head}: DeepSpeed has no {need.device} implementation of it",
            avoid or "use a DeepSpeed optimizer with a CPU implementation",
        )
    if facts.prebuilt:
        return Row(CHECK, OK, f"{head}: prebuilt")
    if not facts.compatible:
        if need.optional:
            return Row(CHECK, OK, f"{head}: not buildable here, so DeepSpeed uses torch.distributed instead")
        said = f": {facts.error}" if facts.error else ""
        return Row(CHECK, FAIL, f"{head}: not prebuilt, and DeepSpeed's {need.builder} cannot build it here{said}", fix)
    missing = []
    if tools.cxx is None:
        missing.append(f"no C++ compiler ({os.environ.get('CXX', 'c++')})")
    if not tools.ninja:
        missing.append("no ninja on PATH")
    nvcc = nvcc_problem(tools) if facts.cuda else None
    if nvcc:
        missing.append(nvcc)
    if missing:
        return Row(
            CHECK,
            FAIL,
            f"{head}: not prebuilt and not JIT-buildable: {'; '.join(missing)}",
            fix or "install a C++ compiler and ninja (apt-get install g++ ninja-build)",
        )
    with_nvcc = f" and nvcc {tools.nvcc}" if facts.cuda else ""
    return Row(CHECK, OK, f"{head}: JIT-built on first use with {tools.cxx}{with_nvcc}")


def _probe(needs: list[OpNeed]) -> tuple[dict[tuple[str, str], OpFacts], Toolchain]:
    """Ask the installed DeepSpeed about each op, through the accelerator the workers will use."""
    with quiet():
        import deepspeed
        import torch
        import torch.utils.cpp_extension as cpp
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator
        from deepspeed.git_version_info import accelerator_name, installed_ops
        from deepspeed.ops.op_builder.builder import CUDAOpBuilder, installed_cuda_version

        accelerators = {"cpu": CPU_Accelerator(), "cuda": CUDA_Accelerator()}
        facts = {}
        for need in needs:
            builder = accelerators[need.device].create_op_builder(need.builder)
            if builder is None or builder.name != need.op:
                facts[need.op, need.device] = OpFacts(implemented=False)
                continue
            try:
                compatible, error = bool(builder.is_compatible(verbose=False)), None
            except Exception as e:  # a probe that fails means DeepSpeed cannot build the op either
                compatible, error = False, one_line(e)
            facts[need.op, need.device] = OpFacts(
                implemented=True,
                compatible=compatible,
                error=error,
                cuda=isinstance(builder, CUDAOpBuilder),
                build_var=getattr(builder, "BUILD_VAR", None),
                # A prebuilt op loads only under the accelerator it was built for.
                prebuilt=bool(installed_ops.get(need.op)) and accelerator_name == need.device,
            )
        nvcc = nvcc_error = None
        if any(f.cuda and not f.prebuilt for f in facts.values()):
            try:
                nvcc = "{}.{}".format(*installed_cuda_version())
            except Exception as e:  # MissingCUDAException and friends: no toolkit to compile with
                nvcc_error = one_line(e)
        tools = Toolchain(
            deepspeed=deepspeed.__version__,
            cxx=shutil.which(os.environ.get("CXX", "c++")),
            ninja=cpp.is_ninja_available(),
            nvcc=nvcc,
            nvcc_error=nvcc_error,
            torch_cuda=torch.version.cuda,
        )
    return facts, tools


def rows_for(
    needs_by_section: list[tuple[str, bool, list[OpNeed], str | None]],
    facts: dict[tuple[str, str], OpFacts],
    tools: Toolchain | None,
) -> list[Row]:
    """Rows from (section, use_gpu, its needs, its refusal): one per distinct op, or one saying none is needed."""
    rows = [
        Row(CHECK, FAIL, refusal, f"drop zero_force_ds_cpu_optimizer from {section}.deepspeed.overrides")
        for section, _, _, refusal in needs_by_section
        if refusal
    ]
    by_op: dict[tuple[str, str], list[tuple[str, OpNeed]]] = {}
    for section, _, needs, _ in needs_by_section:
        for need in needs:
            by_op.setdefault((need.op, need.device), []).append((section, need))
    for key, users in by_op.items():
        avoids = list(dict.fromkeys(n.avoid for _, n in users if n.avoid))
        rows.append(op_row(users[0][1], [s for s, _ in users], facts[key], tools, " and ".join(avoids) or None))
    if not rows:
        workers = ", ".join(f"{s} ({'GPU' if gpu else 'CPU'} workers)" for s, gpu, _, _ in needs_by_section)
        rows.append(Row(CHECK, OK, f"none needed: {workers} run torch's fused Adam as DeepSpeed's client optimizer"))
    return rows


def check(job: JobConfig) -> list[Row]:
    from pcd_ray.train.engine import deepspeed_config

    needs_by_section = []
    for name, cfg in train_sections(job):
        ds = deepspeed_config(cfg, micro_batch=1, use_gpu=cfg.scaling.use_gpu)
        needs_by_section.append((name, cfg.scaling.use_gpu, *needed_ops(name, ds, cfg.scaling.use_gpu)))
    needs = [n for _, _, ns, _ in needs_by_section for n in ns]
    facts, tools = {}, None
    if needs:
        try:
            facts, tools = _probe(needs)
        except Exception as e:  # DeepSpeed that does not import fails every train run
            return [Row(CHECK, FAIL, f"deepspeed does not import: {one_line(e)}", BASE_INSTALL)]
    return rows_for(needs_by_section, facts, tools)
