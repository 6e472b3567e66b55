"""The transformers engine on a tiny random Llama: prompts, chat templates, sampling, row errors, the Ray job.

The vLLM engine runs for real in its own venv (scripts/test-vllm, tests/generate/test_vllm_engine.py).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers", reason="the transformers engine needs transformers (a main dependency)")

from pcd_ray import artifacts  # noqa: E402
from pcd_ray.config import GenerateConfig, JobConfig  # noqa: E402
from pcd_ray.generate.actor import (  # noqa: E402
    ENGINES,
    EngineFailure,  # noqa: E402
    GenerateActor,
    make_engine,
)
from pcd_ray.generate.base import Generated, RowReject, batch_seed, request_seed  # noqa: E402
from pcd_ray.generate.filter import REASONS  # noqa: E402
from pcd_ray.generate.llm import TransformersEngine  # noqa: E402
from pcd_ray.generate.prompts import build_prompt, chat_prompt, uses_chat_template  # noqa: E402
from pcd_ray.storage import Storage  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_llm import run_ten_pairs, write_tiny_llm  # noqa: E402

LONG = "a large red circle " * 200  # ~800 tokens: longer than the tiny model's 512-token context


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> str:
    return str(write_tiny_llm(tmp_path_factory.mktemp("tiny-chat")))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    return str(write_tiny_llm(tmp_path_factory.mktemp("tiny-base"), chat_template=False))


def _cfg(model: str, **sampling) -> GenerateConfig:
    return GenerateConfig.model_validate(
        {
            "engine": "transformers",
            "llm": {"model": model},
            "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 24, **sampling},
            "seed": 3,
        }
    )


def _batch(n: int, captions: dict[int, str] | None = None) -> dict[str, np.ndarray]:
    """A numpy batch as the actor hands it to an engine (the actor adds ``prompt`` itself; engine-level calls
    get it here)."""
    captions = captions or {}
    col = lambda v: np.array(v, dtype=object)  # noqa: E731
    a = [captions.get(k, f"a small blue dog on the left {k}") for k in range(n)]
    b = [f"a huge red cat near the top {k}" for k in range(n)]
    return {
        "pair_id": col([f"p-{k}" for k in range(n)]),
        "caption_a": col(a),
        "caption_b": col(b),
        "prompt": col([build_prompt("paper-v1", x, y) for x, y in zip(a, b)]),
    }


# ---------------------------------------------------------------------------------------------- no Ray needed
def test_llm_engines_registered_lazily():
    """Both LLM engines are known by name, and naming them imports neither torch nor vllm until one is built."""
    assert {"transformers", "vllm"} <= set(ENGINES)
    code = textwrap.dedent("""
        import sys
        from pcd_ray.generate.actor import ENGINES
        import pcd_ray.generate.llm
        print(sorted(m for m in ("torch", "transformers", "vllm", "torchvision", "open_clip") if m in sys.modules))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_chat_template_modes(tiny_chat, tiny_base):
    from transformers import AutoTokenizer

    chat, base = AutoTokenizer.from_pretrained(tiny_chat), AutoTokenizer.from_pretrained(tiny_base)
    assert uses_chat_template(chat, "auto", None) and not uses_chat_template(base, "auto", None)
    assert uses_chat_template(chat, "always", "Be brief.") and not uses_chat_template(chat, "never", None)
    with pytest.raises(ValueError, match="has no chat template"):
        uses_chat_template(base, "always", None)
    with pytest.raises(ValueError, match="system_prompt is set but no chat template"):
        uses_chat_template(base, "auto", "Be brief.")
    assert chat_prompt(chat, "How do they differ?", "Be brief.") == (
        "<|system|>Be brief.</s><|user|>How do they differ?</s><|assistant|>"
    )


def test_transformers_engine_through_the_actor(tiny_chat):
    cfg = _cfg(tiny_chat, temperature=1.0)
    actor = GenerateActor(cfg)
    assert isinstance(actor.engine, TransformersEngine) and actor.engine.templated
    # The model sees the paper's prompt as the user turn of the chat, ready for the assistant's answer.
    prompt = build_prompt("paper-v1", "a red cat", "a blue dog")
    assert actor.engine.render(prompt) == f"<|user|>{prompt}</s><|assistant|>"
    assert actor.engine.tokenizer.pad_token is not None and actor.engine.tokenizer.padding_side == "left"

    out = actor.run(_batch(6)).to_pylist()
    assert [r["pair_id"] for r in out] == [f"p-{k}" for k in range(6)]
    assert {r["engine"] for r in out} == {"transformers"} and {r["prompt_version"] for r in out} == {"paper-v1"}
    for r in out:
        assert 0 < r["tokens"] <= 24 and r["raw"]
        assert (r["text"] is None) != (r["reason"] is None)
        assert r["reason"] is None or r["reason"] in REASONS
        # Only the new tokens are decoded: no prompt text or template marker leaks into the output.
        assert "visual difference" not in r["raw"] and "<|" not in r["raw"]
    # Sampled random-weight output is word pieces of the (ASCII, markup-free) tokenizer corpus: mostly kept.
    assert sum(r["text"] is not None for r in out) >= 3


@pytest.mark.integration
def test_sampling_is_seeded_and_greedy_is_deterministic(tiny_chat):
    batch = _batch(4)
    sampled = make_engine(_cfg(tiny_chat, temperature=1.0, seed=7))
    first = sampled.generate(batch)
    assert all(isinstance(g, Generated) for g in first)
    assert sampled.generate(batch) == first  # same seed, same batch -> same text
    assert make_engine(_cfg(tiny_chat, temperature=1.0, seed=8)).generate(batch) != first

    greedy = make_engine(_cfg(tiny_chat, temperature=0.0, seed=7))
    once = greedy.generate(batch)
    assert greedy.generate(batch) == once
    assert make_engine(_cfg(tiny_chat, temperature=0.0, seed=99)).generate(batch) == once  # seed unused
    # Greedy text of a pair does not depend on what else is in its batch (left padding is masked out).
    alone = greedy.generate({k: v[1:2] for k, v in batch.items()})
    assert alone[0].text == once[1].text
    assert batch_seed(7, ["p-0"]) != batch_seed(7, ["p-1"]) and request_seed(7, "p-0") == request_seed(7, "p-0")


def test_no_chat_template_and_engine_kwargs(tiny_base, tiny_chat):
    engine = make_engine(_cfg(tiny_base))
    prompt = build_prompt("paper-v1", "a", "b")
    assert not engine.templated and engine.render(prompt) == prompt
    never = make_engine(
        GenerateConfig.model_validate(
            {
                "engine": "transformers",
                "llm": {
                    "model": tiny_chat,
                    "chat_template": "never",
                    "dtype": "bfloat16",
                    "engine_kwargs": {"attn_implementation": "eager"},
                },
            }
        )
    )
    assert not never.templated and str(never.model.dtype) == "torch.bfloat16"
    assert never.model.config._attn_implementation == "eager"


def test_a_row_fault_rejects_its_row_an_engine_fault_rejects_nothing(tiny_chat):
    """A prompt longer than the model's context is rejected alone; an exception from the model is a fault of the
    engine: the batch is tried again, and if every try fails no row is committed as a reject."""
    cfg = _cfg(tiny_chat)
    actor = GenerateActor(cfg.model_copy(update={"faults": cfg.faults.model_copy(update={"backoff_s": 0})}))
    out = actor.run(_batch(3, captions={1: LONG})).to_pylist()
    assert out[1]["reason"] == "prompt_too_long" and out[1]["raw"] == "" and out[1]["tokens"] == 0
    assert all(out[k]["tokens"] > 0 for k in (0, 2))
    assert actor.engine.generate(_batch(2, captions={1: LONG}))[1] == RowReject("prompt_too_long")

    engine = actor.engine
    real, calls = engine.generate_ids, []

    def flaky(pair_ids, prompts):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(pair_ids, prompts)

    engine.generate_ids = flaky
    out = actor.run(_batch(3)).to_pylist()
    assert len(calls) == 2 and all(r["tokens"] > 0 for r in out)

    engine.generate_ids = lambda pair_ids, prompts: (_ for _ in ()).throw(RuntimeError("CUDA error: gone"))
    with pytest.raises(EngineFailure, match="CUDA error: gone"):
        actor.run(_batch(3))


# ------------------------------------------------------------------------------------------------ with Ray
def test_transformers_engine_in_the_ray_job(ray_local, tmp_path, tiny_chat):
    job = JobConfig.model_validate(
        {
            "storage": {"root": str(tmp_path)},
            "generate": {
                "engine": "transformers",
                "llm": {"model": tiny_chat, "system_prompt": "Be brief."},
                "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 24},
                "batch_size": 4,
                "num_actors": 1,
            },
        }
    )
    summary, diffs, reasons = run_ten_pairs(job, LONG, "caption_b")
    kept = diffs["pair_id"].to_pylist()
    storage = Storage(job.storage)
    assert reasons["p-3"] == "no_caption" and reasons["p-5"] == "prompt_too_long"
    assert summary["engine"] == "transformers" and summary["pairs_in"] == 10
    assert kept, "sampled output of the tiny model should pass the filter for some pairs"
    assert set(diffs["engine"].to_pylist()) == {"transformers"}
    assert set(diffs["prompt_version"].to_pylist()) == {"paper-v1"}
    assert all(len(t) >= 60 and "<|" not in t for t in diffs["text"].to_pylist())
    assert artifacts.read_manifest(storage, "diffs", "diffs")["config"]["llm"]["system_prompt"] == "Be brief."
