"""Python and the installed packages against pcd-ray's own pins, and vLLM against the torch it was built for.

The pins come from the installed ``pcd-ray`` distribution's metadata (what ``pip install`` resolved against), not
from a pyproject.toml that may not ship with the code. The ``gpu`` extra (vLLM) matters only to a job whose
generate engine is vllm; the ``dev`` extra never matters to a job. vLLM pins torch exactly, and a vLLM built for
another torch fails at import or, worse, at its first CUDA kernel, so its pin is read from metadata before vLLM
itself is imported (a slow import, done only when the job needs the engine).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
from collections.abc import Callable

from pcd_ray.config import JobConfig
from pcd_ray.doctor.rows import FAIL, OK, SKIP, WARN, Row, one_line, quiet

DIST = "pcd-ray"
IMAGE_LOCK = "an image: pip install --require-hashes -r cluster/requirements-gpu.txt"
BASE_INSTALL = f"pip install -e . ({IMAGE_LOCK})"
GPU_INSTALL = f"pip install -e '.[gpu]' ({IMAGE_LOCK})"


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def python_row(python_version: str, requires_python: str | None) -> Row:
    from packaging.specifiers import SpecifierSet

    if not requires_python:
        return Row("python", OK, f"{python_version} ({DIST} declares no Requires-Python)")
    if SpecifierSet(requires_python).contains(python_version, prereleases=True):
        return Row("python", OK, f"{python_version} (pcd-ray requires {requires_python})")
    return Row(
        "python",
        FAIL,
        f"{python_version}, but pcd-ray requires {requires_python}",
        f"use a Python {requires_python} interpreter (docs/ENV.md), then {BASE_INSTALL}",
    )


def _needed(req, extras: tuple[str, ...]) -> bool:
    """Whether a requirement applies to an install with these extras (its marker, e.g. ``extra == "gpu"``)."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in ("", *extras))


def package_problems(
    requirements: list[str], extras: tuple[str, ...], version_of: Callable[[str], str | None]
) -> tuple[int, list[tuple[str, bool]]]:
    """(requirements checked, [(problem, whether only an extra needs it)]) for the given requirement strings."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    checked, problems = 0, []
    for text in requirements:
        req = Requirement(text)
        if not _needed(req, extras):
            continue
        checked += 1
        extra_only = not _needed(req, ())
        spec = str(req.specifier) or "any version"
        have = version_of(req.name)
        if have is None:
            problems.append((f"{req.name} missing (needs {spec})", extra_only))
            continue
        try:
            ok = req.specifier.contains(Version(have), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            problems.append((f"{req.name} {have} (needs {spec})", extra_only))
    return checked, problems


def packages_row(
    dist_version: str | None, requirements: list[str], extras: tuple[str, ...], version_of: Callable[[str], str | None]
) -> Row:
    if dist_version is None:
        return Row("packages", WARN, f"{DIST} is not installed as a package, so its pins cannot be read", BASE_INSTALL)
    checked, problems = package_problems(requirements, extras, version_of)
    with_extras = "".join(f" + [{e}]" for e in extras)
    if not problems:
        return Row("packages", OK, f"{checked} requirements of {DIST} {dist_version}{with_extras} met")
    fix = GPU_INSTALL if any(extra_only for _, extra_only in problems) else BASE_INSTALL
    tag = f" [{', '.join(extras)} extra]"
    return Row("packages", FAIL, "; ".join(p + (tag if extra_only else "") for p, extra_only in problems), fix)


def torch_pin(requires: list[str]):
    """The torch requirement among a distribution's requirements (its unconditional one), or None."""
    from packaging.requirements import Requirement

    for text in requires:
        req = Requirement(text)
        if req.name.lower() == "torch" and _needed(req, ()):
            return req
    return None


def vllm_row(
    engine: str, vllm_version: str | None, vllm_requires: list[str], torch_version: str | None, import_error: str | None
) -> Row:
    from packaging.version import Version

    if engine != "vllm":
        return Row("vllm", SKIP, f"not needed: generate.engine={engine}")
    if vllm_version is None:
        return Row("vllm", FAIL, "vllm is not installed (generate.engine=vllm)", GPU_INSTALL)
    pin = torch_pin(vllm_requires)
    if pin is not None:
        if torch_version is None:
            return Row(
                "vllm", FAIL, f"vllm {vllm_version} needs torch{pin.specifier}; torch is not installed", GPU_INSTALL
            )
        # A local build label (+cu130) names the CUDA flavour, not another release.
        if not pin.specifier.contains(Version(torch_version).public, prereleases=True):
            return Row(
                "vllm",
                FAIL,
                f"vllm {vllm_version} pins torch{pin.specifier}, installed torch is {torch_version}",
                f"install vLLM and torch together: {GPU_INSTALL}",
            )
    if import_error:
        return Row("vllm", FAIL, f"vllm {vllm_version} does not import: {import_error}", GPU_INSTALL)
    pinned = f"torch{pin.specifier} matches torch {torch_version}" if pin is not None else "no torch pin"
    return Row("vllm", OK, f"vllm {vllm_version} imports; {pinned}")


def _import_error(module: str) -> str | None:
    try:
        with quiet():
            importlib.import_module(module)
    except Exception as e:  # any failure to import is the finding
        return one_line(e)
    return None


def check(job: JobConfig, version_of: Callable[[str], str | None] = installed_version) -> list[Row]:
    engine = job.generate.engine
    extras = ("gpu",) if engine == "vllm" else ()
    dist_version = version_of(DIST)
    meta = md.metadata(DIST) if dist_version else None
    rows = [
        python_row(platform.python_version(), meta.get("Requires-Python") if meta else None),
        packages_row(dist_version, (md.requires(DIST) or []) if dist_version else [], extras, version_of),
    ]

    vllm_version = version_of("vllm")
    vllm_requires = (md.requires("vllm") or []) if vllm_version else []
    torch_version = version_of("torch")
    import_error = None
    if engine == "vllm" and vllm_version:
        # Import only a vLLM whose torch pin holds: importing a mismatched one can crash the process.
        pinned = vllm_row(engine, vllm_version, vllm_requires, torch_version, None)
        if pinned.verdict == OK:
            import_error = _import_error("vllm")
    rows.append(vllm_row(engine, vllm_version, vllm_requires, torch_version, import_error))
    return rows
