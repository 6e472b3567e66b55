"""scripts/gpu-smoke without a GPU: --dry-run end to end, the offline bundle's logic (lock, freeze, wheel tags, a
build against a stand-in pip), the step runner and the figure readers. No network, no GPU.

The orchestrator must run on a stock Python before pcd-ray's dependencies are installed, so --dry-run is started
with ``python -S`` (no site-packages: only the standard library imports); the commands it checks run with the
same interpreter without -S.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu-smoke"
sys.path.insert(0, str(REPO / "scripts"))

from gpu_smoke import bundle, checks, steps  # noqa: E402


def _load_orchestrator():
    loader = importlib.machinery.SourceFileLoader("gpu_smoke_main", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_smoke_main", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------------- --dry-run
def test_dry_run_checks_and_lists_all_seven_steps(tmp_path):
    work = tmp_path / "work"
    out = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), "--dry-run", "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    for name in steps.STEP_NAMES:
        assert f"\n{name} (timeout " in text, name
    assert "0 problems" in text and "7 steps" in text
    assert f"{sys.executable} -m pcd_ray train --config {REPO / steps.JOB} storage.root={work}" in text
    assert "train.model.name=ViT-L-14 train.deepspeed.zero_stage=3" in text
    assert "-m pytest -m gpu -q -p no:cacheprovider" in text and "benchmarks/loss_bench.py --gpu" in text
    assert "serve_embed.py --model ViT-B-32 --gpus-per-replica 0.5 --concurrency 1 32 --json" in text
    assert "[FAILED]" not in text and "[?]" not in text
    assert (work / "tiny-llm" / "config.json").exists()  # the vllm step's setup ran
    assert not (work / "smoke.json").exists()  # nothing ran


def test_unknown_step_is_refused():
    out = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), "--only", "environment,warp-drive"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "warp-drive" in out.stderr


def test_dry_checks_catch_bad_commands(tmp_path):
    """What --dry-run hands checks.py: a valid train, a misspelled override, a CLI command this checkout may lack,
    a script argument its parser refuses, and one it accepts."""
    job = str(REPO / steps.JOB)
    spec = [
        {"kind": "pcd-ray", "argv": ["train", "--config", job, f"storage.root={tmp_path}", *steps.L14_OVERRIDES]},
        {"kind": "pcd-ray", "argv": ["train", "--config", job, "train.deepspeed.zero_stag=3"]},
        {"kind": "pcd-ray", "argv": ["no-such-stage", "--config", job]},
        {"kind": "script", "argv": [str(REPO / "benchmarks" / "loss_bench.py"), "--gpu", "--batch", "many"]},
        {"kind": "script", "argv": [str(REPO / "benchmarks" / "serve_embed.py"), "--concurrency", "1", "32"]},
        {"kind": "check", "argv": ["accounted", "--root", "x"]},
    ]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert checks.main(["dry", str(path), "--json", str(tmp_path / "out.json")]) == 0
    got = json.loads((tmp_path / "out.json").read_text())["commands"]
    assert got[0]["ok"] and got[0]["train"]["model"] == "ViT-L-14" and got[0]["train"]["zero_stage"] == 3
    assert not got[1]["ok"] and "zero_stag" in got[1]["error"]
    assert not got[2]["ok"] and got[2]["missing"]
    assert not got[3]["ok"] and "rejects" in got[3]["error"]
    assert got[4]["ok"]
    assert not got[5]["ok"]  # --pairs, --diffs, --rejects are required


# ---------------------------------------------------------------------------------------------------- the job
def test_smoke_job_is_a_one_gpu_zero2_bf16_finetune_and_deepspeed_accepts_both_runs(monkeypatch):
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig

    from pcd_ray.config import load_job
    from pcd_ray.train.engine import deepspeed_config

    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: 0)  # as tests/train/test_job_files.py does

    class _OneRank:
        def get_data_parallel_world_size(self) -> int:
            return 1

    job = load_job(steps.JOB)
    t = job.train
    assert (job.data.source, job.generate.engine, t.model.name, t.model.pretrained) == (
        "synthetic",
        "rule",
        "ViT-B-32",
        None,
    )
    assert (t.scaling.use_gpu, t.scaling.num_workers, t.max_steps) == (True, 1, steps.B32_STEPS)
    assert (t.deepspeed.zero_stage, t.deepspeed.precision) == (2, "bf16")
    assert t.max_steps * t.batch_size <= job.pairs.num_pairs
    large = load_job(steps.JOB, steps.L14_OVERRIDES).train
    assert (
        large.model.name,
        large.deepspeed.zero_stage,
        large.deepspeed.activation_checkpointing,
        large.max_steps,
    ) == ("ViT-L-14", 3, True, steps.L14_STEPS)
    for cfg in (t, large):
        ds = DeepSpeedConfig(
            dict(deepspeed_config(cfg, micro_batch=cfg.batch_size, use_gpu=True), train_batch_size=cfg.batch_size),
            mpu=_OneRank(),
        )
        assert ds.zero_optimization_stage == cfg.deepspeed.zero_stage and ds.bfloat16_config.enabled
    gen = load_job(steps.JOB, steps.vllm_overrides(Path("/models/tiny"))).generate
    assert (gen.engine, gen.num_gpus_per_actor, gen.llm.engine_kwargs) == ("vllm", 1, {"enforce_eager": True})
    assert gen.output != job.generate.output and gen.rejects != job.generate.rejects


# ------------------------------------------------------------------------------------------------------ bundle
LOCK_TEXT = textwrap.dedent("""\
    # This file was autogenerated by uv via the following command:
    #    scripts/lock-gpu
    moto[server]==5.2.5 \\
        --hash=sha256:aaa \\
        --hash=sha256:bbb
        # via pcd-ray
    PyYAML==6.0.4 \\
        --hash=sha256:ccc
    sdistonly==1.0 \\
        --hash=sha256:ddd
    torch==2.14.0 \\
        --hash=sha256:eee
    """)


def test_lock_parses_into_pins_with_their_hashes():
    pins = bundle.parse_lock(LOCK_TEXT)
    assert [(p.key, p.version, p.hashes) for p in pins] == [
        ("moto", "5.2.5", ("sha256:aaa", "sha256:bbb")),
        ("pyyaml", "6.0.4", ("sha256:ccc",)),
        ("sdistonly", "1.0", ("sha256:ddd",)),
        ("torch", "2.14.0", ("sha256:eee",)),
    ]
    assert pins[1].line() == "PyYAML==6.0.4 --hash=sha256:ccc" and pins[1].line(with_hashes=False) == "PyYAML==6.0.4"
    with pytest.raises(ValueError, match="not an exact pin"):
        bundle.parse_lock("torch>=2.14\n")
    with pytest.raises(ValueError, match="twice"):
        bundle.parse_lock("a==1\nA==2\n")


def test_the_repositorys_lock_parses():
    text = (REPO / bundle.LOCK).read_text()
    pins = {p.key: p for p in bundle.parse_lock(text)}
    assert len(pins) == sum(1 for line in text.splitlines() if line[:1].isalnum())
    for name in ("torch", "vllm", "deepspeed", "ray", "open-clip-torch"):
        assert pins[name].hashes, name
    assert pins["torch"].version == "2.14.0"
    # What the smoke's tests need is in the lock (or would be resolved beside it).
    reqs = bundle.smoke_requirements((REPO / "pyproject.toml").read_text())
    assert {bundle.requirement_name(r) for r in reqs} == set(bundle.SMOKE_TEST_PACKAGES)
    assert any(r.startswith("botocore>=") for r in reqs) and any(r.startswith("moto[server]") for r in reqs)


def test_omit_present_leaves_out_only_exact_versions():
    pins = bundle.parse_lock(LOCK_TEXT)
    freeze = textwrap.dedent("""\
        pyyaml==6.0.4
        Torch==2.14.0
        moto==5.2.4
        -e git+https://example.invalid/x.git#egg=x
        sdistonly @ file:///wheels/sdistonly-1.0.tar.gz
        """)
    present = bundle.parse_freeze(freeze)
    assert present == {"pyyaml": "6.0.4", "torch": "2.14.0", "moto": "5.2.4"}
    keep, omitted = bundle.omit_present(pins, present)
    assert [p.key for p in omitted] == ["pyyaml", "torch"]
    assert [p.key for p in keep] == ["moto", "sdistonly"]
    # A local build of the locked release is another wheel: bundled.
    keep, omitted = bundle.omit_present(pins, {"torch": "2.14.0+cu126"})
    assert "torch" in [p.key for p in keep] and not omitted


@pytest.mark.parametrize(
    "filename, fits",
    [
        ("torch-2.14.0-cp312-cp312-manylinux_2_28_x86_64.whl", True),
        ("vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl", True),
        ("llguidance-1.7.6-cp39-abi3-manylinux_2_31_x86_64.whl", True),
        ("interegular-0.3.3-py37-none-any.whl", True),
        ("six-1.17.0-py2.py3-none-any.whl", True),
        ("x-1-1build-cp312-cp312-manylinux2014_x86_64.whl", True),
        ("torch-2.14.0-cp311-cp311-manylinux_2_28_x86_64.whl", False),
        ("x-1-cp313-abi3-manylinux_2_28_x86_64.whl", False),
        ("x-1-cp312-cp312-manylinux_2_34_x86_64.whl", False),
        ("x-1-cp312-cp312-musllinux_1_2_x86_64.whl", False),
        ("x-1-cp312-cp312-manylinux_2_28_aarch64.whl", False),
        ("x-1-py313-none-any.whl", False),
    ],
)
def test_wheel_tags_against_the_target(filename, fits):
    assert bundle.wheel_fits(filename, "3.12", bundle.target_platforms("2.31")) is fits


def test_target_platforms_list_every_older_manylinux():
    tags = bundle.target_platforms("2.31")
    assert tags[0] == "manylinux_2_31_x86_64" and "manylinux_2_28_x86_64" in tags and "manylinux_2_5_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags) and "manylinux_2_32_x86_64" not in tags


FAKE_PIP = textwrap.dedent('''\
    """Stands in for `python -m pip` download/wheel: writes empty files named as PyPI's would be."""
    import re, sys
    from pathlib import Path

    args = sys.argv[1:]
    cmd = args[0]
    def opt(flag):
        return args[args.index(flag) + 1]
    def wheel(d, name, version):
        Path(d, f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    if cmd == "download":
        dest = Path(opt("-d")); dest.mkdir(parents=True, exist_ok=True)
        if "-r" in args:
            for line in Path(opt("-r")).read_text().splitlines():
                name, version = re.match(r"([^=\\[ ]+)(?:\\[[^]]*\\])?==(\\S+)", line).groups()
                if name == "sdistonly":
                    Path(dest, f"{name}-{version}.tar.gz").write_bytes(b"")
                else:
                    wheel(dest, name, version)
        else:  # extras: each resolves to itself 9.9 and pulls in the lock's PyYAML
            for req in args[args.index("-d") + 2:]:
                wheel(dest, re.match(r"[A-Za-z0-9_.-]+", req).group(0), "9.9")
            wheel(dest, "PyYAML", "6.0.4")
    elif cmd == "wheel":
        src, dest = Path(args[-1]), Path(opt("-w"))
        dest.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            wheel(dest, "pcd-ray", "0.1.0")
        else:
            name, version = src.name[:-len(".tar.gz")].rsplit("-", 1)
            wheel(dest, name, version)
    ''')


def test_bundle_build_against_a_stand_in_pip(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pcd_ray").mkdir(parents=True)
    (repo / "pcd_ray" / "__init__.py").write_text("")
    (repo / "README.md").write_text("x")
    (repo / "pyproject.toml").write_text(
        textwrap.dedent("""\
        [project]
        name = "pcd-ray"
        [project.optional-dependencies]
        dev = ["pytest>=8", "pytest-timeout>=2.3", "httpx>=0.27", "moto[server]==5.2.5",
               "botocore>=1.43.115,<1.43.118", "psutil>=5.9", "uv==0.13.9"]
        """)
    )
    lock = tmp_path / "lock.txt"
    lock.write_text(LOCK_TEXT)
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("torch==2.14.0\nnumpy==2.0.0\n")
    fake = tmp_path / "fake_pip.py"
    fake.write_text(FAKE_PIP)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "stale-0.1-py3-none-any.whl").write_bytes(b"")  # from an earlier bundle: removed
    logs: list[str] = []

    meta = bundle.build(out, repo, freeze=freeze, lock=lock, pip=[sys.executable, str(fake)], log=logs.append)

    reqs = [line for line in (out / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    # The lock minus the target's torch, the sdist built into a wheel, the test packages the lock lacks (at what
    # the stand-in resolved; the lock's PyYAML is not taken twice), and pcd-ray; uv is not a smoke package.
    assert reqs == [
        "botocore==9.9",
        "httpx==9.9",
        "moto==5.2.5",
        "pcd-ray==0.1.0",
        "psutil==9.9",
        "pytest==9.9",
        "pytest-timeout==9.9",
        "PyYAML==6.0.4",
        "sdistonly==1.0",
    ]
    files = sorted(f.name for f in out.glob("*.whl"))
    assert "sdistonly-1.0-py3-none-any.whl" in files and not list(out.glob("*.tar.gz"))
    assert not any(f.startswith(("torch", "stale", "uv")) for f in files) and len(files) == len(reqs)
    assert meta["omitted_present"] == ["torch==2.14.0"] and meta["packages"] == len(reqs)
    assert json.loads((out / "bundle.json").read_text())["python_version"] == "3.12"
    assert "--bundle" in (out / "README.md").read_text()
    assert any("removing stale-0.1" in line for line in logs)


def test_install_refuses_another_python(tmp_path):
    (tmp_path / "bundle.json").write_text(json.dumps({"python_version": "2.7", "packages": 0}))
    (tmp_path / "requirements.txt").write_text("")
    with pytest.raises(RuntimeError, match="bundle is for Python 2.7"):
        bundle.install(tmp_path, tmp_path / "venv", log=lambda _: None)
    assert not (tmp_path / "venv").exists()


# -------------------------------------------------------------------------------------------------- the runner
def test_a_step_stops_at_its_first_failing_command_and_a_timeout_kills_the_group(tmp_path):
    smoke = _load_orchestrator()
    py = sys.executable
    marker = tmp_path / "ran"
    step = steps.Step(
        "demo",
        60,
        [
            steps.Command([py, "-c", "print('one')"], "script"),
            steps.Command([py, "-c", "import sys; sys.exit(3)"], "script"),
            steps.Command([py, "-c", f"open({str(marker)!r}, 'w')"], "script"),
        ],
        lambda d: ({"logs": len(list(d.glob("*.log")))}, []),
        tmp_path / "demo",
    )
    result = smoke.run_step(step, 60, tmp_path)
    assert result["status"] == "failed" and "exit 3" in result["problems"][0]
    assert [c["rc"] for c in result["commands"]] == [0, 3] and not marker.exists()
    assert result["figures"] == {"logs": 2}

    t0 = time.perf_counter()
    child = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"
    res = smoke.run_command([py, "-c", child], tmp_path / "sleep.log", 1.0, tmp_path)
    assert res["timed_out"] and res["rc"] != 0 and time.perf_counter() - t0 < 30


def test_a_run_without_a_gpu_fails_its_steps_cleanly_and_reports_them(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this checks the failure path; on a GPU machine run scripts/gpu-smoke itself")
    out = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), "--only", "environment,loss-bench", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    by = {s["name"]: s for s in report["steps"]}
    assert list(by) == list(steps.STEP_NAMES) and report["passed"] is False
    assert by["environment"]["status"] == by["loss-bench"]["status"] == "failed"
    assert by["environment"]["figures"]["torch"] and by["environment"]["figures"]["python"]  # versions ran
    assert "no CUDA device" in (tmp_path / "loss-bench" / "0-loss_bench.log").read_text()
    assert all(by[n]["status"] == "skipped" for n in steps.STEP_NAMES if n not in ("environment", "loss-bench"))
    table = out.stdout[out.stdout.index("\nstep ") :]
    assert all(n in table for n in steps.STEP_NAMES) and "FAILED" in out.stdout

    none = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), "--budget-s", "0", "--workdir", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads((tmp_path / "b" / "smoke.json").read_text())
    assert none.returncode == 1 and {s["status"] for s in report["steps"]} == {"skipped"}
    assert report["steps"][0]["reason"].startswith("budget")


def test_figure_readers(tmp_path):
    assert steps.pytest_counts("....\n1 passed, 397 deselected in 9.12s\n") == {"passed": 1, "deselected": 397}
    assert steps.pytest_counts("1 failed, 2 errors in 3.0s") == {"failed": 1, "error": 2}

    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "step,epoch,loss,samples_per_s,data_wait_frac,peak_gpu_mem_gib\n"
        "5,0,4.1,800.0,0.1,10.5\n10,0,3.9,1234.56,0.02,11.25\n"
    )
    figures, problems = steps.metrics_figures(csv_path, 10, peak=True)
    assert (
        figures
        == {"steps": 10, "final_loss": 3.9, "samples_per_s": 1234.6, "data_wait_pct": 2.0, "peak_gpu_mem_gib": 11.25}
        and not problems
    )
    assert steps.metrics_figures(csv_path, 50, peak=False)[1] == ["trained 10 steps, not 50"]
    assert steps.metrics_figures(tmp_path / "none.csv", 10, peak=False)[1]

    points = [
        {"mode": m, "clients": c, "throughput_rps": r, "errors": 0}
        for m, c, r in (("unbatched", 1, 50.0), ("batched", 1, 45.0), ("unbatched", 32, 100.0), ("batched", 32, 420.0))
    ]
    figures, problems = steps.serve_figures({"points": points})
    assert (figures["clients"], figures["ratio"], figures["target_met"]) == (32, 4.2, True) and not problems
    points[-1]["throughput_rps"] = 250.0
    assert steps.serve_figures({"points": points})[0]["target_met"] is False

    rows = [
        {"variant": v, "batch": b, "time_s": 0.01 * b / 1024, "peak_mib": 1.0 * b}
        for v in ("fused", "open_clip")
        for b in (1024, 8192)
    ] + [{"variant": "reference", "batch": 8192, "error": "out of memory"}]
    figures, problems = steps.loss_figures(rows)
    assert (figures["batch"], figures["fused_ms"], figures["failed_points"]) == (8192, 80.0, 1) and not problems
