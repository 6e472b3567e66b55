"""Per-pair difference texts for the ``llm`` difference task (CUB), read straight from the generate stage's output.

A dataset's ``differences`` is either a file of ``image_a, image_b, text`` rows (``class_difference.read_pair_texts``)
or the URI of a committed ``diffs`` artifact. Diffs rows carry only ``pair_id`` and ``text``; the image ids are in the
pairs artifact the diffs were generated from, which the diffs manifest names (its provenance record, else the
generate stage's resume identity, which every diffs manifest has) together with that artifact's commit id. The two
are joined on ``pair_id``, so the texts reach eval without a hand-made file, and the report can name the exact
artifacts they came from.

    texts = load_pair_texts(storage, dcfg.differences, ds)    # a file or an artifact
    texts.rows, texts.skipped, texts.source                     # rows as read_pair_texts returns them

Checks, each a ``DatasetError`` naming the artifact: the diffs artifact is committed and complete (a generate run that
was killed is resumed, not evaluated); the pairs artifact is still the one the diffs were made from (rewritten pairs
mean stale diffs: re-run generate); every diffs row's pair id is in it. Rows whose images are not in the evaluated
split are skipped and counted, exactly as for a file.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pcd_ray.eval.datasets import DatasetError, LabelledSet

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
"""The file formats ``read_pair_texts`` reads; any other ``differences`` value names an artifact."""


class PairTexts(NamedTuple):
    rows: list[tuple[str, str, str]]
    """(image_a, image_b, text), as ``class_difference.read_pair_texts`` returns them."""
    skipped: int
    """Rows whose images are not in the split (or that name one image twice, or have no text)."""
    source: dict[str, Any]
    """What was read, for the report: uri, kind (file or artifact), commit; an artifact adds its pairs artifact
    (uri, commit), rows, engine, model and prompt_version."""


def names_artifact(uri: str) -> bool:
    """Whether a ``differences`` value names an artifact (a directory) rather than a file, by its form alone: what
    the pipeline needs to declare it as an input before anything is read."""
    return not uri.lower().endswith(FILE_SUFFIXES)


def _keep(ds: LabelledSet, rows: list[tuple[str, str, str]]) -> tuple[list[tuple[str, str, str]], int]:
    """The rows whose two images are distinct images of the split and whose text is not empty; (kept, skipped)."""
    known = set(ds.image_ids)
    kept = [r for r in rows if r[0] in known and r[1] in known and r[0] != r[1] and r[2]]
    return kept, len(rows) - len(kept)


def _pairs_input(manifest: dict[str, Any], diffs: str) -> tuple[str, str | None]:
    """(pairs URI, commit id) the diffs were generated from."""
    recorded = (manifest.get("provenance") or {}).get("inputs", {}).get("pairs")
    if recorded and recorded.get("uri"):
        return recorded["uri"], recorded.get("commit")
    identity = manifest.get("identity") or {}
    if identity.get("input"):
        return identity["input"], identity.get("input_attempt")
    raise DatasetError(
        f"{diffs}: the diffs manifest names no pairs artifact (neither provenance nor identity); re-run generate"
    )


def read_diffs_artifact(storage, uri: str, ds: LabelledSet) -> PairTexts:
    """A committed diffs artifact joined to its pairs artifact -> rows of ``ds``'s images, sorted by pair id (shard
    order must not change which pairs a seed draws). DatasetError names the artifact that is missing, incomplete,
    stale or inconsistent."""
    import pyarrow.compute as pc

    from pcd_ray import artifacts

    diffs = storage.resolve(uri)
    try:
        manifest = artifacts.read_manifest(storage, diffs, "diffs")
    except artifacts.ArtifactError as e:
        raise DatasetError(str(e)) from None
    if manifest.get("complete") is False:
        raise DatasetError(
            f"{diffs}: the diffs artifact is incomplete (its generate run stopped before the end); "
            f"re-run generate to finish it"
        )
    pairs_uri, made_from = _pairs_input(manifest, diffs)
    try:
        pairs_now = artifacts.read_manifest(storage, pairs_uri, "pairs").get("attempt")
    except artifacts.ArtifactError as e:
        raise DatasetError(f"{diffs}: its pairs artifact is gone ({e})") from None
    if made_from is not None and pairs_now != made_from:
        raise DatasetError(
            f"{diffs}: generated from {pairs_uri} commit {made_from}, which is now commit {pairs_now}; "
            f"the pairs were sampled again, so re-run generate"
        )
    try:
        texts = artifacts.read_table(storage, diffs, "diffs", columns=["pair_id", "text"])
        pairs = artifacts.read_table(storage, pairs_uri, "pairs", columns=["pair_id", "image_id_a", "image_id_b"])
    except artifacts.ArtifactError as e:
        raise DatasetError(str(e)) from None
    joined = texts.join(pairs, "pair_id", join_type="left outer").sort_by("pair_id")
    orphans = joined.filter(pc.is_null(joined.column("image_id_a")))
    if orphans.num_rows:
        raise DatasetError(
            f"{diffs}: {orphans.num_rows} diffs rows name pairs that {pairs_uri} does not have, e.g. "
            f"{orphans.column('pair_id').to_pylist()[:3]}"
        )
    rows, skipped = _keep(ds, list(zip(*(joined.column(c).to_pylist() for c in ("image_id_a", "image_id_b", "text")))))
    summary, config = manifest.get("summary") or {}, manifest.get("config") or {}
    source = {
        "uri": diffs,
        "kind": "artifact",
        "commit": manifest.get("attempt"),
        "pairs": {"uri": pairs_uri, "commit": pairs_now},
        "rows": int(manifest["num_rows"]),
        "engine": summary.get("engine", config.get("engine")),
        "model": summary.get("model"),
        "prompt_version": summary.get("prompt_version", config.get("prompt_version")),
    }
    return PairTexts(rows, skipped, source)


def read_diff_texts(storage, uri: str, ds: LabelledSet) -> tuple[list[tuple[str, str, str]], int]:
    """``read_pair_texts`` for a diffs artifact: (rows whose images are in the split, rows skipped)."""
    texts = read_diffs_artifact(storage, uri, ds)
    return texts.rows, texts.skipped


def load_pair_texts(storage, uri: str, ds: LabelledSet) -> PairTexts:
    """A dataset's ``differences``, a file or a diffs artifact (``names_artifact``), with what was read."""
    from pcd_ray.eval.class_difference import read_pair_texts
    from pcd_ray.provenance import Ref, commit_id

    if names_artifact(uri):
        return read_diffs_artifact(storage, uri, ds)
    rows, skipped = read_pair_texts(storage, uri, ds)
    return PairTexts(
        rows,
        skipped,
        {"uri": storage.resolve(uri), "kind": "file", "commit": commit_id(storage, Ref("differences", uri, "file"))},
    )
