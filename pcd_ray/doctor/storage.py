"""Storage reachable: storage.root takes a write and a delete, as every stage's artifacts will need.

The probe is a real object (``<root>/_doctor/<uuid>``), written and deleted, because listing a bucket proves
neither write nor delete permission. For s3:// the filesystem is Storage's own options (endpoint, region, anon)
with a short connect timeout and few retries: botocore's defaults retry a wrong endpoint for minutes.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from pcd_ray.config import StorageConfig
from pcd_ray.doctor.rows import FAIL, OK, Row, one_line, quiet
from pcd_ray.storage import Storage, is_remote, join

CHECK = "storage"
PROBE_DIR = "_doctor"
PROBE = b"pcd-ray doctor probe\n"
S3_CLIENT = {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 2, "mode": "standard"}}
"""botocore settings of the probe: a closed port fails at once, a black-holed host in about 6 s."""
S3_ATTEMPTS = 1
"""s3fs's own retries on top of botocore's (it retries even connection errors, without backoff)."""


def _missing_dirs(path: Path) -> list[Path]:
    """The directories of ``path`` that do not exist yet, deepest first (the probe removes what it created)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def local_row(storage: Storage) -> Row:
    root = storage.root
    probe_dir = Path(root) / PROBE_DIR
    created = _missing_dirs(probe_dir)
    try:
        probe = join(str(probe_dir), uuid.uuid4().hex)
        storage.write_bytes(probe, PROBE)
        storage.rm(probe)
    except OSError as e:
        return Row(
            CHECK,
            FAIL,
            f"{root}: not writable: {one_line(e)}",
            "set storage.root to a writable directory (or s3://bucket/prefix)",
        )
    finally:
        for d in created:
            try:
                d.rmdir()
            except OSError:  # not empty or already gone: not ours to remove
                break
    return Row(CHECK, OK, f"{root}: writable (probe file written and deleted)")


def s3_row(storage: Storage) -> Row:
    import fsspec

    root = storage.root
    path = root.partition("://")[2]
    bucket = path.split("/", 1)[0]
    options = storage.s3_options()
    endpoint = (
        options["client_kwargs"].get("endpoint_url")
        or f"AWS's default endpoint ({options['client_kwargs']['region_name']})"
    )
    where = f"bucket {bucket!r} at {endpoint}"
    if not storage.cfg.s3.anon:
        import botocore.session

        with quiet():
            credentials = botocore.session.get_session().get_credentials()
        if credentials is None:
            return Row(
                CHECK,
                FAIL,
                f"{root}: no AWS credentials found (environment, AWS_PROFILE / ~/.aws, instance role) for {where}",
                "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); storage.s3.anon=true "
                "for a public bucket",
            )
    fs = fsspec.filesystem("s3", **options, config_kwargs=S3_CLIENT)
    fs.retries = S3_ATTEMPTS
    key = f"{path.rstrip('/')}/{PROBE_DIR}/{uuid.uuid4().hex}"
    step = "write"
    try:
        with quiet():
            fs.pipe_file(key, PROBE)
            step = "delete"
            fs.rm_file(key)
    except Exception as e:  # connection refused, NoSuchBucket, AccessDenied, ...: the finding itself
        return Row(
            CHECK,
            FAIL,
            f"{root}: probe {step} failed, {where}: {one_line(e)}",
            "check storage.s3.endpoint_url (else AWS_ENDPOINT_URL), that the bucket exists, and that these "
            "credentials may write and delete under storage.root",
        )
    return Row(CHECK, OK, f"{root}: probe object written and deleted ({where})")


def remote_row(storage: Storage) -> Row:
    """Any other fsspec protocol, through Storage as the stages use it."""
    root = storage.root
    probe = join(root, PROBE_DIR, uuid.uuid4().hex)
    try:
        with quiet():
            storage.write_bytes(probe, PROBE)
            storage.rm(probe)
    except Exception as e:  # whatever the filesystem raises is the finding
        return Row(CHECK, FAIL, f"{root}: probe failed: {one_line(e)}", "check storage.root and its credentials")
    return Row(CHECK, OK, f"{root}: probe object written and deleted")


def check(cfg: StorageConfig) -> list[Row]:
    storage = Storage(cfg)
    if not is_remote(storage.root):
        return [local_row(storage)]
    if storage.root.split("://", 1)[0] in ("s3", "s3a"):
        return [s3_row(storage)]
    return [remote_row(storage)]
