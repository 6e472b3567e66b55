"""The evaluation report: report.json (every number), report.md (tables), PNG plots, and a terminal table.

The report dict is what ``eval.job.run_eval`` builds::

    {"created", "data": {"images", "split", "num_images", "datasets": {name: {..., "comparatives"}},
              "comparatives": {"uri", "commit", "rows", "complete", "sets": {set: pairs}} or None},
     "settings": {"seeds", "pairs_per_attribute", "protocol", "attributes", "zeroshot_template", "config"},
     "baseline": <first model's name>,
     "models": {name: {"source", "spec", "num_embedded", "embedding_errors", "errors",
                       "difference": {"hard", "easy"}, "zeroshot", "zeroshot_ensemble", "comparative",
                       "geometry", "retrieval",                              # the synthetic set
                       "datasets": {name: {"zeroshot": {template set: ...}, "difference", "comparative",
                                           "geometry", "retrieval"}}, "timings_s"}}}

Sections a report lacks (no synthetic set, a dataset without comparatives, an older report) are left out. Every
table puts the models side by side in the order given, with deltas of each later model against the first (the
baseline). The Markdown and the plain-text table render the same rows, so they cannot disagree.
"""

from __future__ import annotations

import re
from typing import Any

from pcd_ray.console import WIDTH
from pcd_ray.eval.paper import Section, paper_sections
from pcd_ray.eval.paper import get_path as _get
from pcd_ray.storage import Storage, join


def _cell(mean: float | None, stderr: float | None = None, digits: int = 1) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if stderr is None else f"{mean:.{digits}f} ± {stderr:.{digits}f}"


def _delta(value: float | None, base: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or base is None else f"{value - base:+.{digits}f}"


def _row(label: list[str], entries: list[tuple[float | None, float | None]], digits: int = 1) -> list[str]:
    """label cells + one cell per model + one delta per later model against the first."""
    return (
        label + [_cell(m, s, digits) for m, s in entries] + [_delta(m, entries[0][0], digits) for m, _ in entries[1:]]
    )


def _difference_sections(models, names, seeds) -> list[Section]:
    sections = []
    for mode in ("hard", "easy"):
        results = [_get(m, "difference", mode) for m in models]
        if any(r is None for r in results):
            continue
        rows = []
        for key in list(results[0]["attributes"]) + ["overall"]:
            entries = [r["overall"] if key == "overall" else r["attributes"][key] for r in results]
            pairs = entries[0]["pairs_per_seed"]
            pair_txt = str(pairs[0]) if len(set(pairs)) == 1 else f"{min(pairs)}-{max(pairs)}"
            if mode == "easy" and key != "overall":
                pair_txt += f" of {entries[0]['available_pairs']}"
            rows.append(_row([key, pair_txt], [(e["accuracy"], e["stderr"]) for e in entries]))
        title = f"Difference accuracy, {mode} pairs (synthetic set; %, chance 50; mean ± s.e. over {len(seeds)} seeds)"
        sections.append((title, ["attribute", "pairs/seed"] + names + [f"Δ {n}" for n in names[1:]], rows))
    return sections


def _zeroshot_sections(models, names) -> list[Section]:
    out = []
    deltas = [f"Δ {n}" for n in names[1:]]
    titles = {
        "zeroshot": lambda z: f'Zero-shot classification (synthetic set; %, prompt "{z["template"]}")',
        "zeroshot_ensemble": lambda z: (
            f"Zero-shot classification, template ensemble (synthetic set; %, {z['templates']})"
        ),
    }
    for key, title in titles.items():
        zs = [m.get(key) for m in models]
        if not all(zs):
            continue
        rows = [
            _row([task, f"{entry['chance']:.1f}"], [(z["tasks"][task]["accuracy"], None) for z in zs])
            for task, entry in zs[0]["tasks"].items()
        ]
        rows.append(_row(["mean", _cell(zs[0]["mean_chance"])], [(z["mean_accuracy"], None) for z in zs]))
        out.append((title(zs[0]), ["task", "chance"] + names + deltas, rows))
    return out


def _comparative_rows(comps: list[dict | None], task: str) -> list[list[str]]:
    """Rows per protocol and subset: each model's cell is 'zero-shot → comparative (gain)'."""
    rows = []
    for protocol in ("paper", "heldout"):
        p0 = comps[0]["protocols"][protocol]
        pairs = "; ".join(f"{a} / {b}" for a, b, _ in p0["pairs"]) or "none"
        for subset in ("full", "confused"):
            cells = []
            gains = []
            for c in comps:
                p = c["protocols"][protocol]
                before, after = p["zeroshot"][subset], p["comparative"][subset]
                gain = None if before is None or after is None else after - before
                gains.append(gain)
                cells.append(f"{_cell(before)} → {_cell(after)} ({_delta(after, before)})")
            rows.append(
                [task, protocol, subset, pairs if subset == "full" else "", *cells]
                + [_delta(g, gains[0]) for g in gains[1:]]
            )
    return rows


def _comparative_section(title: str, per_task: dict[str, list], names) -> Section | None:
    rows = [r for task, comps in per_task.items() if all(comps) for r in _comparative_rows(comps, task)]
    if not rows:
        return None
    return (
        title,
        ["task", "protocol", "subset", "confused pairs (baseline's)"] + names + [f"Δ gain {n}" for n in names[1:]],
        rows,
    )


def _geometry_rows(geos: list[dict], task: str) -> list[list[str]]:
    rows = []
    for key, better in (("forward", "lower"), ("reverse", "higher")):
        entries = [(g[key], g[f"{key}_stderr"]) for g in geos]
        rows.append(_row([task, f"{key} ({better} is better)", str(geos[0]["num_pairs"])], entries, digits=3))
    return rows


def _synthetic_extra_sections(models, names) -> list[Section]:
    out: list[Section] = []
    deltas = [f"Δ {n}" for n in names[1:]]
    comps = [m.get("comparative") for m in models]
    if all(comps):
        alpha = next(iter(comps[0].values()))["alpha"]
        sec = _comparative_section(
            f"Comparative prompting (synthetic set; %, alpha {alpha}; zero-shot → comparative)",
            {t: [c.get(t) for c in comps] for t in comps[0]},
            names,
        )
        if sec:
            out.append(sec)
    geos = [m.get("geometry") for m in models]
    if all(geos):
        rows = [
            r
            for task in geos[0].get("distances") or {}
            for r in _geometry_rows([g["distances"][task] for g in geos], task)
        ]
        if rows:  # none without comparatives
            out.append(
                (
                    "Geometry (synthetic set): 1 - cos(class-prompt difference, comparative text), mean ± s.e. "
                    "over pairs",
                    ["task", "distance", "pairs"] + names + deltas,
                    rows,
                )
            )
        an = [g["analogy"] for g in geos]
        rows = [
            _row(
                [f"{an[0]['task']}: {kind}", _cell(an[0][f"chance_{kind}"])],
                [(a[kind]["accuracy"], a[kind]["stderr"]) for a in an],
            )
            for kind in ("text", "image")
        ]
        out.append(
            (
                "Analogy accuracy (synthetic set; %): ĝ(a) - ĝ(b) + ĝ(c) nearest to the right class prompt / image",
                ["analogy", "chance"] + names + deltas,
                rows,
            )
        )
    rets = [m.get("retrieval") for m in models]
    if all(rets):
        rows = []
        for direction in ("text_to_image", "image_to_text"):
            for k in rets[0]["captions"][direction]:
                rows.append(_row([direction.replace("_", " "), k], [(r["captions"][direction][k], None) for r in rets]))
        for mode in ("text", "image"):
            for k in rets[0]["conditioned"][mode]:
                label = "like A but more/less" if mode == "text" else "image A only (reference)"
                rows.append(
                    _row(
                        [label, k],
                        [(r["conditioned"][mode][k]["accuracy"], r["conditioned"][mode][k]["stderr"]) for r in rets],
                    )
                )
        out.append(
            (
                "Retrieval (synthetic set; %): captions and difference-conditioned",
                ["query", "recall"] + names + deltas,
                rows,
            )
        )
    return out


def _dataset_sections(models, names) -> list[Section]:
    deltas = [f"Δ {n}" for n in names[1:]]
    per_ds = [m.get("datasets") or {} for m in models]
    datasets = [d for d in per_ds[0] if all(d in x for x in per_ds)]
    if not datasets:
        return []
    entries = {d: [x[d] for x in per_ds] for d in datasets}
    out: list[Section] = []
    rows = []
    for d in datasets:
        for tmpl in entries[d][0].get("zeroshot") or {}:
            rows.append(
                _row(
                    [d, tmpl, _cell(entries[d][0]["zeroshot"][tmpl]["chance"])],
                    [(e["zeroshot"][tmpl]["accuracy"], None) for e in entries[d]],
                )
            )
    if rows:
        out.append(
            (
                "Zero-shot classification (labelled datasets; %)",
                ["dataset", "templates", "chance"] + names + deltas,
                rows,
            )
        )
    rows = [
        _row(
            [d, entries[d][0]["difference"]["task"], str(max(entries[d][0]["difference"]["pairs_per_seed"]))],
            [(e["difference"]["accuracy"], e["difference"]["stderr"]) for e in entries[d]],
        )
        for d in datasets
        if all(e.get("difference") for e in entries[d])
    ]
    if rows:
        out.append(
            (
                "Difference accuracy (labelled datasets; %, chance 50; mean ± s.e. over seeds)",
                ["dataset", "task", "pairs/seed"] + names + deltas,
                rows,
            )
        )
    sec = _comparative_section(
        "Comparative prompting (labelled datasets; %; zero-shot → comparative)",
        {d: [e.get("comparative") for e in entries[d]] for d in datasets},
        names,
    )
    if sec:
        out.append(sec)
    rows = [
        r
        for d in datasets
        if all(_get(e, "geometry", "distances") for e in entries[d])
        for r in _geometry_rows([e["geometry"]["distances"] for e in entries[d]], d)
    ]
    if rows:
        out.append(
            (
                "Geometry (labelled datasets): 1 - cos(class-prompt difference, comparative text)",
                ["dataset", "distance", "pairs"] + names + deltas,
                rows,
            )
        )
    rows = [
        _row(
            [d, direction.replace("_", " "), k], [(e["retrieval"]["captions"][direction][k], None) for e in entries[d]]
        )
        for d in datasets
        if all(e.get("retrieval") for e in entries[d])
        for direction in ("text_to_image", "image_to_text")
        for k in entries[d][0]["retrieval"]["captions"][direction]
    ]
    if rows:
        out.append(("Caption retrieval (labelled datasets; %)", ["dataset", "query", "recall"] + names + deltas, rows))
    return out


def _sections(report: dict) -> list[Section]:
    """The rows every rendering shares."""
    names = list(report["models"])
    models = [report["models"][n] for n in names]
    return (
        _difference_sections(models, names, report["settings"]["seeds"])
        + _zeroshot_sections(models, names)
        + _synthetic_extra_sections(models, names)
        + _dataset_sections(models, names)
        + paper_sections(report)
    )


def comparatives_line(report: dict) -> str | None:
    """Which comparatives artifact the report read (URI and commit id), in one line; None when eval read none."""
    c = (report.get("data") or {}).get("comparatives")
    if not c:
        return None
    if c.get("commit") is None:
        return (
            f"Comparatives: none at `{c['uri']}` (`pcd-ray comparatives` writes them); comparative prompting and "
            f"difference distances skipped where no dataset file gives them."
        )
    sets = ", ".join(f"{k} ({n} pairs)" for k, n in c.get("sets", {}).items()) or "none of the evaluated sets"
    incomplete = ", incomplete" if c.get("complete") is False else ""
    return f"Comparatives: `{c['uri']}` (commit `{c['commit']}`, {c['rows']} rows{incomplete}); used for {sets}."


# Terminal tables are kept within WIDTH columns: long cells wrap, and a table still wider is split into column
# groups that each repeat the first column.
CELL_WIDTH = 36


def _wrap_cell(text: str, width: int = CELL_WIDTH) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [""]


def _text_table(header: list[str], rows: list[list[str]], width: int = WIDTH) -> list[str]:
    """Rows as aligned lines, no line over ``width`` (with the two-space indent)."""
    cells = [[_wrap_cell(c) for c in r] for r in [header] + rows]
    widths = [max(len(part) for r in cells for part in r[c]) for c in range(len(header))]
    # Label columns (any cell with words) read left to right; numbers line up on the right.
    left = [c == 0 or any(re.search(r"[a-zA-Z]{2}", r[c]) and r[c] != "n/a" for r in rows) for c in range(len(header))]
    groups, current, used = [], [0], widths[0]
    for c in range(1, len(header)):
        if 2 + used + 2 + widths[c] > width and len(current) > 1:
            groups.append(current)
            current, used = [0], widths[0]
        current.append(c)
        used += 2 + widths[c]
    groups.append(current)
    out = []
    for n, cols in enumerate(groups):
        if n:
            out.append("")
        for r in cells:
            for k in range(max(len(r[c]) for c in cols)):
                parts = [(r[c][k] if k < len(r[c]) else "") for c in cols]
                out.append(
                    "  "
                    + "  ".join(
                        p.ljust(widths[c]) if left[c] else p.rjust(widths[c]) for p, c in zip(parts, cols)
                    ).rstrip()
                )
    return out


BRIEF = {
    "Difference accuracy, hard pairs": None,
    "Zero-shot classification (": None,
    "Retrieval (": {("text to image", "R@10"), ("like A but more/less", "R@5"), ("image A only (reference)", "R@5")},
}
"""The headline tables a brief rendering keeps (title prefix -> the (first, second) cells of the rows it keeps, or
None for all), besides the paper's tables and every labelled dataset's."""


def _brief(sections: list[Section]) -> list[Section]:
    out = []
    for title, header, rows in sections:
        prefix = next((p for p in BRIEF if title.startswith(p)), None)
        if prefix is None and "synthetic set" in title:
            continue
        keep = BRIEF.get(prefix) if prefix else None
        out.append((title, header, [r for r in rows if keep is None or (r[0], r[1]) in keep]))
    return out


def format_table(report: dict, *, brief: bool = False) -> str:
    """A plain-text rendering for the terminal, at most WIDTH columns wide. ``brief`` keeps the headline tables of
    the synthetic set (``BRIEF``: what the demo prints; the rest is in report.md) and every other table whole."""
    import textwrap

    line = comparatives_line(report)
    # "commit <id>" stays on one line (a no-break space through the wrap): people and scripts look for it whole.
    line = line and line.replace("`", "").replace("commit ", "commit\u00a0")
    out = [w.replace("\u00a0", " ") for w in textwrap.wrap(line, WIDTH)] + [""] if line else []
    sections = _sections(report)
    for title, header, rows in _brief(sections) if brief else sections:
        out += textwrap.wrap(title, WIDTH) + _text_table(header, rows) + [""]
    return "\n".join(out).rstrip() + "\n"


NOTES = (
    "Hard pairs: random test images whose attribute differs (the headline). Easy pairs: images equal in every "
    "other attribute (a sanity check that saturates; `of N` = how many such pairs exist). Difference sentences "
    "use held-out wordings. Comparative prompting: `paper` picks the most-confused pairs from the model's own "
    "confusion matrix on the evaluated images; `heldout` picks them on a seeded half and scores the other half. "
    "Geometry: reverse = 2 - forward pair by pair. See docs/EVAL.md for what each task measures."
)


def to_markdown(report: dict, plots: dict[str, str] | None = None) -> str:
    data, settings = report["data"], report["settings"]
    lines = ["# pcd-ray evaluation", ""]
    if data.get("images"):
        lines.append(f"Synthetic set `{data['images']}`, split `{data['split']}` ({data['num_images']} images).")
    for name, d in (data.get("datasets") or {}).items():
        own = d.get("comparatives")
        lines.append(
            f"Dataset `{name}`: {d['kind']} `{d['root']}`, split `{d['split']}` ({d['num_images']} "
            f"images, {d['num_classes']} classes)." + (f" Comparatives from `{own}`." if own else "")
        )
    line = comparatives_line(report)
    if line:
        lines.append(line)
    protocol = (settings.get("protocol") or {}).get("name")
    if protocol and data.get("datasets"):
        lines.append(f'Labelled datasets under the `{protocol}` evaluation protocol (docs/EVAL.md, "Protocols").')
    lines += [
        "",
        f"Seeds {settings['seeds']}; up to {settings['pairs_per_attribute']} pairs per attribute and seed "
        "on the synthetic set. "
        f"Baseline for deltas: `{report['baseline']}`. Created {report.get('created', 'n/a')}.",
        "",
        "| model | source | images embedded | embedding errors |",
        "|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        lines.append(
            f"| {name} | `{m['source']}` | {m.get('num_embedded', 'n/a')} | {m.get('embedding_errors', 'n/a')} |"
        )
    for title, header, rows in _sections(report):
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", NOTES, ""]
    for key, uri in (plots or {}).items():
        lines.append(f"![{key}]({uri.rsplit('/', 1)[-1]})")
    return "\n".join(lines) + "\n"


def write_report(report: dict, storage: Storage, uri: str) -> dict[str, Any]:
    """Write report.json, report.md and the PNG plots under a directory URI (local or s3://); returns their URIs.

    Each file is written atomically (see ``storage.write_bytes``). Raises KeyError for a report missing a section.
    """
    from pcd_ray.eval.plots import render_plots

    base = storage.resolve(uri)
    # Render everything before writing anything, so a malformed report leaves no partial set of files.
    pngs = render_plots(report)
    plot_uris = {name: join(base, f"{name}.png") for name in pngs}
    md = to_markdown(report, plot_uris)
    paths = {
        "json": join(base, "report.json"),
        "md": join(base, "report.md"),
        "png": plot_uris["report"],
        "plots": plot_uris,
    }
    storage.write_json(paths["json"], report)
    storage.write_text(paths["md"], md)
    for name, data in pngs.items():
        storage.write_bytes(plot_uris[name], data)
    return paths


def render_png(report: dict) -> bytes:
    """report.png alone (the overview)."""
    from pcd_ray.eval.plots import render_plots

    return render_plots(report)["report"]


def merge_reports(reports: dict[str, dict]) -> dict:
    """Several runs' reports side by side: models renamed '<run>/<model>', in the order given; the first run's
    first model is the baseline. Data and settings are the first run's; each run's own go under ``runs``."""
    if not reports:
        raise ValueError("nothing to compare")
    first = next(iter(reports.values()))
    models = {f"{run}/{name}": m for run, r in reports.items() for name, m in r["models"].items()}
    return {
        **first,
        "models": models,
        "baseline": next(iter(models)),
        "runs": {
            run: {"data": r["data"], "settings": r["settings"], "created": r.get("created")}
            for run, r in reports.items()
        },
    }
