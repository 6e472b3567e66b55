"""The two output filters (``generate.filter``: strict, paper) on the same raw outputs: reject rate per reason and
overall, side by side, and every output on which they disagree (kept by one, dropped by the other, or dropped for
different reasons, or kept with different texts).

    python benchmarks/filter_compare.py --synthetic 20000 --seed 0     # seeded corpus of LLM-like outputs (below)
    python benchmarks/filter_compare.py --tiny-llm 300                 # transformers engine, tiny random Llama
    python benchmarks/filter_compare.py --diffs URI --rejects URI      # the raw outputs of a generate run
    python benchmarks/filter_compare.py --jsonl outputs.jsonl          # one JSON string or {"raw": ...} per line

Sources of raw outputs:

- ``--diffs``/``--rejects``: a generate run's two artifacts (local or s3://, read through ``Storage``); both keep
  the engine's raw output. Rejects whose reason is not a filter reason (``prompt_too_long``, ``no_caption``, ...)
  never reached the filter and are left out (counted in ``not_filtered``).
- ``--jsonl``: a file of raw outputs.
- ``--synthetic N``: N outputs written by ``synthetic_corpus``: one or two templated difference sentences about
  COCO-like subjects, each output given independently each defect of ``DEFECTS`` with the probability listed
  there (an output may get several). The rates are chosen, not measured on an LLM: the reject rates this gives are
  the injected rates seen through each filter; the per-defect table (what each filter does with the outputs that
  have exactly that one defect) and the disagreements are what it is for.
- ``--tiny-llm N``: the raw outputs of the transformers engine (``GenerateActor``, paper-v1 prompt, sampling at
  temperature 1) on N pairs with the 2-layer random Llama of tests/generate/tiny_llm.py: word pieces of its
  training text, not sentences; a check of what the filters do with model noise, not of an LLM's defects.

Results go to stdout and, with ``--out``, a JSON file (benchmarks/results/filter_compare*.json).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pcd_ray.generate.filter import FILTERS, REASONS  # noqa: E402

MODES = ("strict", "paper")
GROUPS = (
    "kept by both, texts differ",
    "strict drops, paper keeps",
    "paper drops, strict keeps",
    "both drop, reasons differ",
)
"""The kinds of disagreement; the first three by reason, the last by the pair of reasons."""

_SUBJECTS = ["dog", "cat", "man", "woman", "bus", "pizza", "train", "kite", "giraffe", "surfer", "clock", "bench"]
_ADJS = ["large", "small", "brown", "white", "red", "wet", "old", "crowded", "empty", "bright", "dark", "striped"]
_PLACES = ["on a beach", "in a kitchen", "on a city street", "in a field", "near a window", "at night", "in the snow"]
_TEMPLATES = [
    "The first image shows a {a1} {s1} {p1}, while the second image shows a {a2} {s2} {p2}.",
    "In the first image there is a {a1} {s1} {p1}, whereas the second image has a {a2} {s2} instead.",
    "Compared to the second image, the first one is {a1}er and its {s1} is {a2}.",
    "The main difference is that the first image contains a {a1} {s1} and the second contains a {a2} {s2} {p2}.",
    "Unlike the second image, which is taken {p2}, the first image is taken {p1} and shows a {a1} {s1}.",
]
_SHORT = ["The first image has a {a1} {s1}.", "Image one is {a1}er.", "A {s1} versus a {s2}."]


def _sentence(rng: random.Random, templates: list[str]) -> str:
    s1, s2 = rng.sample(_SUBJECTS, 2)
    a1, a2 = rng.sample(_ADJS, 2)
    p1, p2 = rng.sample(_PLACES, 2)
    return rng.choice(templates).format(s1=s1, s2=s2, a1=a1, a2=a2, p1=p1, p2=p2).replace("eer", "er")


DEFECTS: list[tuple[str, float, str]] = [
    ("multiline", 0.15, "two sentences on two lines"),
    ("leading_newlines", 0.02, "three newlines before the answer"),
    ("follow_up_question", 0.05, "the model asks itself a new question: ' Q: ...'"),
    ("i_hope", 0.04, "' I hope this helps!' at the end"),
    ("note", 0.05, "' Note: ...' at the end"),
    ("numbered", 0.05, "'#1: ...' and '#2: ...' on two lines"),
    ("answer_prefix", 0.05, "'A: ' before the answer"),
    ("markdown", 0.04, "'**Difference:**' or '* ' bullets"),
    ("non_ascii", 0.03, "an em dash, curly quotes or an accented word"),
    ("char_run", 0.02, "one of '!!!!!', '?????????', '-----', '.....', '=====' at the end"),
    ("word_loop", 0.02, "a word four to six times in a row"),
    ("unit_loop", 0.02, "one of 'lamalamalama', 't,t,t,', 'thththth', 'abababab', 'nononono'"),
    ("url", 0.02, "one of https://..., http://..., www.sciencedirect.com/..."),
    ("meta", 0.02, "'Description:' or 'Description of the image:' first"),
    ("bad_phrase", 0.01, "'... 100% of the time.'"),
    ("code", 0.01, "'#include <stdio.h>' first, or '<br>' between sentences"),
    ("short", 0.05, "a one-clause answer under 60 characters"),
]
"""(name, probability per output, what is injected)."""


def _inject(rng: random.Random, name: str, text: str) -> str:
    pick = rng.choice
    if name == "multiline":
        return text + "\n" + _sentence(rng, _TEMPLATES)
    if name == "leading_newlines":
        return "\n\n\n" + text
    if name == "follow_up_question":
        return text + " Q: What is the difference between a " + pick(_SUBJECTS) + " and a " + pick(_SUBJECTS) + "?"
    if name == "i_hope":
        return text + " I hope this helps!"
    if name == "note":
        return text + " Note: the captions may not describe every detail."
    if name == "numbered":
        return "#1: " + text + "\n#2: " + _sentence(rng, _TEMPLATES)
    if name == "answer_prefix":
        return "A: " + text
    if name == "markdown":
        return pick(["**Difference:** " + text, "* " + text + "\n* " + _sentence(rng, _TEMPLATES)])
    if name == "non_ascii":
        return pick([text.rstrip(".") + " \u2014 clearly.", "\u201c" + text + "\u201d", text + " Tr\u00e8s chic."])
    if name == "char_run":
        return text + pick(["!!!!!", "?????????", "-----", ".....", " ====="])
    if name == "word_loop":
        return text + " The " + " ".join([pick(_SUBJECTS)] * rng.randint(4, 6))
    if name == "unit_loop":
        return text + " " + pick(["lamalamalama", "t,t,t,", "thththth", "abababab", "nononono"])
    if name == "url":
        return text + pick(
            [
                " (see https://example.com/img/1.jpg)",
                " http://images.cocodataset.org",
                " www.sciencedirect.com/science/article",
            ]
        )
    if name == "meta":
        return pick(["Description: ", "Description of the image: "]) + text
    if name == "bad_phrase":
        return text.rstrip(".") + " 100% of the time."
    if name == "code":
        return pick(["#include <stdio.h>\n" + text, text + "<br>" + _sentence(rng, _TEMPLATES)])
    if name == "short":
        return _sentence(rng, _SHORT)
    raise KeyError(name)


def synthetic_corpus(n: int, seed: int) -> list[tuple[str, list[str]]]:
    """``n`` (raw output, injected defect names): seeded, the same for the same (n, seed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = _sentence(rng, _TEMPLATES)
        injected = [name for name, p, _ in DEFECTS if rng.random() < p]
        # "short" replaces the answer, so it goes first; leading newlines must lead, so they go last.
        for name in sorted(injected, key=lambda d: (d != "short", d == "leading_newlines")):
            text = _inject(rng, name, text)
        out.append((text, injected))
    return out


def read_artifacts(diffs: str, rejects: str, storage_root: str | None) -> tuple[list[str], dict[str, int]]:
    """The raw outputs that reached the filter in a generate run, and {reason: n} of the rejects that did not."""
    from pcd_ray import artifacts
    from pcd_ray.config import StorageConfig
    from pcd_ray.storage import Storage

    storage = Storage(StorageConfig.model_validate({"root": storage_root} if storage_root else {}))
    raws = artifacts.read_table(storage, diffs, "diffs", columns=["raw"])["raw"].to_pylist()
    table = artifacts.read_table(storage, rejects, "rejects", columns=["raw", "reason"])
    skipped: collections.Counter = collections.Counter()
    for raw, reason in zip(table["raw"].to_pylist(), table["reason"].to_pylist()):
        if reason in REASONS:
            raws.append(raw)
        else:
            skipped[reason] += 1
    return raws, dict(skipped)


def read_jsonl(path: str) -> list[str]:
    """Raw outputs from a .jsonl file: each line a JSON string or an object with a ``raw`` field."""
    raws = []
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            value = json.loads(line)
            if isinstance(value, dict):
                value = value.get("raw")
            if not isinstance(value, str):
                raise ValueError(f"{path}:{k}: expected a JSON string or an object with a string 'raw'")
            raws.append(value)
    return raws


def tiny_llm_outputs(n: int, max_tokens: int, seed: int) -> list[str]:
    """Raw outputs of the transformers engine on a tiny random Llama, for ``n`` pairs of synthetic captions."""
    import numpy as np

    from pcd_ray.config import GenerateConfig
    from pcd_ray.generate.actor import GenerateActor

    spec = importlib.util.spec_from_file_location("tiny_llm", REPO / "tests" / "generate" / "tiny_llm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        model = str(mod.write_tiny_llm(Path(d) / "tiny", seed=seed))
        cfg = GenerateConfig.model_validate(
            {
                "engine": "transformers",
                "llm": {"model": model},
                "batch_size": 32,
                "seed": seed,
                "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": max_tokens},
            }
        )
        actor = GenerateActor(cfg)
        col = lambda v: np.array(v, dtype=object)  # noqa: E731
        raws: list[str] = []
        for start in range(0, n, cfg.batch_size):
            k = min(cfg.batch_size, n - start)
            caps = [
                (
                    f"a {rng.choice(_ADJS)} {rng.choice(_SUBJECTS)} {rng.choice(_PLACES)}",
                    f"a {rng.choice(_ADJS)} {rng.choice(_SUBJECTS)} {rng.choice(_PLACES)}",
                )
                for _ in range(k)
            ]
            out = actor.run(
                {
                    "pair_id": col([f"p-{start + i}" for i in range(k)]),
                    "caption_a": col([a for a, _ in caps]),
                    "caption_b": col([b for _, b in caps]),
                }
            )
            raws += out["raw"].to_pylist()
    return raws


def compare(raws: list[str], defects: list[list[str]] | None = None, examples: int = 3) -> dict:
    """Both filters on every raw output: counts per reason, disagreements, and per injected defect if given."""
    results = {m: [FILTERS[m](r) for r in raws] for m in MODES}
    n = len(raws)
    out: dict = {"outputs": n, "modes": {}}
    for m in MODES:
        by = collections.Counter(r.reason for r in results[m] if not r.kept)
        out["modes"][m] = {
            "kept": n - sum(by.values()),
            "rejected": sum(by.values()),
            "reject_rate": round(sum(by.values()) / n, 4) if n else None,
            "by_reason": {k: by[k] for k in REASONS if by[k]},
        }
    cells: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for i, (s, p) in enumerate(zip(results["strict"], results["paper"])):
        if s.kept and p.kept:
            if s.text != p.text:
                cells[GROUPS[0], ""].append(i)
        elif s.kept or p.kept:
            (cells[GROUPS[1], s.reason] if p.kept else cells[GROUPS[2], p.reason]).append(i)
        elif s.reason != p.reason:
            cells[GROUPS[3], f"strict {s.reason}, paper {p.reason}"].append(i)
    out["disagreements"] = {
        group: {
            detail or "all": {
                "n": len(idx),
                "examples": [
                    {
                        "raw": raws[i],
                        "strict": results["strict"][i].reason or results["strict"][i].text,
                        "paper": results["paper"][i].reason or results["paper"][i].text,
                    }
                    for i in idx[:examples]
                ],
            }
            for (g, detail), idx in sorted(cells.items(), key=lambda kv: -len(kv[1]))
            if g == group
        }
        for group in GROUPS
    }
    if defects is not None:
        # Outputs with exactly one injected defect (or none): what each filter does with that defect alone.
        per: dict[str, dict[str, int]] = {}
        for i, names in enumerate(defects):
            if len(names) <= 1:
                d = per.setdefault(
                    names[0] if names else "none", {"n": 0, "strict_drops": 0, "paper_drops": 0, "texts_differ": 0}
                )
                d["n"] += 1
                d["strict_drops"] += not results["strict"][i].kept
                d["paper_drops"] += not results["paper"][i].kept
                d["texts_differ"] += (
                    results["strict"][i].kept
                    and results["paper"][i].kept
                    and (results["strict"][i].text != results["paper"][i].text)
                )
        out["by_defect"] = per
    return out


def _pct(k: int, n: int) -> str:
    return f"{k:6d} {100 * k / n:6.2f}%" if n else f"{k:6d}"


def report(res: dict) -> str:
    """The comparison as plain-text tables (the docs quote them)."""
    n, s, p = res["outputs"], res["modes"]["strict"], res["modes"]["paper"]
    lines = [f"{n} outputs", f"{'reason':<18} {'strict':>14} {'paper':>14}"]
    for reason in REASONS:
        a, b = s["by_reason"].get(reason, 0), p["by_reason"].get(reason, 0)
        if a or b:
            lines.append(f"{reason:<18} {_pct(a, n):>14} {_pct(b, n):>14}")
    lines.append(f"{'rejected':<18} {_pct(s['rejected'], n):>14} {_pct(p['rejected'], n):>14}")
    lines.append(f"{'kept':<18} {_pct(s['kept'], n):>14} {_pct(p['kept'], n):>14}")
    if "by_defect" in res:
        lines += [
            "",
            "outputs with one injected defect (or none):",
            f"{'defect':<20} {'n':>6} {'strict drops':>13} {'paper drops':>12} {'kept, texts differ':>19}",
        ]
        for name, d in sorted(res["by_defect"].items(), key=lambda kv: -kv[1]["n"]):
            lines.append(
                f"{name:<20} {d['n']:>6} {100 * d['strict_drops'] / d['n']:>12.1f}% "
                f"{100 * d['paper_drops'] / d['n']:>11.1f}% {100 * d['texts_differ'] / d['n']:>18.1f}%"
            )
    lines += ["", "disagreements:"]
    for group, cells in res["disagreements"].items():
        total = sum(d["n"] for d in cells.values())
        # The reason pairs of "both drop" are many and small: the JSON has them.
        detail = "" if group == GROUPS[3] else ", ".join(f"{k} {d['n']}" for k, d in cells.items() if k != "all")
        lines.append(f"  {group}: {_pct(total, n).strip()}" + (f" ({detail})" if detail else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", type=int, metavar="N", help="N outputs of the seeded synthetic corpus")
    src.add_argument("--tiny-llm", type=int, metavar="N", help="N outputs of the transformers engine, tiny Llama")
    src.add_argument("--jsonl", help="a .jsonl of raw outputs")
    src.add_argument("--diffs", help="a generate run's diffs artifact (with --rejects)")
    ap.add_argument("--rejects", help="the same run's rejects artifact")
    ap.add_argument("--storage-root", help="storage.root the artifact URIs are relative to")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=48, help="--tiny-llm: tokens per output")
    ap.add_argument("--examples", type=int, default=3, help="examples kept per kind of disagreement")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if (args.diffs is None) != (args.rejects is None):
        ap.error("--diffs and --rejects go together")

    start, defects, not_filtered = time.time(), None, None
    if args.synthetic is not None:
        corpus = synthetic_corpus(args.synthetic, args.seed)
        raws, defects = [r for r, _ in corpus], [d for _, d in corpus]
        source = {
            "kind": "synthetic",
            "n": args.synthetic,
            "seed": args.seed,
            "defects": [{"name": a, "p": p, "what": w} for a, p, w in DEFECTS],
        }
    elif args.tiny_llm is not None:
        raws = tiny_llm_outputs(args.tiny_llm, args.max_tokens, args.seed)
        source = {
            "kind": "tiny-llm",
            "n": args.tiny_llm,
            "seed": args.seed,
            "max_tokens": args.max_tokens,
            "engine": "transformers",
            "model": "tests/generate/tiny_llm.py (random weights)",
        }
    elif args.jsonl:
        raws, source = read_jsonl(args.jsonl), {"kind": "jsonl", "path": args.jsonl}
    else:
        raws, not_filtered = read_artifacts(args.diffs, args.rejects, args.storage_root)
        source = {"kind": "artifacts", "diffs": args.diffs, "rejects": args.rejects}
    res = {"source": source, **compare(raws, defects, args.examples), "wall_s": round(time.time() - start, 2)}
    if not_filtered is not None:
        res["not_filtered"] = not_filtered
    print(report(res))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"written to {args.out}")
    return res


if __name__ == "__main__":
    main()
