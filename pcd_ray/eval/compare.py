"""``pcd-ray eval --compare RUN [RUN ...]``: several runs' reports side by side, without evaluating anything.

A RUN is an eval output directory (holding report.json) or a run root whose ``eval/`` holds one; local or s3://.
Models are renamed ``<run>/<model>`` (run = the directory's last name, made unique), the first run's first model is
the baseline for deltas, and the merged report is written like any other (JSON, Markdown, PNG).
"""

from __future__ import annotations

from pcd_ray.storage import Storage, join


def find_report(storage: Storage, run: str) -> str:
    """The report.json URI of a run; FileNotFoundError names both places looked at."""
    base = storage.resolve(run)
    for uri in (join(base, "report.json"), join(base, "eval", "report.json")):
        if storage.exists(uri):
            return uri
    raise FileNotFoundError(f"{base}: no report.json (looked at {base}/report.json and {base}/eval/report.json)")


def _label(uri: str, taken: set[str]) -> str:
    parts = [p for p in uri.rsplit("/report.json", 1)[0].split("/") if p]
    name = parts[-2] if parts[-1] == "eval" and len(parts) > 1 else parts[-1]
    label, n = name, 2
    while label in taken:
        label, n = f"{name}-{n}", n + 1
    taken.add(label)
    return label


def compare_runs(runs: list[str], storage: Storage, output: str) -> dict:
    """Merge the runs' reports (``report.merge_reports``), write it under ``output``, return it."""
    from pcd_ray.eval.report import merge_reports, write_report

    taken: set[str] = set()
    reports = {}
    for run in runs:
        uri = find_report(storage, run)
        reports[_label(uri, taken)] = storage.read_json(uri)
    merged = merge_reports(reports)
    merged["output"] = storage.resolve(output)
    write_report(merged, storage, output)
    return merged
