"""``pcd-ray <stage> [--config NAME|FILE] [key.path=value ...]``

Stages: data, pairs, generate, comparatives, embed, train, eval, serve; ``pipeline`` chains them; ``demo`` runs the
pipeline on the embedded default (jobs/local.yaml) and prints the base-vs-finetuned table; ``config show`` prints the
resolved job; ``doctor`` checks that this environment can run the job (exit 1 when something it needs is missing);
``fetch`` downloads a dataset of the paper into the layout its reader expects.
The same command runs on a laptop and, through ``ray job submit -- pcd-ray ...``, on a cluster.
"""

from __future__ import annotations

import argparse
import os
import sys

from pcd_ray import console
from pcd_ray.config import DEFAULT_JOB, ConfigError, dump, load_job
from pcd_ray.errors import StageError

STAGES = {
    "data": "make the images artifact (the synthetic attribute set)",
    "pairs": "sample ordered image pairs",
    "generate": "write difference texts for the pairs (diffs + rejects)",
    "comparatives": "write how class i differs from class j for the evaluation datasets' class pairs (comparative "
    "prompting and geometry read them)",
    "embed": "embed the images once with the frozen image tower (the embeddings artifact train.embeddings reads)",
    "train": "finetune with Ray Train + DeepSpeed (--section base_train for the base pretraining)",
    "eval": "difference accuracy, zero-shot, comparative prompting, geometry, retrieval; base vs finetuned "
    "(JSON, Markdown, PNG); --compare puts several runs side by side",
    "serve": "host an export on Ray Serve (HTTP on 127.0.0.1 by default)",
    "pipeline": "every stage of the job in dependency order (up-to-date stages are skipped; --dry-run: the plan)",
    "status": "the job's stage graph: each output's state (up to date, stale and why, missing, incomplete), when "
    "it was made, its rows; reads only manifests",
    "demo": "the whole method on the embedded default, then the base-vs-finetuned table",
    "config": "`config show`: print the resolved job config",
    "fetch": "`fetch DATASET --to URI`: download a dataset of the paper (COCO, CIFAR-100, Flowers102, EuroSAT, "
    "SUN397, AwA2, CUB) with resume and checksums, extracted to the layout its reader expects",
    "doctor": "check the environment against what the job needs (packages, GPU stack, DeepSpeed ops, cluster "
    "resources, storage); exits 1 on a failed check",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcd-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, help_text in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "config":
            p.add_argument("action", choices=["show"])
        if name == "fetch":
            from pcd_ray.fetch import add_arguments

            add_arguments(p)
            continue
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="show Ray's, DeepSpeed's and other libraries' output here instead of in the run's log file",
        )
        p.add_argument(
            "--config",
            "-c",
            default=DEFAULT_JOB,
            help=f"job file, or the name of a shipped job in jobs/ (default: {DEFAULT_JOB})",
        )
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
        if name == "train":
            p.add_argument("--section", default="train", choices=["train", "base_train"])
        if name in ("pipeline", "demo"):
            p.add_argument("--force", action="store_true", help="re-run stages that are up to date")
            p.add_argument(
                "--only",
                type=lambda v: v.split(","),
                metavar="STAGE[,STAGE]",
                help="run only these stages (comma-separated)",
            )
        if name == "pipeline":
            p.add_argument("--dry-run", action="store_true", help="print the plan (pcd-ray status) and run nothing")
        if name == "serve":
            p.add_argument("--detach", action="store_true", help="start the app and return (Serve keeps running)")
        if name == "doctor":
            p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
        if name == "eval":
            p.add_argument(
                "--compare",
                nargs="+",
                metavar="RUN",
                help="write the reports of these runs (eval output dirs or run roots) side by side to "
                "eval.output instead of evaluating",
            )
    return parser


def _starts_ray(args: argparse.Namespace) -> bool:
    if args.stage in ("config", "doctor", "status", "fetch"):
        return False
    return not (getattr(args, "dry_run", False) or getattr(args, "compare", None))


def _setup_output(args: argparse.Namespace, job) -> None:
    """Quiet by default: a command that runs Ray sends every library's output to a log file under the storage
    root (printed once) and keeps the terminal for its own progress and results; ``-v`` shows everything."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A local Ray binds to 127.0.0.1 only; Ray reads this at import, so before any stage imports it (runtime.py).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    verbose = getattr(args, "verbose", False)
    if job is not None and _starts_ray(args) and not verbose:
        log_file = _log_file(job, args.stage)
        console.quiet(log_file)
        console.say(f"Library logs (Ray, DeepSpeed, ...): {log_file} (-v shows them here)", err=True)
    console.setup_logging(verbose)


def _log_file(job, stage: str) -> str:
    """<storage.root>/logs/<stage>-<time>.log for a local root; under ~/.cache/pcd-ray/logs for s3:// (the file is
    written as it goes, which an object store cannot append to)."""
    import time

    name = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    root = job.storage.root
    if "://" in root and not root.startswith("file://"):
        return os.path.join(os.path.expanduser("~/.cache/pcd-ray/logs"), name)
    return os.path.join(os.path.abspath(root.removeprefix("file://")), "logs", name)


def run(args: argparse.Namespace) -> int:
    if args.stage == "fetch":
        from pcd_ray.fetch import run_fetch

        console.setup_logging(False)
        return run_fetch(args)
    try:
        job = load_job(args.config, args.overrides)
    finally:
        _setup_output(args, locals().get("job"))
    if args.stage == "config":
        print(dump(job), end="")
        return 0
    if args.stage == "doctor":
        # Before anything below imports Ray: the doctor joins a cluster only when the job names one.
        from pcd_ray.doctor import failed, format_rows, run_doctor, write_json

        rows = run_doctor(job)
        print(format_rows(rows))
        if args.json:
            write_json(rows, args.json, args.config)
        return 1 if failed(rows) else 0

    from pcd_ray.pipeline import format_plan, plan, run_pipeline, run_stage
    from pcd_ray.stages import BY_NAME
    from pcd_ray.storage import Storage

    storage = Storage(job.storage)
    if args.stage == "status" or (args.stage == "pipeline" and args.dry_run):
        steps = plan(job, storage, force=getattr(args, "force", False), only=getattr(args, "only", None))
        print(format_plan(steps))
        return 0
    if args.stage in ("pipeline", "demo"):
        results = run_pipeline(job, storage, force=args.force, only=args.only)
        if args.stage == "demo" and "eval" in results:
            _print_report(results["eval"], job, storage, brief=True)
        return 0
    if args.stage == "serve":
        from pcd_ray.serve.app import run_serve

        run_serve(job, storage, blocking=not args.detach)
        return 0
    if args.stage == "eval" and args.compare:
        from pcd_ray.eval.compare import compare_runs
        from pcd_ray.eval.report import format_table

        console.say("\n" + format_table(compare_runs(args.compare, storage, job.eval.output)).rstrip("\n"))
        return 0
    from pcd_ray.runtime import init_ray

    init_ray(job.ray)
    stage = BY_NAME[args.section if args.stage == "train" else args.stage]
    if stage.section(job) is None:
        raise ConfigError(f"{args.config}: no {stage.name!r} section")
    result = run_stage(stage, job, storage)
    if args.stage == "eval":
        _print_report(result, job, storage)
    return 0


def _print_report(report, job, storage, *, brief: bool = False) -> None:
    """The base-vs-finetuned tables (``brief``: the headline ones, then where the rest is); a skipped (up-to-date)
    eval prints the report it made before."""
    from pcd_ray.eval.report import format_table
    from pcd_ray.provenance import REPORT_FILE
    from pcd_ray.storage import join

    out = storage.resolve(job.eval.output)
    if not isinstance(report, dict):
        report = storage.read_json(join(out, REPORT_FILE))
    console.say("\n" + format_table(report, brief=brief).rstrip("\n"))
    if brief:
        console.say(f"\nThe whole report (easy pairs, comparative prompting, geometry, ...): {join(out, 'report.md')}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse gives an optional-positional list (overrides) only the words before the first option, so
    # `pcd-ray config show --config F a.b=1` would leave `a.b=1` over; overrides may go anywhere.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(getattr(args, "overrides", None) or []) + extra
    # A caller that already runs Ray (a notebook, a test session) keeps it: only a Ray this command started is stopped.
    ray_before = sys.modules.get("ray")
    had_ray = ray_before is not None and ray_before.is_initialized()
    try:
        return run(args)
    except ConfigError as e:
        print(f"pcd-ray: {e}", file=console.terminal())
        return 2
    except StageError as e:
        # Ray streams its workers' logs to this process from a thread; stopping Ray first keeps the reason the
        # stage stopped as the last thing a user reads.
        ray = sys.modules.get("ray")  # only a stage that started Ray has it to stop
        if ray is not None and ray.is_initialized() and not had_ray:
            ray.shutdown()
        print(f"pcd-ray: {e}", file=console.terminal())
        if console.log_path:
            print(f"Library logs of this run: {console.log_path}", file=console.terminal())
        return 1
    except Exception as e:
        if not console.log_path:
            raise
        # Quiet mode sends the traceback to the log file (stderr is the file): the terminal names the error and
        # where the traceback is, last.
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        print(f"pcd-ray: {type(e).__name__}: {e}", file=console.terminal())
        print(f"The traceback is in {console.log_path}", file=console.terminal())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
