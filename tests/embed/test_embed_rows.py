"""The embed stage's per-block steps without Ray or a model: reject rows carry the embedder's reason codes, and a
block of the wrong embedding width stops the run before it is written."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pcd_ray.embed.job import EMBEDDING_COLUMNS, REJECT_COLUMNS, block_stats, split_rows


def _block() -> pa.Table:
    """What ``embed_images(..., reasons=True)`` yields: two embedded rows, a missing and an oversized image."""
    return pa.table(
        {
            "image_id": ["a", "missing", "b", "huge"],
            "embedding": pa.array([[1.0, 0.0], None, [0.0, 1.0], None], pa.list_(pa.float32())),
            "model": ["m"] * 4,
            "error": [None, "missing image bytes", None, "image is 9000x9000, over the limit of 100 pixels"],
            "reason": [None, "missing_image", None, "image_too_large"],
        }
    )


def test_split_rows_keeps_the_embedded_and_rejects_with_the_code():
    kept, rejected = split_rows(_block())
    assert kept.column_names == EMBEDDING_COLUMNS and kept["image_id"].to_pylist() == ["a", "b"]
    assert rejected.column_names == REJECT_COLUMNS
    assert rejected.to_pylist() == [
        {"image_id": "missing", "source": "embed", "reason": "missing_image", "detail": "missing image bytes"},
        {
            "image_id": "huge",
            "source": "embed",
            "reason": "image_too_large",
            "detail": "image is 9000x9000, over the limit of 100 pixels",
        },
    ]


def test_block_stats_name_the_model_and_refuse_a_wrong_width():
    assert block_stats(_block(), embed_dim=2) == {"model": "m"}
    assert block_stats(_block().slice(1, 1), embed_dim=2) == {"model": ""}  # nothing embedded in the block
    with pytest.raises(RuntimeError, match="wrote 2-wide embeddings, its config says embed_dim=32"):
        block_stats(_block(), embed_dim=32)
