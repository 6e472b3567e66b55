"""The paper's tables, laid out as the paper lays them out, with the paper's reported numbers beside ours.

The report (eval/report.py) appends these sections when the evaluation covers the paper's datasets. Each table has
one row per dataset of the paper's table and, per row, our baseline and our finetuned model (the first and the last
model of ``eval.models``) next to the paper's CLIP and PC-CLIP. The paper's column holds only the figures the paper
states as numbers (arXiv 2409.09721, ViT-L-14 DataComp-XL, as reported); the rest read "n/a" rather than a guess.
"""

from __future__ import annotations

from typing import Any

Section = tuple[str, list[str], list[list[str]]]  # (title, header, rows of cells): one table of the report


def get_path(d: Any, *path: Any) -> Any:
    """d[path[0]][path[1]]..., or None where a level is missing (reports of other versions lack sections)."""
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


SOURCE = "Sam et al., Finetuning CLIP to Reason about Pairwise Differences (arXiv 2409.09721), as reported"

# (dataset kind, row label) in the paper's order, per table.
DIFFERENCE_ROWS = [
    ("awa2", "AwA2 (attributes)"),
    ("cifar100", "CIFAR-100 (size)"),
    ("flowers102", "Flowers102 (colour)"),
    ("cub", "CUB (LLM differences)"),
]
ZEROSHOT_ROWS = [
    ("cifar100", "CIFAR-100"),
    ("cub", "CUB"),
    ("eurosat", "EuroSAT"),
    ("flowers102", "Flowers102"),
    ("sun397", "SUN397"),
]

# The paper's numbers: (CLIP, PC-CLIP); None where the paper gives no number for that cell.
PAPER_DIFFERENCE: dict[str, tuple[float | None, float | None]] = {"cifar100": (54.9, 67.4), "cub": (53.3, 67.6)}
PAPER_ZEROSHOT: dict[str, tuple[float | None, float | None]] = {"cub": (81.7, 80.1)}
# Comparative prompting on the most-confused classes: points gained over zero-shot.
PAPER_COMPARATIVE_GAIN: dict[str, tuple[float | None, float | None]] = {
    "eurosat": (-3.4, 7.0),
    "flowers102": (None, 9.4),
}
# Geometry on CIFAR-100: 1 - cos(class-prompt difference, comparative text).
PAPER_GEOMETRY: dict[str, tuple[float | None, float | None]] = {"forward": (1.04, 0.92), "reverse": (0.96, 1.08)}


def _fmt(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _by_kind(model: dict) -> dict[str, dict]:
    """The model's dataset entries keyed by dataset kind (the first dataset of each kind)."""
    out: dict[str, dict] = {}
    for entry in (model.get("datasets") or {}).values():
        out.setdefault(entry.get("kind"), entry)
    return out


def _table(title: str, rows: list[list[str]], ours: tuple[str, str]) -> Section:
    header = ["dataset", f"ours: {ours[0]}", f"ours: {ours[1]}", "paper: CLIP", "paper: PC-CLIP"]
    return title, header, rows


def paper_sections(report: dict) -> list[Section]:
    """The paper's tables for the datasets this report covers; [] when it covers none of them."""
    names = list(report.get("models") or {})
    if len(names) < 2:
        return []
    base, tuned = _by_kind(report["models"][names[0]]), _by_kind(report["models"][names[-1]])
    ours = (names[0], names[-1])
    out: list[Section] = []

    rows = []
    for kind, label in DIFFERENCE_ROWS:
        b, t = get_path(base, kind, "difference"), get_path(tuned, kind, "difference")
        if b and t:
            paper = PAPER_DIFFERENCE.get(kind, (None, None))
            rows.append([label, _fmt(b["accuracy"]), _fmt(t["accuracy"]), _fmt(paper[0]), _fmt(paper[1])])
    if rows:
        out.append(_table("Paper table: difference accuracy (%, chance 50)", rows, ours))

    rows = []
    for kind, label in ZEROSHOT_ROWS:
        b, t = get_path(base, kind, "zeroshot", "paper"), get_path(tuned, kind, "zeroshot", "paper")
        if b and t:
            paper = PAPER_ZEROSHOT.get(kind, (None, None))
            rows.append([label, _fmt(b["accuracy"]), _fmt(t["accuracy"]), _fmt(paper[0]), _fmt(paper[1])])
    if rows:
        out.append(_table("Paper table: zero-shot accuracy (%, the paper's prompt)", rows, ours))

    rows = []
    for kind, label in ZEROSHOT_ROWS:
        gains = []
        for model in (base, tuned):
            p = get_path(model, kind, "comparative", "protocols", "paper")
            before, after = get_path(p, "zeroshot", "confused"), get_path(p, "comparative", "confused")
            gains.append(None if before is None or after is None else after - before)
        if any(g is not None for g in gains):
            paper = PAPER_COMPARATIVE_GAIN.get(kind, (None, None))
            rows.append([label] + [_fmt(g, sign=True) for g in gains] + [_fmt(p, sign=True) for p in paper])
    if rows:
        out.append(
            _table(
                "Paper table: comparative prompting, gain over zero-shot on the confused classes (points)", rows, ours
            )
        )

    rows = []
    for key, better in (("forward", "lower"), ("reverse", "higher")):
        path = ("cifar100", "geometry", "distances", key)
        b, t = get_path(base, *path), get_path(tuned, *path)
        if b is not None and t is not None:
            paper = PAPER_GEOMETRY[key]
            rows.append(
                [f"CIFAR-100 {key} ({better} is better)", _fmt(b, 2), _fmt(t, 2), _fmt(paper[0], 2), _fmt(paper[1], 2)]
            )
    if rows:
        out.append(_table("Paper table: geometry, 1 - cos(class-prompt difference, comparative text)", rows, ours))
    return out
