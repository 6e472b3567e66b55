"""The offline bundle: every wheel the GPU smoke needs, for a machine that has Python and a GPU but no index.

Built on a machine with PyPI access (any Python >= 3.11 with pip; nothing is installed here):

    scripts/gpu-smoke bundle --out /tmp/pcd-bundle                       # the whole lock (several GB)
    scripts/gpu-smoke bundle --out /tmp/pcd-bundle --omit-present target-freeze.txt   # minus what the target has

``cluster/requirements-gpu.txt`` (the lock: pcd-ray's dependencies + vLLM + the dev extra, for CPython 3.12 on
x86-64 manylinux_2_31, with hashes) decides every version. Its files are downloaded for the target's tags (CPython
``--python-version``, x86-64 Linux with glibc ``--glibc``) and checked against the lock's hashes. The default glibc
is the lock's 2.31: llguidance (a vLLM dependency) publishes x86-64 wheels for manylinux_2_31 and newer only (its
sdist needs Rust to build). GPU hosts for this stack run newer ones (Ubuntu 22.04: 2.35, RHEL 9: 2.34). A package
with no wheel for the target (DeepSpeed publishes only an sdist) comes as its hashed sdist and is built here; that
must give a pure-Python wheel, since a compiled one would be built for this machine, not the target. The smoke's
test packages are taken from the lock when it has them and otherwise resolved for the target under the lock's pins.
pcd-ray's own wheel is built from the working tree. ``--omit-present`` takes ``pip list --format=freeze`` from the
target and leaves out every wheel whose exact version is already installed there.

The bundle directory holds the wheels, ``requirements.txt`` (an exact pin per wheel in it), ``bundle.json`` (target,
lock digest, what was omitted) and a README. On the target, ``scripts/gpu-smoke --bundle DIR`` installs it into a
``--system-site-packages`` venv (so omitted packages come from the system) without touching any index.

Stdlib only: it runs before any of pcd-ray's dependencies exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

LOCK = Path("cluster") / "requirements-gpu.txt"
# The packages tests/ needs beyond pcd-ray's own dependencies, named as pyproject's dev extra names them (so its pins,
# botocore's in particular, apply). Only these: the rest of the dev extra (schemathesis, uv) is not used by the smoke.
SMOKE_TEST_PACKAGES = ("pytest", "pytest-timeout", "httpx", "moto", "botocore", "psutil")
SDIST_SUFFIXES = (".tar.gz", ".zip", ".tar.bz2")


@dataclass(frozen=True)
class Pin:
    name: str  # as the lock spells it
    version: str
    hashes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return normalize(self.name)

    def line(self, with_hashes: bool = True) -> str:
        return f"{self.name}=={self.version}" + "".join(f" --hash={h}" for h in self.hashes if with_hashes)


def normalize(name: str) -> str:
    """PEP 503: the form under which pip compares project names (PyYAML, pyyaml and py_yaml are one project)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> list[Pin]:
    """The pins of a pip-compile/uv lock: ``name==version`` requirement lines, each followed by its ``--hash`` lines
    (continued with backslashes). Comments and blank lines are skipped; anything else is refused rather than
    guessed at, since the lock is the bundle's source of truth."""
    pins: list[Pin] = []
    logical = re.sub(r"\\\s*\n", " ", text)
    for lineno, line in enumerate(logical.splitlines(), 1):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;]+)((?:\s+--hash=\S+)*)", line)
        if not m:
            raise ValueError(f"lock line {lineno}: not an exact pin with hashes: {line[:80]!r}")
        hashes = tuple(h.split("=", 1)[1] for h in m[3].split())
        pins.append(Pin(m[1], m[2], hashes))
    seen: dict[str, Pin] = {}
    for p in pins:
        if p.key in seen:
            raise ValueError(f"lock pins {p.key} twice ({seen[p.key].version}, {p.version})")
        seen[p.key] = p
    return pins


def parse_freeze(text: str) -> dict[str, str]:
    """``pip list --format=freeze`` (or ``pip freeze``) -> {normalized name: version}. Editable installs and
    direct references (``name @ file://...``) have no index version to match and are left out."""
    present: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            present[normalize(m[1])] = m[2]
    return present


def omit_present(pins: list[Pin], present: dict[str, str]) -> tuple[list[Pin], list[Pin]]:
    """(pins to bundle, pins the target already has at exactly that version). A local build of the same release
    (torch 2.14.0+cu126 for a locked 2.14.0) is not the locked wheel, so it is bundled."""
    keep, omitted = [], []
    for p in pins:
        (omitted if present.get(p.key, "").lower() == p.version.lower() else keep).append(p)
    return keep, omitted


def requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise ValueError(f"not a requirement: {req!r}")
    return normalize(m[1])


def smoke_requirements(pyproject_text: str) -> list[str]:
    """The dev extra's requirement strings for SMOKE_TEST_PACKAGES, as pyproject.toml pins them."""
    dev = tomllib.loads(pyproject_text)["project"]["optional-dependencies"]["dev"]
    reqs = [r for r in dev if requirement_name(r) in SMOKE_TEST_PACKAGES]
    missing = set(SMOKE_TEST_PACKAGES) - {requirement_name(r) for r in reqs}
    if missing:
        raise ValueError(f"pyproject's dev extra does not name {sorted(missing)}")
    return reqs


DEFAULT_GLIBC = "2.31"


def target_platforms(glibc: str = DEFAULT_GLIBC) -> list[str]:
    """pip's --platform values for x86-64 Linux up to a glibc: pip does not widen an explicit manylinux_2_31 to the
    older manylinux tags a glibc-2.31 system also runs, so every one is listed, legacy aliases included."""
    major, minor = (int(v) for v in glibc.split("."))
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def target_flags(python_version: str, platforms: list[str]) -> list[str]:
    abi = "cp" + python_version.replace(".", "")
    flags = ["--python-version", python_version, "--implementation", "cp", "--abi", abi]
    for p in platforms:
        flags += ["--platform", p]
    return flags


def parse_wheel_filename(filename: str) -> tuple[str, str, str, str, str]:
    """(normalized name, version, python tags, abi tags, platform tags) of a wheel file name (PEP 427)."""
    if not filename.endswith(".whl"):
        raise ValueError(f"not a wheel: {filename}")
    parts = filename[:-4].split("-")
    if len(parts) == 6:  # a build tag
        parts = parts[:2] + parts[3:]
    if len(parts) != 5:
        raise ValueError(f"not a wheel file name: {filename}")
    name, version, py, abi, plat = parts
    return normalize(name), version, py, abi, plat


def wheel_fits(filename: str, python_version: str, platforms: list[str]) -> bool:
    """Whether pip on the target (CPython ``python_version`` on one of ``platforms``) would install this wheel."""
    _, _, py, abi, plat = parse_wheel_filename(filename)
    major, minor = (int(v) for v in python_version.split("."))
    cp = f"cp{major}{minor}"

    def up_to(tag: str, prefix: str) -> bool:  # py3, py37, cp39: a release at or below the target's
        m = re.fullmatch(rf"{prefix}{major}(\d*)", tag)
        return bool(m) and (not m[1] or int(m[1]) <= minor)

    if not ("any" in plat.split(".") or set(plat.split(".")) & set(platforms)):
        return False
    # The tag triples packaging.tags.sys_tags() gives a CPython: cpXY-cpXY, cpXY-abi3 and older cp3N-abi3,
    # cpXY-none, py3N-none for N <= Y, and py3-none.
    for p in py.split("."):
        for a in abi.split("."):
            if (
                (a == cp and p == cp)
                or (a == "abi3" and up_to(p, "cp"))
                or (a == "none" and (p == cp or up_to(p, "py")))
            ):
                return True
    return False


def _dist_key(filename: str) -> tuple[str, str] | None:
    """(normalized name, version) of a wheel or sdist file name; None for other files."""
    if filename.endswith(".whl"):
        name, version, *_ = parse_wheel_filename(filename)
        return name, version
    for suffix in SDIST_SUFFIXES:
        if filename.endswith(suffix):
            stem = filename[: -len(suffix)]
            name, _, version = stem.rpartition("-")
            return normalize(name), version
    return None


def _run(cmd: list[str], log, env: dict | None = None, cwd: Path | None = None) -> None:
    """Run pip, passing its lines on as they come (a download of several GB takes minutes)."""
    log("$ " + " ".join(cmd))
    kept: list[str] = []
    with subprocess.Popen(cmd, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as p:
        for line in p.stdout:
            log("  " + line.rstrip())
            kept = (kept + [line])[-60:]
    if p.returncode:
        raise RuntimeError(f"failed ({p.returncode}): {' '.join(cmd[:6])} ...\n{''.join(kept)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(
    out: Path,
    repo: Path,
    *,
    python_version: str = "3.12",
    glibc: str = DEFAULT_GLIBC,
    freeze: Path | None = None,
    lock: Path | None = None,
    pip: list[str] | None = None,
    log=print,
) -> dict:
    """Fill ``out`` with the bundle; returns what bundle.json records (plus the build's seconds and bytes).

    Re-running into the same directory reuses the files already there (pip skips a file it already downloaded)
    and deletes wheels that are no longer part of the bundle."""
    t0 = time.perf_counter()
    pip = pip or [sys.executable, "-m", "pip"]
    lock = lock or repo / LOCK
    out.mkdir(parents=True, exist_ok=True)
    platforms = target_platforms(glibc)
    flags = target_flags(python_version, platforms)
    pins = parse_lock(lock.read_text())
    present = parse_freeze(freeze.read_text()) if freeze else {}
    keep, omitted = omit_present(pins, present)
    locked = {p.key: p for p in pins}
    # DS_BUILD_OPS=0: DeepSpeed's wheel without compiled ops (pure Python; ops it needs are built on first use).
    env = dict(
        os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PIP_PROGRESS_BAR="off", DS_BUILD_OPS="0"
    )
    log(f"bundle: {len(pins)} locked packages, {len(omitted)} already on the target, {len(keep)} to fetch")

    with tempfile.TemporaryDirectory(prefix="pcd-bundle-") as tmp:
        tmp = Path(tmp)
        # 1. The lock's files, hash-checked. --no-deps lets pip take an sdist where the target has no wheel (pip
        #    prefers a fitting wheel of the pinned version whenever one exists); such sdists are built below.
        if keep:
            reqs = tmp / "locked.txt"
            reqs.write_text("".join(p.line() + "\n" for p in keep))
            _run([*pip, "download", "--no-deps", "--require-hashes", *flags, "-d", str(out), "-r", str(reqs)], log, env)
        for sdist in sorted(f for f in out.iterdir() if f.name.endswith(SDIST_SUFFIXES)):
            key = _dist_key(sdist.name)
            if key is None or key[0] not in locked:
                continue
            built = tmp / "built" / key[0]
            _run([*pip, "wheel", "--no-deps", "--no-cache-dir", "-w", str(built), str(sdist)], log, env)
            wheels = list(built.glob("*.whl"))
            if len(wheels) != 1 or not wheel_fits(wheels[0].name, python_version, platforms):
                raise RuntimeError(
                    f"{sdist.name} built {[w.name for w in wheels]}, not one wheel the target can "
                    f"install (a compiled extension must be built on the target's Python)"
                )
            shutil.move(str(wheels[0]), out / wheels[0].name)
            sdist.unlink()
            log(f"bundle: built {wheels[0].name} from {sdist.name}")

        # 2. Test packages the lock lacks, resolved for the target with the lock's pins as constraints, so a
        #    package both need comes in one version.
        extra_reqs = [
            r for r in smoke_requirements((repo / "pyproject.toml").read_text()) if requirement_name(r) not in locked
        ]
        extras: dict[str, str] = {}
        if extra_reqs:
            constraints = tmp / "constraints.txt"
            constraints.write_text("".join(p.line(with_hashes=False) + "\n" for p in pins))
            dest = tmp / "extras"
            _run(
                [*pip, "download", "--only-binary=:all:", *flags, "-c", str(constraints), "-d", str(dest), *extra_reqs],
                log,
                env,
            )
            for f in sorted(dest.iterdir()):
                name, version = _dist_key(f.name) or (None, None)
                if name is None or name in locked:
                    continue  # the lock's own file (or, if omitted, the target's copy) serves
                extras[name] = version
                shutil.copy2(f, out / f.name)
            log(f"bundle: test packages outside the lock: {extra_reqs} -> {extras or 'nothing new'}")

        # 3. pcd-ray itself, from a copy of the tree (a build writes build/ and *.egg-info beside its sources).
        src = tmp / "pcd-ray"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(repo / name, src / name)
        shutil.copytree(repo / "pcd_ray", src / "pcd_ray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for old in out.glob("pcd_ray-*.whl"):
            old.unlink()
        _run([*pip, "wheel", "--no-deps", "--no-cache-dir", "-w", str(out), str(src)], log, env)

    # 4. Exactly one file per package, the pinned version; anything else in the directory is a leftover.
    wanted = {p.key: p.version for p in keep} | extras
    files: dict[str, Path] = {}
    for f in sorted(out.iterdir()):
        key = _dist_key(f.name)
        if key is None:
            continue
        name, version = key
        if name == "pcd-ray":
            files[name] = f
        elif wanted.get(name, "").lower() == version.lower() and f.name.endswith(".whl"):
            if name in files:
                raise RuntimeError(f"two files for {name}: {files[name].name}, {f.name}")
            files[name] = f
        else:
            log(f"bundle: removing {f.name} (not part of this bundle)")
            f.unlink()
    missing = sorted(set(wanted) - set(files))
    if missing:
        raise RuntimeError(f"no file for {missing}")
    unfit = [f.name for f in files.values() if not wheel_fits(f.name, python_version, platforms)]
    if unfit:
        raise RuntimeError(f"wheels the target cannot install: {unfit}")

    pcd_version = parse_wheel_filename(files["pcd-ray"].name)[1]
    pinned = {name: (locked[name].name if name in locked else name, version) for name, version in wanted.items()}
    pinned["pcd-ray"] = ("pcd-ray", pcd_version)
    (out / "requirements.txt").write_text(
        "# Every wheel in this bundle, exactly (scripts/gpu-smoke bundle wrote it from cluster/requirements-gpu.txt).\n"
        + "".join(f"{n}=={v}\n" for n, v in sorted(pinned.values(), key=lambda nv: normalize(nv[0])))
    )
    size = sum(f.stat().st_size for f in files.values())
    meta = {
        "python_version": python_version,
        "glibc": glibc,
        "platforms": platforms,
        "lock": str(LOCK),
        "lock_sha256": _sha256(lock),
        "packages": len(files),
        "bytes": size,
        "omitted_present": [p.line(with_hashes=False) for p in omitted],
        "extras_outside_lock": extras,
        "pcd_ray_wheel": files["pcd-ray"].name,
        "build_s": round(time.perf_counter() - t0, 1),
    }
    (out / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(
        f"Offline wheels for pcd-ray's GPU smoke: CPython {python_version}, x86-64 Linux with glibc >= {glibc}. "
        f"On the target, from a pcd-ray checkout: `scripts/gpu-smoke --bundle <this directory>` (installs "
        f"requirements.txt into a --system-site-packages venv with `pip install --no-index --find-links`, then runs "
        f"the smoke); {len(omitted)} locked packages are expected from the target's own Python (bundle.json).\n"
    )
    log(f"bundle: {out}: {len(files)} wheels, {size / 2**30:.2f} GiB, {meta['build_s']} s")
    return meta


def install(bundle: Path, venv: Path, base_python: str = sys.executable, log=print) -> tuple[str, dict]:
    """Install the bundle into ``venv`` (created with --system-site-packages from ``base_python``) without an index;
    -> (the venv's python, what was done). A venv already holding this exact requirements.txt is reused."""
    t0 = time.perf_counter()
    meta = json.loads((bundle / "bundle.json").read_text())
    reqs = bundle / "requirements.txt"
    have = subprocess.run(
        [base_python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if have != meta["python_version"]:
        raise RuntimeError(
            f"the bundle is for Python {meta['python_version']}, {base_python} is {have}: run "
            f"scripts/gpu-smoke with a Python {meta['python_version']}"
        )
    python = venv / "bin" / "python"
    marker = venv / ".pcd-bundle"
    digest = _sha256(reqs)
    info = {"bundle": str(bundle), "venv": str(venv), "packages": meta["packages"]}
    if python.exists() and marker.exists() and marker.read_text().strip() == digest:
        log(f"bundle: {venv} already holds this bundle")
        return str(python), info | {"reused": True, "seconds": round(time.perf_counter() - t0, 1)}
    _run([base_python, "-m", "venv", "--system-site-packages", "--clear", str(venv)], log)
    # The bundle is the only source: no pip configuration (an index, find-links, constraints) may add to it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    _run([str(python), "-m", "pip", "install", "--no-index", "--find-links", str(bundle), "-r", str(reqs)], log, env)
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, env=env)
    marker.write_text(digest + "\n")
    info |= {
        "reused": False,
        "seconds": round(time.perf_counter() - t0, 1),
        "pip_check": check.stdout.strip() or check.stderr.strip(),
    }
    log(f"bundle: installed into {venv} in {info['seconds']} s; pip check: {info['pip_check'].splitlines()[0]}")
    return str(python), info
