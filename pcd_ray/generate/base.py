"""What every engine of the generate stage shares: the ``Engine`` protocol, its outputs and the per-pair seeds.

An engine turns a batch of pairs into one raw text per row; it knows nothing about filtering, actors or artifacts.
``rule.py`` holds the rule engine, ``llm.py`` the LLM engines (transformers, vLLM), ``actor.py`` the Ray Data actor
that runs one over batches and the registry that builds one by name, ``job.py`` the stage.

Nothing here or in the engine modules imports torch, torchvision or open_clip at module level: LLM engines run in a
venv with their own torch, and import their libraries inside their constructors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np


class Generated(NamedTuple):
    """One engine output with the number of tokens generated for it (for tokens/s in the stage summary)."""

    text: str
    tokens: int


class RowReject(NamedTuple):
    """A row the engine cannot use (its prompt does not fit the model, or cannot be encoded): a property of the row,
    so the row is rejected with ``reason`` and the batch goes on. Never used for a fault of the engine itself."""

    reason: str


Output = str | Generated | RowReject
"""One row's result: a text (rule engine), a text with its token count (LLM engines), or a row reject."""


@runtime_checkable
class Engine(Protocol):
    """Writes one raw difference text per pair.

    ``requires`` names batch columns that must be non-null in a row for the engine to use it; the actor rejects
    rows missing one (reason ``no_<column without _a/_b>``, e.g. ``no_attributes``) without calling the engine.
    ``generate`` receives a batch of numpy arrays [n] holding at least pair_id, caption_a, caption_b and prompt
    (the user message of the configured prompt version; chat templates are the engine's business), plus
    attributes_a/attributes_b when the pairs have them, and returns n outputs: "" (or None) where it has nothing,
    a ``RowReject`` for a row it cannot take.

    Two kinds of failure, two fates: a ``RowReject`` is committed as that row's reject; an exception is a fault of
    the engine (a CUDA error, an out-of-memory, a dead engine process), never committed as a reject: the actor
    retries the batch, calling ``recover`` first when the engine has one, and past its budget restarts the actor.

    Optional:
      - ``async agenerate(batch)``: the same contract, for engines that keep the requests of several batches in
        flight at once (vLLM's continuous batching); the actor then runs up to ``generate.batches_in_flight``
        batches concurrently instead of one at a time.
      - ``recover(error)``: make the engine usable again after a fault (rebuild a dead engine); raising means it
        cannot, and the actor's process is replaced.
    """

    name: str
    requires: tuple[str, ...]

    def generate(self, batch: dict[str, np.ndarray]) -> Sequence[Output | None]: ...


def pair_seed(seed: int, pair_id: str) -> list[int]:
    """Seed material for one pair: the engine seed plus 64 bits of sha1(pair_id), independent of batching."""
    return [seed, int.from_bytes(hashlib.sha1(pair_id.encode()).digest()[:8], "big")]


def request_seed(seed: int, pair_id: str) -> int:
    """A 32-bit seed for one pair's request: stable per (seed, pair id), independent of batching."""
    return int(np.random.SeedSequence(pair_seed(seed, pair_id)).generate_state(1)[0])


def batch_seed(seed: int, pair_ids: Sequence[str]) -> int:
    """A 32-bit seed for a whole batch (engines without per-request seeds): the same batch samples the same text."""
    entropy = [seed] + [pair_seed(seed, p)[1] for p in pair_ids]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])
