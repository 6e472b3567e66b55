"""One environment everywhere: pyproject.toml's pins, the GPU lock file, the image and every config that names it.

cluster/requirements-gpu.txt (scripts/lock-gpu) must satisfy every requirement of pyproject.toml (dependencies and
the gpu and dev extras) for the image's interpreter, with a hash on every line; the Dockerfile installs exactly that
file; the launcher configs and KubeRay manifests run the image it builds; the runtime_env installs nothing; and no
job file or doc tells users to install an unpinned vLLM. These checks read files only (no network), so they run in
CI on every change: editing a pin without re-locking fails here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "cluster" / "requirements-gpu.txt"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# The interpreter and platform the lock is compiled for (scripts/lock-gpu) and the image runs (cluster/Dockerfile).
LOCK_PYTHON = "3.12"
IMAGE = f"YOUR-REGISTRY/pcd-ray:{PYPROJECT['project']['version']}-gpu"


def locked() -> dict[str, tuple[Version, list[str]]]:
    """{canonical name: (version, hashes)} of every package in the lock file."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    current = None
    for line in LOCK.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ \\]+)", line):
            current = canonicalize_name(m[1])
            assert current not in pins, f"{m[1]} is locked twice"
            pins[current] = (Version(m[2]), [])
        elif m := re.match(r"^\s+--hash=sha256:([0-9a-f]{64})", line):
            pins[current][1].append(m[1])
    return pins


def lock_environment(extra: str = "") -> dict[str, str]:
    env = default_environment()
    env.update(
        python_version=LOCK_PYTHON,
        python_full_version=f"{LOCK_PYTHON}.0",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        extra=extra,
    )
    return env


def requirements() -> list[tuple[str, Requirement]]:
    """(extra or "", requirement) for pyproject's dependencies and every extra the lock includes."""
    reqs = [("", Requirement(r)) for r in PYPROJECT["project"]["dependencies"]]
    for extra in ("gpu", "dev"):
        reqs += [(extra, Requirement(r)) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    return reqs


def test_lock_satisfies_every_pin_of_pyproject():
    pins = locked()
    wrong = []
    for extra, req in requirements():
        if req.marker and not req.marker.evaluate(lock_environment(extra)):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            wrong.append(f"{req} ({extra or 'dependencies'}): not in the lock")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            wrong.append(f"{req} ({extra or 'dependencies'}): the lock has {pins[name][0]}")
    assert not wrong, "cluster/requirements-gpu.txt disagrees with pyproject.toml; run scripts/lock-gpu:\n" + "\n".join(
        wrong
    )


def test_lock_pins_every_package_with_hashes_for_the_image_python():
    pins = locked()
    assert len(pins) > 100, "the lock should hold the whole closure, not just the direct requirements"
    unhashed = [name for name, (_, hashes) in pins.items() if not hashes]
    assert not unhashed, unhashed
    header = LOCK.read_text().splitlines()[:3]
    assert any("scripts/lock-gpu" in line for line in header), header
    lock_script = (REPO / "scripts" / "lock-gpu").read_text()
    assert f"--python-version {LOCK_PYTHON}" in lock_script and "x86_64-manylinux" in lock_script
    # vLLM pins torch and torchvision exactly: the lock's are the ones it asks for, and pyproject's.
    assert str(pins["vllm"][0]) == next(str(r.specifier)[2:] for _, r in requirements() if r.name == "vllm")
    deps = {canonicalize_name(r.name): r for e, r in requirements() if not e}
    for name in ("torch", "torchvision"):
        assert deps[name].specifier.contains(pins[name][0]), name


def test_python_versions_the_package_supports():
    spec = PYPROJECT["project"]["requires-python"]
    from packaging.specifiers import SpecifierSet

    assert all(v in SpecifierSet(spec) for v in ("3.11", "3.12")), spec


def test_dockerfile_installs_exactly_the_lock_on_a_cuda_13_python_312_base():
    text = (REPO / "cluster" / "Dockerfile").read_text()
    base = re.search(r"^ARG CUDA_BASE=(\S+)", text, re.M)[1]
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-\w+-ubuntu24\.04", base), base
    # torch's PyPI wheels are CUDA 13 builds: they depend on cuda-toolkit 13.x, which the lock holds.
    assert locked()["cuda-toolkit"][0].major == 13
    assert f"python{LOCK_PYTHON} -m venv" in text
    assert "--require-hashes -r cluster/requirements-gpu.txt" in text
    # pcd-ray itself goes in without resolving anything beyond the lock.
    assert re.search(r"pip install [^\n]*--no-deps -e \.", text)


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + [
            i for v in node.values() for i in _images(v)
        ]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def test_every_cluster_config_runs_the_pcd_ray_image():
    found = {}
    for path in [
        REPO / "cluster" / "aws.yaml",
        REPO / "cluster" / "gcp.yaml",
        *sorted((REPO / "cluster" / "kuberay").glob("*.yaml")),
    ]:
        for doc in yaml.safe_load_all(path.read_text()):
            found[path.name] = found.get(path.name, []) + _images(doc)
    for name in ("aws.yaml", "gcp.yaml", "raycluster.yaml", "rayservice.yaml"):
        assert found[name], f"{name} names no image"
    images = {i for imgs in found.values() for i in imgs}
    assert images == {IMAGE}, images
    for name in ("aws.yaml", "gcp.yaml"):
        raw = yaml.safe_load((REPO / "cluster" / name).read_text())
        assert not raw["setup_commands"], f"{name}: nodes install nothing; the image holds it all"
        assert "head_image" not in raw["docker"] and "worker_image" not in raw["docker"]


def test_runtime_env_installs_nothing_and_ray_accepts_it():
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    RuntimeEnv(**raw)
    assert not {"pip", "uv", "conda", "py_executable", "image_uri"} & set(raw), raw
    assert {".venv", ".venv-ci", ".venv-vllm", "runs"} <= set(raw["excludes"])


def _user_facing_files() -> list[Path]:
    return [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "jobs").glob("*.yaml")),
        *sorted((REPO / "cluster").rglob("*.yaml")),
        REPO / "cluster" / "Dockerfile",
    ]


@pytest.mark.parametrize("path", _user_facing_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_doc_or_config_installs_an_unpinned_vllm(path):
    """vLLM pins its torch exactly, so an unpinned (or differently pinned) vllm replaces the environment's torch;
    every instruction goes through the gpu extra, the lock, or the image."""
    pinned = next(str(r) for _, r in requirements() if r.name == "vllm")
    installs = re.compile(r"""pip3? install|["']pip["']|\bpip:|append\(""")
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not installs.search(line):
            continue
        for m in re.finditer(r"""["'\s\[]vllm(?P<rest>[=<>!~][^\s"',\]]*)?(?=["'\s,\]\)]|$)""", line):
            assert m["rest"] == pinned[4:], f"{path.name}:{n}: {line.strip()}"
