"""Checks the GPU smoke runs with pcd-ray's interpreter (they import torch, open_clip, pcd_ray, ...).

    python scripts/gpu_smoke/checks.py versions --json F        # interpreter, torch/CUDA, GPU, driver, packages
    python scripts/gpu_smoke/checks.py tiny-llm DIR             # a tiny random Llama for vLLM (kept if there)
    python scripts/gpu_smoke/checks.py export DIR --json F      # plain open_clip loads a pcd-ray export, encodes
    python scripts/gpu_smoke/checks.py accounted --root R --pairs P --diffs D --rejects X --json F
    python scripts/gpu_smoke/checks.py dry SPEC.json --json F   # --dry-run: parse/validate commands, run nothing

The working tree's pcd_ray is imported (the repository root goes first on sys.path), whatever is installed.
Exit status 1 when a check fails; the JSON says why.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _write(path: str | None, obj: dict) -> None:
    text = json.dumps(obj, indent=2, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)


def versions(args) -> int:
    import platform
    import shutil
    import subprocess
    from importlib import metadata

    import torch

    out = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append(
                {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"}
            )
    if shutil.which("nvidia-smi"):
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        out["driver"] = res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None
    else:
        try:  # nvidia-ml-py, which vLLM depends on
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            out["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        except Exception as e:  # no driver at all: what the JSON is for
            out["driver"] = None
            out["driver_error"] = f"{type(e).__name__}: {e}"
    pkgs = {}
    for name in ("vllm", "ray", "deepspeed", "open_clip_torch", "transformers", "pcd-ray"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    out["packages"] = pkgs
    _write(args.json, out)
    return 0


def tiny_llm(args) -> int:
    path = Path(args.dir)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        print(f"tiny-llm: {path} exists")
        return 0
    sys.path.insert(0, str(REPO / "tests" / "generate"))
    from tiny_llm import write_tiny_llm

    write_tiny_llm(path)
    print(f"tiny-llm: wrote {path}")
    return 0


def export(args) -> int:
    """What a user of the export does: plain open_clip, no pcd-ray, one text and one image, on the GPU if any."""
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{args.dir}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{args.dir}")
    model.eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        t = model.encode_text(tokenizer(["the first image shows a larger red circle"]).to(device))
        i = model.encode_image(preprocess(image).unsqueeze(0).to(device))
    out = {
        "device": device,
        "text_shape": list(t.shape),
        "image_shape": list(i.shape),
        "finite": bool(torch.isfinite(t).all() and torch.isfinite(i).all()),
        "cosine": float(torch.nn.functional.cosine_similarity(t.float(), i.float()).item()),
    }
    out["ok"] = out["finite"] and t.shape == i.shape and not math.isnan(out["cosine"])
    _write(args.json, out)
    return 0 if out["ok"] else 1


def accounted(args) -> int:
    """Every pair in exactly one of diffs and rejects (what tests/generate checks after a run)."""
    from collections import Counter

    from pcd_ray import artifacts
    from pcd_ray.config import StorageConfig
    from pcd_ray.storage import Storage

    storage = Storage(StorageConfig(root=args.root))
    pairs = artifacts.read_table(storage, args.pairs, "pairs", columns=["pair_id"])["pair_id"].to_pylist()
    kept = artifacts.read_table(storage, args.diffs, "diffs", columns=["pair_id"])["pair_id"].to_pylist()
    rejects = artifacts.read_table(storage, args.rejects, "rejects", columns=["pair_id", "reason"])
    dropped = rejects["pair_id"].to_pylist()
    seen = Counter(kept + dropped)
    out = {
        "pairs": len(pairs),
        "diffs": len(kept),
        "rejects": len(dropped),
        "twice": sum(1 for n in seen.values() if n > 1),
        "missing": len(set(pairs) - set(seen)),
        "unknown": len(set(seen) - set(pairs)),
        "reasons": dict(Counter(r.split(":")[0] for r in rejects["reason"].to_pylist()).most_common(5)),
    }
    out["ok"] = out["twice"] == out["missing"] == out["unknown"] == 0 and len(seen) == len(pairs)
    _write(args.json, out)
    return 0 if out["ok"] else 1


# ---------------------------------------------------------------------------------------------------- --dry-run
class _Parsed(Exception):
    pass


def _check_pcd_ray(argv: list[str]) -> dict:
    """The CLI parses the words as pcd-ray's main() does, and the job loads with the overrides."""
    from pcd_ray.cli import build_parser
    from pcd_ray.config import load_job

    parser = build_parser()
    stages = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv[0] not in stages:
        return {"ok": False, "missing": True, "error": f"this pcd-ray has no {argv[0]!r} command"}
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit:
        return {"ok": False, "error": f"pcd-ray rejects {argv}"}
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        return {"ok": False, "error": f"unrecognized arguments: {unknown}"}
    job = load_job(args.config, list(args.overrides or []) + extra)
    out = {"ok": True}
    if argv[0] == "train":
        import open_clip

        name = job.train.model.name
        if job.train.model.checkpoint is None and name not in open_clip.list_models() and not name.startswith("pcd-"):
            return {"ok": False, "error": f"open_clip has no model {name!r}"}
        out["train"] = {
            "model": name,
            "zero_stage": job.train.deepspeed.zero_stage,
            "precision": job.train.deepspeed.precision,
            "max_steps": job.train.max_steps,
            "use_gpu": job.train.scaling.use_gpu,
            "output": job.train.output,
        }
    return out


def _check_script(argv: list[str]) -> dict:
    """Run the script up to its argument parser and stop there: the arguments are accepted, nothing else runs."""
    import runpy

    script = argv[0]
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_and_stop
    saved = sys.argv
    sys.argv = list(argv)
    try:
        runpy.run_path(script, run_name="__main__")
    except _Parsed:
        return {"ok": True}
    except SystemExit as e:
        return {"ok": False, "error": f"{Path(script).name} rejects {argv[1:]} (exit {e.code})"}
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved
    return {"ok": False, "error": f"{Path(script).name} never parsed its arguments"}


def dry(args) -> int:
    """SPEC: [{"kind": "pcd-ray" | "script" | "check", "argv": [...]}]; -> the same list with ok/error each."""
    spec = json.loads(Path(args.spec).read_text())
    parser = build_parser()
    for item in spec:
        try:
            if item["kind"] == "pcd-ray":
                item |= _check_pcd_ray(item["argv"])
            elif item["kind"] == "script":
                item |= _check_script(item["argv"])
            elif item["kind"] == "check":
                parser.parse_args(item["argv"])
                item |= {"ok": True}
            else:
                item |= {"ok": False, "error": f"unknown kind {item['kind']!r}"}
        except SystemExit as e:
            item |= {"ok": False, "error": f"arguments rejected (exit {e.code})"}
        except Exception as e:
            item |= {"ok": False, "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
    _write(args.json, {"commands": spec})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="check", required=True)
    p = sub.add_parser("versions")
    p.add_argument("--json")
    p.set_defaults(func=versions)
    p = sub.add_parser("tiny-llm")
    p.add_argument("dir")
    p.set_defaults(func=tiny_llm)
    p = sub.add_parser("export")
    p.add_argument("dir")
    p.add_argument("--json")
    p.set_defaults(func=export)
    p = sub.add_parser("accounted")
    for flag in ("--root", "--pairs", "--diffs", "--rejects"):
        p.add_argument(flag, required=True)
    p.add_argument("--json")
    p.set_defaults(func=accounted)
    p = sub.add_parser("dry")
    p.add_argument("spec")
    p.add_argument("--json")
    p.set_defaults(func=dry)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
