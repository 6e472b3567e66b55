"""The paper's tables in the report: our models beside the paper's numbers, one row per dataset of the paper."""

from __future__ import annotations

from pcd_ray.eval.paper import PAPER_DIFFERENCE, paper_sections


def _entry(kind: str, acc: float, zs: float, before: float, after: float, forward: float) -> dict:
    return {
        "kind": kind,
        "zeroshot": {"paper": {"accuracy": zs}},
        "difference": {"accuracy": acc, "stderr": 0.5},
        "comparative": {"protocols": {"paper": {"zeroshot": {"confused": before}, "comparative": {"confused": after}}}},
        "geometry": {"distances": {"forward": forward, "reverse": 2 - forward}},
    }


def _report(models: dict[str, dict]) -> dict:
    return {"models": {name: {"datasets": ds} for name, ds in models.items()}}


def test_rows_follow_the_paper_with_its_numbers_beside_ours():
    report = _report(
        {
            "base": {
                "c100": _entry("cifar100", 55.0, 70.0, 40.0, 38.0, 1.05),
                "cub": _entry("cub", 52.0, 80.0, 0, 0, 1),
            },
            "finetuned": {
                "c100": _entry("cifar100", 66.0, 71.0, 40.0, 47.0, 0.9),
                "cub": _entry("cub", 68.0, 79.5, 0, 0, 1),
            },
        }
    )
    sections = {title: (header, rows) for title, header, rows in paper_sections(report)}
    header, rows = sections["Paper table: difference accuracy (%, chance 50)"]
    assert header == ["dataset", "ours: base", "ours: finetuned", "paper: CLIP", "paper: PC-CLIP"]
    # The paper's order (AwA2, CIFAR-100, Flowers102, CUB), only the datasets evaluated.
    assert rows == [
        ["CIFAR-100 (size)", "55.0", "66.0", *(f"{v:.1f}" for v in PAPER_DIFFERENCE["cifar100"])],
        ["CUB (LLM differences)", "52.0", "68.0", "53.3", "67.6"],
    ]
    _, rows = sections["Paper table: zero-shot accuracy (%, the paper's prompt)"]
    assert rows[0] == ["CIFAR-100", "70.0", "71.0", "n/a", "n/a"] and rows[1] == ["CUB", "80.0", "79.5", "81.7", "80.1"]
    _, rows = next(v for k, v in sections.items() if k.startswith("Paper table: comparative"))
    assert rows[0] == ["CIFAR-100", "-2.0", "+7.0", "n/a", "n/a"]
    _, rows = next(v for k, v in sections.items() if k.startswith("Paper table: geometry"))
    assert rows[0] == ["CIFAR-100 forward (lower is better)", "1.05", "0.90", "1.04", "0.92"]


def test_no_paper_tables_without_the_papers_datasets_or_a_second_model():
    assert paper_sections(_report({"base": {}, "finetuned": {}})) == []
    assert paper_sections(_report({"base": {"c": _entry("cifar100", 1, 1, 1, 1, 1)}})) == []


def test_terminal_tables_stay_within_120_columns_and_keep_every_cell():
    from pcd_ray.eval.report import WIDTH, _text_table

    header = ["task", "confused pairs"] + [f"model {k}" for k in range(10)]
    pairs = "size=large,colour=red / size=medium,colour=red; size=small,colour=blue / size=small,colour=purple"
    rows = [["size+colour", pairs] + [f"{50 + k}.1 ± 0.3" for k in range(10)]]
    lines = _text_table(header, rows)
    assert max(map(len, lines)) <= WIDTH
    text = " ".join(lines)
    assert all(f"{50 + k}.1 ± 0.3" in text and f"model {k}" in text for k in range(10))
    assert all(word in text for word in pairs.split())  # the long cell wraps onto lines of its own column
    # Each column group repeats the first column, so a row stays readable.
    assert sum(line.split()[0] == "size+colour" for line in lines if line.strip()) >= 2
