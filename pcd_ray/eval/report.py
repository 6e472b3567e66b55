"""The evaluation report: report.json (every number), report.md (tables), report.png (bars), and a terminal table.

The report dict is what ``eval.job.run_eval`` builds::

    {"created", "data": {"images", "split", "num_images"},
     "settings": {"seeds", "pairs_per_attribute", "attributes", "zeroshot_template", "config"},
     "baseline": <first model's name>,
     "models": {name: {"source", "spec", "num_embedded", "embedding_errors", "errors",
                       "difference": {"hard": <difference_accuracy()>, "easy": <...>},
                       "zeroshot": <zeroshot_accuracy()>, "timings_s"}}}

Every table puts the models side by side in the order given, with deltas of each later model against the first
(the baseline). The Markdown and the plain-text table render the same rows, so they cannot disagree.
"""

from __future__ import annotations

import io
from typing import Any

from pcd_ray.storage import Storage, join

Section = tuple[str, list[str], list[list[str]]]  # (title, header, rows of cells)


def _cell(mean: float | None, stderr: float | None = None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.1f}" if stderr is None else f"{mean:.1f} ± {stderr:.1f}"


def _delta(value: float | None, base: float | None) -> str:
    return "n/a" if value is None or base is None else f"{value - base:+.1f}"


def _sections(report: dict) -> list[Section]:
    """The rows every rendering shares: hard and easy difference accuracy, then zero-shot."""
    names = list(report["models"])
    models = [report["models"][n] for n in names]
    delta_cols = [f"Δ {n}" for n in names[1:]]
    seeds = report["settings"]["seeds"]
    sections: list[Section] = []
    for mode in ("hard", "easy"):
        results = [m["difference"][mode] for m in models]
        keys = list(results[0]["attributes"]) + ["overall"]
        rows = []
        for key in keys:
            entries = [r["overall"] if key == "overall" else r["attributes"][key] for r in results]
            pairs = entries[0]["pairs_per_seed"]
            pair_txt = str(pairs[0]) if len(set(pairs)) == 1 else f"{min(pairs)}-{max(pairs)}"
            if mode == "easy" and key != "overall":
                pair_txt += f" of {entries[0]['available_pairs']}"
            rows.append([key, pair_txt] + [_cell(e["accuracy"], e["stderr"]) for e in entries]
                        + [_delta(e["accuracy"], entries[0]["accuracy"]) for e in entries[1:]])
        title = f"Difference accuracy, {mode} pairs (%, chance 50; mean ± s.e. over {len(seeds)} seeds)"
        sections.append((title, ["attribute", "pairs/seed"] + names + delta_cols, rows))
    zs = [m["zeroshot"] for m in models]
    rows = []
    for task, entry in zs[0]["tasks"].items():
        accs = [z["tasks"][task]["accuracy"] for z in zs]
        rows.append([task, f"{entry['chance']:.1f}"] + [_cell(a) for a in accs]
                    + [_delta(a, accs[0]) for a in accs[1:]])
    means = [z["mean_accuracy"] for z in zs]
    rows.append(["mean", _cell(zs[0]["mean_chance"])] + [_cell(a) for a in means]
                + [_delta(a, means[0]) for a in means[1:]])
    sections.append((f"Zero-shot classification (%, prompt \"{zs[0]['template']}\")",
                     ["task", "chance"] + names + delta_cols, rows))
    return sections


def format_table(report: dict) -> str:
    """A compact plain-text rendering for the terminal (the demo prints it)."""
    out = []
    for title, header, rows in _sections(report):
        widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
        out.append(title)
        for r in [header] + rows:
            out.append("  " + "  ".join(c.ljust(w) if k == 0 else c.rjust(w)
                                        for k, (c, w) in enumerate(zip(r, widths))).rstrip())
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def to_markdown(report: dict) -> str:
    data, settings = report["data"], report["settings"]
    lines = ["# pcd-ray evaluation", "",
             f"Images `{data['images']}`, split `{data['split']}` ({data['num_images']} images); seeds "
             f"{settings['seeds']}; up to {settings['pairs_per_attribute']} pairs per attribute and seed. "
             f"Baseline for deltas: `{report['baseline']}`. Created {report.get('created', 'n/a')}.", "",
             "| model | source | images embedded | embedding errors |", "|---|---|---|---|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | `{m['source']}` | {m['num_embedded']} | {m['embedding_errors']} |")
    for title, header, rows in _sections(report):
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Hard pairs: random test images whose attribute differs (the headline). Easy pairs: images equal "
              "in every other attribute (a sanity check; `of N` = how many such pairs exist). Difference sentences "
              "use held-out wordings.", ""]
    return "\n".join(lines)


def _bars(ax, groups: list[str], series: list[tuple[str, list, list]], title: str, chance: list[float]) -> None:
    """Grouped bars: one group per attribute/task, one bar (one colour) per model, error bars where known."""
    import numpy as np

    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    for k, (name, means, errs) in enumerate(series):
        vals = [np.nan if v is None else v for v in means]
        yerr = None if all(e is None for e in errs) else [0.0 if e is None else e for e in errs]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, yerr=yerr, capsize=3, label=name,
               color=f"C{k}")
    for g, c in enumerate(chance):  # chance per group (zero-shot tasks differ in class count)
        ax.hlines(c, g - 0.45, g + 0.45, colors="k", linestyles="dashed", linewidth=1,
                  label="chance" if g == 0 else None)
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)


def render_png(report: dict) -> bytes:
    """report.png: hard / easy difference accuracy and zero-shot, side by side; dashed lines mark chance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report["models"])
    models = [report["models"][n] for n in names]
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg canvas: no pyplot, no global backend state, works headless
    axes = fig.subplots(1, 3)
    for ax, mode in zip(axes, ("hard", "easy")):
        first = models[0]["difference"][mode]
        groups = list(first["attributes"]) + ["overall"]
        series = []
        for name, m in zip(names, models):
            r = m["difference"][mode]
            entries = [r["attributes"][g] if g != "overall" else r["overall"] for g in groups]
            series.append((name, [e["accuracy"] for e in entries], [e["stderr"] for e in entries]))
        _bars(ax, groups, series, f"difference accuracy, {mode} pairs", [first["chance"]] * len(groups))
    zs0 = models[0]["zeroshot"]
    tasks = list(zs0["tasks"])
    series = [(name, [m["zeroshot"]["tasks"][t]["accuracy"] for t in tasks] + [m["zeroshot"]["mean_accuracy"]],
               [None] * (len(tasks) + 1)) for name, m in zip(names, models)]
    chance = [zs0["tasks"][t]["chance"] for t in tasks] + [zs0["mean_chance"] or 0.0]
    _bars(axes[2], tasks + ["mean"], series, "zero-shot classification", chance)
    axes[0].legend(loc="lower left", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_report(report: dict, storage: Storage, uri: str) -> dict[str, Any]:
    """Write report.json, report.md and report.png under a directory URI (local or s3://); returns their URIs.

    Each file is written atomically (see ``storage.write_bytes``). Raises KeyError for a report missing a section.
    """
    base = storage.resolve(uri)
    paths = {"json": join(base, "report.json"), "md": join(base, "report.md"), "png": join(base, "report.png")}
    # Render everything before writing anything, so a malformed report leaves no partial set of files.
    md, png = to_markdown(report), render_png(report)
    storage.write_json(paths["json"], report)
    storage.write_text(paths["md"], md)
    storage.write_bytes(paths["png"], png)
    return paths
