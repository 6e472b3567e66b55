"""Engines that write difference text, and the Ray Data actor that runs one over batches of pairs.

An engine turns a batch of pairs into one raw text per row; it knows nothing about filtering or artifacts. Engines
are chosen by short name from ``ENGINES`` (``GenerateConfig.engine``). The rule engine writes ground-truth sentences
from the synthetic set's attributes; LLM engines (vLLM on GPU, transformers on CPU) implement the same protocol.

This module and everything it imports must stay free of torch, torchvision and open_clip: LLM engines run in a venv
with their own torch, and import their libraries lazily inside their constructors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from pcd_ray.config import GenerateConfig
from pcd_ray.data import attributes as A
from pcd_ray.generate.filter import paper_filter
from pcd_ray.generate.prompts import build_prompt

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0
"""Each actor logs a progress line at most this often (Ray Data's bars are off in non-interactive logs)."""


class Generated(NamedTuple):
    """One engine output with the number of tokens generated for it (for tokens/s in the stage summary)."""

    text: str
    tokens: int


@runtime_checkable
class Engine(Protocol):
    """Writes one raw difference text per pair.

    ``requires`` names batch columns that must be non-null in a row for the engine to use it; the actor rejects
    rows missing one (reason ``no_<column without _a/_b>``, e.g. ``no_attributes``) without calling the engine.
    ``generate`` receives a batch of numpy arrays [n] holding at least pair_id, caption_a, caption_b and prompt
    (the user message of the configured prompt version; chat templates are the engine's business), plus
    attributes_a/attributes_b when the pairs have them, and returns n outputs, each a ``str`` or a ``Generated``
    (LLM engines: text + tokens generated). "" (or None) where it has nothing; an exception raised for a single row
    should be caught by the engine and returned as ``EngineRowError`` so only that row is rejected.
    """

    name: str
    requires: tuple[str, ...]

    def generate(self, batch: dict[str, np.ndarray]) -> list[str]: ...


def pair_seed(seed: int, pair_id: str) -> list[int]:
    """Seed material for one pair: the engine seed plus 64 bits of sha1(pair_id), independent of batching."""
    return [seed, int.from_bytes(hashlib.sha1(pair_id.encode()).digest()[:8], "big")]


class RuleEngine:
    """Ground-truth differences of the synthetic set: ``attributes.difference_sentence`` per pair.

    The wording choice of a pair depends only on (cfg.seed, pair_id), so a pair gets the same text whatever batch
    or actor it lands in. Rows whose attributes are not a JSON object of the synthetic vocabulary get "".
    """

    name = "rule"
    requires = ("attributes_a", "attributes_b")

    def __init__(self, cfg: GenerateConfig):
        self.seed = cfg.seed

    def _one(self, pair_id: str, attrs_a: Any, attrs_b: Any) -> str:
        try:
            a, b = json.loads(attrs_a), json.loads(attrs_b)
            return A.difference_sentence(a, b, np.random.default_rng(pair_seed(self.seed, pair_id)))
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            log.warning("rule engine: pair %s has unusable attributes (%s: %s)", pair_id, type(e).__name__, e)
            return ""

    def generate(self, batch: dict[str, np.ndarray]) -> list[str]:
        return [self._one(str(p), a, b) for p, a, b in
                zip(batch["pair_id"].tolist(), batch["attributes_a"].tolist(), batch["attributes_b"].tolist())]


class EngineRowError(NamedTuple):
    """An engine's per-row failure: that row is rejected with ``engine_error: <reason>``; the batch goes on."""

    reason: str


def _llm_engine(cls_name: str):
    """A builder that imports pcd_ray.generate.llm only when an LLM engine is built (it imports this module)."""
    def build(cfg: GenerateConfig) -> Engine:
        from pcd_ray.generate import llm

        return getattr(llm, cls_name)(cfg)
    build.__qualname__ = build.__name__ = cls_name
    return build


ENGINES: dict[str, Any] = {"rule": RuleEngine, "transformers": _llm_engine("TransformersEngine"),
                           "vllm": _llm_engine("VLLMEngine")}
"""Engine name -> class or builder called with the GenerateConfig."""


def make_engine(cfg: GenerateConfig) -> Engine:
    """Build the engine named by ``cfg.engine``. Raises KeyError listing the known engines."""
    try:
        cls = ENGINES[cfg.engine]
    except KeyError:
        raise KeyError(f"unknown engine {cfg.engine!r}; known: {sorted(ENGINES)}") from None
    return cls(cfg)


class GenerateActor:
    """Ray Data ``map_batches`` callable: a batch of pairs -> pyarrow Table with one output row per pair.

    Output columns: pair_id, raw (engine output, "" if none), text (filtered text, null if rejected), reason (null
    if kept), engine, prompt_version, tokens (generated by an LLM engine; 0 for rule). Every input row yields exactly one output row: a row the engine cannot use is
    rejected with ``no_<column>``, and an exception from the engine rejects that batch's rows with
    ``engine_error: <ExceptionType>`` instead of failing the job.
    """

    def __init__(self, cfg: GenerateConfig | dict, *, in_worker: bool = False):
        """``in_worker``: running as a Ray actor, so set up the worker's logging (never done to a caller's process)."""
        if in_worker:
            from pcd_ray.runtime import quiet_worker_logs

            quiet_worker_logs()
        self.cfg = cfg if isinstance(cfg, GenerateConfig) else GenerateConfig.model_validate(cfg)
        build_prompt(self.cfg.prompt_version, "", "")  # an unknown version fails here, once, not per batch
        self.engine = make_engine(self.cfg)
        self._start = self._last_log = time.time()
        self._done = self._kept = 0

    def _progress(self, n: int, kept: int) -> None:
        self._done, self._kept = self._done + n, self._kept + kept
        now = time.time()
        if now - self._last_log >= PROGRESS_EVERY_S:
            self._last_log = now
            log.info("generate actor: %d pairs (%d kept) in %.0f s, %.1f pairs/s", self._done, self._kept,
                     now - self._start, self._done / (now - self._start))

    def _prompts(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        prompts = [None if a is None or b is None else build_prompt(self.cfg.prompt_version, a, b)
                   for a, b in zip(batch["caption_a"].tolist(), batch["caption_b"].tolist())]
        return np.array(prompts, dtype=object)

    def _run_engine(self, batch: dict[str, np.ndarray], n: int) -> list[tuple[str, int, str | None]]:
        """Per row (raw text, tokens, reject reason or None). An engine exception rejects the whole batch with
        ``engine_error: <type>``; an ``EngineRowError`` output rejects only its row."""
        try:
            outputs = self.engine.generate(batch)
            if len(outputs) != n:
                raise RuntimeError(f"engine {self.engine.name!r} returned {len(outputs)} texts for {n} rows")
        except Exception as e:  # one bad batch must not kill a job of millions of pairs
            log.exception("engine %s failed on a batch of %d pairs", self.engine.name, n)
            return [("", 0, f"engine_error: {type(e).__name__}")] * n
        rows = []
        for out in outputs:
            if isinstance(out, EngineRowError):
                rows.append(("", 0, f"engine_error: {out.reason}"))
            elif isinstance(out, Generated):
                rows.append((out.text or "", int(out.tokens), None))
            else:
                rows.append(("" if out is None else str(out), 0, None))
        return rows

    def _missing_reasons(self, batch: dict[str, np.ndarray], n: int) -> list[str | None]:
        """Per row: "no_<column>" for the first column the engine requires that is null (or absent), else None."""
        reasons: list[str | None] = [None] * n
        for col in self.engine.requires:
            values = batch[col].tolist() if col in batch else [None] * n
            code = "no_" + col.removesuffix("_a").removesuffix("_b")
            reasons = [r if r is not None or v is not None else code for r, v in zip(reasons, values)]
        return reasons

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        n = len(batch["pair_id"])
        batch = dict(batch, prompt=self._prompts(batch))
        reasons = self._missing_reasons(batch, n)
        raw, tokens = [""] * n, [0] * n
        usable = np.array([k for k, r in enumerate(reasons) if r is None], dtype=np.int64)
        if usable.size:
            outputs = self._run_engine({k: v[usable] for k, v in batch.items()}, int(usable.size))
            for k, (t, ntok, error) in zip(usable.tolist(), outputs):
                raw[k], tokens[k], reasons[k] = t, ntok, error
        text: list[str | None] = [None] * n
        for k in range(n):
            if reasons[k] is None:
                result = paper_filter(raw[k])
                text[k], reasons[k] = result.text, result.reason
        self._progress(n, sum(t is not None for t in text))
        return pa.table({
            "pair_id": pa.array([str(p) for p in batch["pair_id"].tolist()], pa.string()),
            "raw": pa.array(raw, pa.string()),
            "text": pa.array(text, pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "engine": pa.array([self.engine.name] * n, pa.string()),
            "prompt_version": pa.array([self.cfg.prompt_version] * n, pa.string()),
            "tokens": pa.array(tokens, pa.int32()),
        })
