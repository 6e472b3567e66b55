"""PNG plots of a report (matplotlib's Agg canvas: no pyplot, no global backend state, works headless).

- ``report``: per-task grouped bars, one colour per model, error bars (s.e. over seeds) where known, dashed chance;
- ``comparative_alpha``: accuracy vs alpha on the confused classes, per task and protocol, one line per model;
- ``confusion``: per model the confused classes' confusion matrix before and after comparative prompting;
- ``datasets``: the labelled datasets' zero-shot and difference accuracy (it is ``report`` itself when there is no
  synthetic set).
"""

from __future__ import annotations

import io

import numpy as np


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _bars(
    ax,
    groups: list[str],
    series: list[tuple[str, list, list]],
    title: str,
    chance: list[float | None],
    ylim: float | None = 105,
    ylabel: str = "accuracy (%)",
) -> None:
    """Grouped bars: one group per attribute/task, one bar (one colour) per model, error bars where known."""
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    for k, (name, means, errs) in enumerate(series):
        vals = [np.nan if v is None else v for v in means]
        yerr = None if all(e is None for e in errs) else [0.0 if e is None else e for e in errs]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, yerr=yerr, capsize=3, label=name, color=f"C{k}")
    for g, c in enumerate(chance):  # chance per group (tasks differ in class count)
        if c is not None:
            ax.hlines(
                c, g - 0.45, g + 0.45, colors="k", linestyles="dashed", linewidth=1, label="chance" if g == 0 else None
            )
    ax.set_xticks(
        x,
        groups,
        rotation=(45 if len(groups) > 8 else 20) if max(map(len, groups), default=0) > 6 else 0,
        fontsize=8,
        ha="right" if len(groups) > 8 else "center",
    )
    if ylim:
        ax.set_ylim(0, ylim)
    else:  # signed values (gains): mark zero
        ax.axhline(0, color="k", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)


def _panels(report: dict) -> list:
    """(title, groups, series, chance, ylim, ylabel) per overview panel the report has data for."""
    names = list(report["models"])
    models = [report["models"][n] for n in names]
    panels = []
    for mode in ("hard", "easy"):
        if all(m.get("difference", {}).get(mode) for m in models):
            first = models[0]["difference"][mode]
            groups = list(first["attributes"]) + ["overall"]
            series = []
            for name, m in zip(names, models):
                r = m["difference"][mode]
                es = [r["attributes"][g] if g != "overall" else r["overall"] for g in groups]
                series.append((name, [e["accuracy"] for e in es], [e["stderr"] for e in es]))
            panels.append(
                (f"difference accuracy, {mode} pairs", groups, series, [50.0] * len(groups), 105, "accuracy (%)")
            )
    for key, label in (("zeroshot", "zero-shot (paper template)"), ("zeroshot_ensemble", "zero-shot (ensemble)")):
        if all(m.get(key) for m in models):
            tasks = list(models[0][key]["tasks"])
            series = [
                (
                    n,
                    [m[key]["tasks"][t]["accuracy"] for t in tasks] + [m[key]["mean_accuracy"]],
                    [None] * (len(tasks) + 1),
                )
                for n, m in zip(names, models)
            ]
            chance = [models[0][key]["tasks"][t]["chance"] for t in tasks] + [models[0][key]["mean_chance"]]
            panels.append((label, tasks + ["mean"], series, chance, 105, "accuracy (%)"))
    if all(m.get("comparative") for m in models):
        tasks = list(models[0]["comparative"])
        groups = [f"{t}\n{p}" for t in tasks for p in ("paper", "heldout")]
        series = []
        for n, m in zip(names, models):
            gains = []
            for t in tasks:
                for p in ("paper", "heldout"):
                    e = m["comparative"][t]["protocols"][p]
                    b, a = e["zeroshot"]["confused"], e["comparative"]["confused"]
                    gains.append(None if a is None or b is None else a - b)
            series.append((n, gains, [None] * len(gains)))
        panels.append(
            (
                "comparative prompting: gain on confused classes",
                groups,
                series,
                [None] * len(groups),
                None,
                "accuracy change (points)",
            )
        )
    if all(m.get("geometry") for m in models):
        tasks = list(models[0]["geometry"]["distances"])
        if tasks:  # no comparatives, no distances: the analogy panel still stands
            series = [
                (
                    n,
                    [m["geometry"]["distances"][t]["forward"] for t in tasks],
                    [m["geometry"]["distances"][t]["forward_stderr"] for t in tasks],
                )
                for n, m in zip(names, models)
            ]
            panels.append(
                ("geometry: forward distance (lower is better)", tasks, series, [1.0] * len(tasks), 2.0, "1 - cos")
            )
        an = [m["geometry"]["analogy"] for m in models]
        series = [
            (n, [a["text"]["accuracy"], a["image"]["accuracy"]], [a["text"]["stderr"], a["image"]["stderr"]])
            for n, a in zip(names, an)
        ]
        panels.append(
            (
                f"analogy accuracy ({an[0]['task']})",
                ["text", "image"],
                series,
                [an[0]["chance_text"], an[0]["chance_image"]],
                105,
                "accuracy (%)",
            )
        )
    if all(m.get("retrieval") for m in models):
        r0 = models[0]["retrieval"]
        ks = list(r0["captions"]["text_to_image"])
        groups = (
            [f"t2i {k}" for k in ks]
            + [f"i2t {k}" for k in ks]
            + [f"A+more {k}" for k in ks]
            + [f"A only {k}" for k in ks]
        )
        series = []
        for n, m in zip(names, models):
            r = m["retrieval"]
            vals = [r["captions"]["text_to_image"][k] for k in ks] + [r["captions"]["image_to_text"][k] for k in ks]
            errs = [None] * len(vals)
            for mode in ("text", "image"):
                vals += [r["conditioned"][mode][k]["accuracy"] for k in ks]
                errs += [r["conditioned"][mode][k]["stderr"] for k in ks]
            series.append((n, vals, errs))
        panels.append(("retrieval recall@k", groups, series, [None] * len(groups), 105, "recall (%)"))
    return panels


def render_overview(report: dict) -> bytes | None:
    panels = _panels(report)
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig = _figure(4.6 * cols, 3.8 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (title, groups, series, chance, ylim, ylabel) in zip(axes, panels):
        _bars(ax, groups, series, title, chance, ylim, ylabel)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    axes[0].legend(loc="lower left", fontsize=8)
    return _png(fig)


def _comparative_sets(report: dict) -> list[tuple[str, str, list[tuple[str, dict]]]]:
    """(set name, task, [(model, comparative result)]) for every comparative task of the synthetic set and datasets."""
    names = list(report["models"])
    models = [report["models"][n] for n in names]
    out = []
    if all(m.get("comparative") for m in models):
        for task in models[0]["comparative"]:
            out.append(("synthetic", task, [(n, m["comparative"][task]) for n, m in zip(names, models)]))
    for d in models[0].get("datasets") or {}:
        if all((m.get("datasets") or {}).get(d, {}).get("comparative") for m in models):
            out.append((d, "classes", [(n, m["datasets"][d]["comparative"]) for n, m in zip(names, models)]))
    return out


def render_alpha(report: dict) -> bytes | None:
    sets = _comparative_sets(report)
    if not sets:
        return None
    fig = _figure(4.2 * len(sets), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(sets)))
    for ax, (set_name, task, entries) in zip(axes, sets):
        for k, (name, comp) in enumerate(entries):
            for protocol, style in (("paper", "-"), ("heldout", "--")):
                sw = comp["protocols"][protocol]["sweep"]
                ys = [np.nan if v is None else v for v in sw["confused"]]
                ax.plot(sw["alphas"], ys, style, color=f"C{k}", marker="o", markersize=3, label=f"{name} ({protocol})")
        ax.axvline(entries[0][1]["alpha"], color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("alpha (1 = plain zero-shot)")
        ax.set_ylabel("accuracy on confused classes (%)")
        ax.set_title(f"{set_name}: {task}", fontsize=10)
    axes[0].legend(fontsize=7)
    return _png(fig)


def render_confusion(report: dict) -> bytes | None:
    # Only tasks where the paper protocol picked pairs for every model (a set may have no confusions at all).
    sets = [s for s in _comparative_sets(report) if all(c["protocols"]["paper"]["pairs"] for _, c in s[2])]
    if not sets:
        return None
    # The task with the most classes shows most; one row per model: before | after (paper protocol).
    set_name, task, entries = max(sets, key=lambda s: len(s[2][0][1]["protocols"]["paper"]["confusion_classes"]))
    fig = _figure(10, 4.2 * len(entries))
    axes = np.asarray(fig.subplots(len(entries), 2)).reshape(len(entries), 2)
    for row, (name, comp) in enumerate(entries):
        p = comp["protocols"]["paper"]
        labels = p["confusion_classes"]
        for col, key in enumerate(("confusion_before", "confusion_after")):
            ax = axes[row, col]
            cm = np.asarray(p[key])
            ax.imshow(cm, cmap="Blues")
            for (i, j), v in np.ndenumerate(cm):
                ax.text(
                    j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black"
                )
            ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(labels) - 1), labels[:-1], fontsize=7)
            when = "zero-shot" if col == 0 else f"comparative, α={comp['alpha']}"
            ax.set_title(f"{name} ({set_name} {task})\n{when}", fontsize=9)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
    return _png(fig)


def render_datasets(report: dict) -> bytes | None:
    names = list(report["models"])
    models = [report["models"][n] for n in names]
    datasets = list(models[0].get("datasets") or {})
    if not datasets:
        return None
    groups, chance, series = [], [], {n: ([], []) for n in names}
    for d in datasets:
        e0 = models[0]["datasets"][d]
        for tmpl in e0.get("zeroshot") or {}:
            groups.append(f"{d}\nzero-shot {tmpl}")
            chance.append(e0["zeroshot"][tmpl]["chance"])
            for n, m in zip(names, models):
                series[n][0].append(m["datasets"][d]["zeroshot"][tmpl]["accuracy"])
                series[n][1].append(None)
        if e0.get("difference"):
            groups.append(f"{d}\ndifference")
            chance.append(50.0)
            for n, m in zip(names, models):
                series[n][0].append(m["datasets"][d]["difference"]["accuracy"])
                series[n][1].append(m["datasets"][d]["difference"]["stderr"])
    fig = _figure(max(6.0, 1.3 * len(groups) + 2), 4.2)
    ax = fig.subplots()
    _bars(ax, groups, [(n, *series[n]) for n in names], "labelled datasets", chance)
    ax.legend(fontsize=8)
    return _png(fig)


def render_plots(report: dict) -> dict[str, bytes]:
    """{plot name: PNG bytes}; ``report`` always (the synthetic set's panels, else the datasets' bars), the others
    when the report has their data."""
    out = {}
    for name, fn in (
        ("report", render_overview),
        ("comparative_alpha", render_alpha),
        ("confusion", render_confusion),
        ("datasets", render_datasets),
    ):
        data = fn(report)
        if data is not None:
            out[name] = data
    if "report" not in out:
        out["report"] = out.pop("datasets", None) or _png(_figure(4, 3))
    return out
