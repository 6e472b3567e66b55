"""``pcd-ray fetch DATASET --to URI``: the paper's datasets from their publishers, in the layout the readers expect.

    pcd-ray fetch --list
    pcd-ray fetch cifar100 --to s3://bucket/datasets/cifar100
    pcd-ray fetch coco --to /data/coco --only annotations,val2014 --dry-run

Downloads resume (HTTP Range from a partial file in ``--cache``), transient errors are retried with backoff, and
checksums are verified before anything is extracted; extraction goes to staging and reaches the target with a
manifest written last (``job.py``, ``target.py``). docs/DATASETS.md lists the datasets, their sizes and layouts.

This module only builds the parser and dispatches: the CLI imports it for every command, so it imports nothing heavy.
"""

from __future__ import annotations

import argparse

from pcd_ray.fetch.specs import DATASETS


def _parts(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", nargs="?", metavar="DATASET", help=f"one of: {', '.join(DATASETS)}")
    parser.add_argument(
        "--to",
        metavar="URI",
        help="folder or s3:// prefix that becomes the dataset's root (what the "
        "job's root/annotations/images keys point at)",
    )
    parser.add_argument("--list", action="store_true", help="list the datasets, their parts and download sizes")
    parser.add_argument(
        "--only",
        type=_parts,
        metavar="PART[,PART]",
        help="fetch only these parts (coco: annotations, train2014, val2014; cub: images, captions)",
    )
    parser.add_argument(
        "--cache",
        metavar="DIR",
        default=None,
        help="where downloads (and partial downloads) are kept (default: ~/.cache/pcd-ray/datasets)",
    )
    parser.add_argument(
        "--base-url",
        metavar="URL",
        help="download every file as URL/<file name> instead of from its publisher (a mirror)",
    )
    parser.add_argument(
        "--url",
        action="append",
        default=[],
        metavar="FILE=URL",
        help="download one file (by its name, e.g. CUB_200_2011.tgz) from URL; repeatable",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would be downloaded and written")
    parser.add_argument("--force", action="store_true", help="fetch parts the target's manifest already lists")
    parser.add_argument(
        "--retries", type=int, default=5, metavar="N", help="retries of a download that makes no progress (default: 5)"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="network timeout of one read (default: 60)"
    )
    parser.add_argument(
        "--clean-cache", action="store_true", help="delete the downloads from the cache once their part is committed"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="S3-compatible endpoint for an s3:// --to (default: AWS_ENDPOINT_URL, then AWS's)",
    )
    parser.add_argument("--region", help="S3 region (default: AWS_DEFAULT_REGION / AWS_REGION, then us-east-1)")


def run_fetch(args: argparse.Namespace) -> int:
    """Run ``pcd-ray fetch``; raises ConfigError for bad usage and StageError when a download or archive fails."""
    from pcd_ray.config import ConfigError, S3Config, StorageConfig
    from pcd_ray.fetch import job, specs
    from pcd_ray.storage import Storage

    if getattr(args, "overrides", None):
        raise ConfigError(f"fetch takes no key=value overrides (got {' '.join(args.overrides)})")
    if args.list:
        print(job.format_list(specs.DATASETS))
        return 0
    if not args.dataset:
        raise ConfigError("fetch: name a dataset (pcd-ray fetch --list shows them)")
    if not args.to:
        raise ConfigError(f"fetch {args.dataset}: --to URI is required (a folder or an s3:// prefix)")
    if args.retries < 0 or args.timeout <= 0:
        raise ConfigError("fetch: --retries must be >= 0 and --timeout > 0")
    urls = {}
    for item in args.url:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ConfigError(f"fetch: --url {item!r}: expected FILE=URL")
        urls[name] = url
    try:
        spec = specs.get(args.dataset)
        spec.select(args.only)
        job.source_urls(spec, args.base_url, urls)
    except KeyError as e:
        raise ConfigError(f"fetch: {e.args[0]}") from None
    storage = Storage(StorageConfig(s3=S3Config(endpoint_url=args.endpoint_url, region=args.region)))
    job.fetch(
        spec,
        args.to,
        only=args.only,
        cache_dir=args.cache,
        base_url=args.base_url,
        urls=urls,
        storage=storage,
        force=args.force,
        dry_run=args.dry_run,
        retries=args.retries,
        timeout_s=args.timeout,
        progress=not args.no_progress,
        clean_cache=args.clean_cache,
    )
    return 0
