"""LLM engines of the generate stage: ``TransformersEngine`` (any causal LM, CPU or GPU) and ``VLLMEngine``.

Both implement ``base.Engine``: a batch's ``prompt`` column (the user message of the configured prompt version)
is wrapped in the tokenizer's chat template per ``llm.chat_template``, encoded, and sampled with ``cfg.sampling``;
each row's output is a ``Generated(text, tokens)`` or an ``EngineRowError`` that rejects only that row.

torch, transformers and vllm are imported inside the constructors (``actor.py`` imports this module in every generate
actor, the rule engine's included). See docs/GENERATION.md.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any, Callable

import numpy as np

from pcd_ray.config import GenerateConfig
from pcd_ray.generate.base import EngineRowError, Generated, batch_seed, request_seed
from pcd_ray.generate.prompts import chat_prompt, uses_chat_template

log = logging.getLogger(__name__)

Output = Generated | EngineRowError


class _LLMEngine:
    """What both engines share: prompt rendering and encoding, seeds, and per-row error isolation."""

    requires = ("caption_a", "caption_b")

    def __init__(self, cfg: GenerateConfig):
        self.cfg = cfg
        self.seed = cfg.sampling.seed if cfg.sampling.seed is not None else cfg.seed
        self.tokenizer: Any = None
        self.templated = False

    def _use_tokenizer(self, tokenizer: Any) -> None:
        """Adopt the model's tokenizer; decides once whether prompts go through its chat template."""
        self.tokenizer = tokenizer
        self.templated = uses_chat_template(tokenizer, self.cfg.llm.chat_template, self.cfg.llm.system_prompt)

    def render(self, prompt: str) -> str:
        """The text the model sees for one user prompt."""
        return chat_prompt(self.tokenizer, prompt, self.cfg.llm.system_prompt) if self.templated else prompt

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one rendered prompt. A chat template writes its own special tokens (BOS included), so the
        tokenizer adds none then; a raw prompt gets the tokenizer's usual ones."""
        return list(self.tokenizer(self.render(prompt), add_special_tokens=not self.templated)["input_ids"])

    def generate(self, batch: dict[str, np.ndarray]) -> list[Output]:
        """One output per row of ``batch`` (needs pair_id and prompt): rows that cannot be encoded or that
        ``check_prompt`` refuses become ``EngineRowError`` without reaching the model."""
        pair_ids = [str(p) for p in batch["pair_id"].tolist()]
        rows: list[Output | None] = [None] * len(pair_ids)
        encoded: dict[int, list[int]] = {}
        for k, prompt in enumerate(batch["prompt"].tolist()):
            try:
                ids = self.encode(prompt)
            except Exception as e:  # a prompt the tokenizer or template cannot take is that row's problem only
                log.warning("%s engine: cannot encode pair %s: %s: %s", self.name, pair_ids[k], type(e).__name__, e)
                rows[k] = EngineRowError(f"encode: {type(e).__name__}")
                continue
            rows[k] = self.check_prompt(ids)
            if rows[k] is None:
                encoded[k] = ids
        if encoded:
            outs = self.generate_isolated([pair_ids[k] for k in encoded], list(encoded.values()))
            for k, out in zip(encoded, outs):
                rows[k] = out
        return rows  # type: ignore[return-value]

    def check_prompt(self, ids: list[int]) -> EngineRowError | None:
        """A reason to reject a prompt before generating, or None. Default: none (the engine validates)."""
        return None

    fatal_errors: tuple[type[BaseException], ...] = ()
    """Errors that mean the engine itself is gone, not one row: never isolated per row."""

    def generate_isolated(self, pair_ids: list[str], prompts: list[list[int]]) -> list[Output]:
        """Generate for all rows at once; if that raises, row by row, so only the failing rows are rejected.

        Exceptions in ``fatal_errors`` (a dead engine) are not isolated: they propagate to the caller.
        """
        try:
            return self.generate_ids(pair_ids, prompts)
        except self.fatal_errors:
            raise
        except Exception as e:
            if len(prompts) == 1:
                log.warning("%s engine: pair %s failed: %s: %s", self.name, pair_ids[0], type(e).__name__, e)
                return [EngineRowError(type(e).__name__)]
            log.warning("%s engine: a batch of %d failed (%s: %s); retrying row by row", self.name, len(prompts),
                        type(e).__name__, e)
            return [self.generate_isolated([p], [ids])[0] for p, ids in zip(pair_ids, prompts)]

    def generate_ids(self, pair_ids: list[str], prompts: list[list[int]]) -> list[Output]:
        raise NotImplementedError


class TransformersEngine(_LLMEngine):
    """Any causal LM through ``transformers``: batched ``generate`` with left padding, on cuda when available.

    Sampling is seeded per batch (``batch_seed``): transformers has no per-request seeds, so the same pairs in the
    same batch give the same text, and greedy decoding (temperature 0) is deterministic whatever the batching
    (up to the floating-point effects of padding). Prompts longer than the model's context are rejected per row
    (``prompt_too_long``).
    """

    name = "transformers"

    def __init__(self, cfg: GenerateConfig):
        super().__init__(cfg)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        llm = cfg.llm
        common = {"revision": llm.revision, "trust_remote_code": llm.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(llm.tokenizer or llm.model, **common)
        tokenizer.padding_side = "left"  # generated tokens must follow every prompt directly
        if tokenizer.pad_token is None:
            # Padding only fills the left of shorter prompts and is masked out: any existing token will do.
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        self._use_tokenizer(tokenizer)
        dtype = llm.dtype if llm.dtype == "auto" else getattr(torch, llm.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(llm.model, dtype=dtype, **common, **llm.engine_kwargs)
        if "device_map" not in llm.engine_kwargs:  # accelerate has placed the model itself otherwise
            self.model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.model.eval()
        self.torch = torch
        self.max_len = llm.max_model_len or getattr(self.model.config, "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        log.info("transformers engine: %s on %s (%s), chat template %s", llm.model, self.model.device,
                 self.model.dtype, "on" if self.templated else "off")

    def check_prompt(self, ids: list[int]) -> EngineRowError | None:
        if self.max_len is not None and len(ids) >= self.max_len:
            log.warning("transformers engine: prompt of %d tokens >= context of %d", len(ids), self.max_len)
            return EngineRowError("prompt_too_long")
        return None

    def _sampling_kwargs(self) -> dict[str, Any]:
        s = self.cfg.sampling
        if s.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        # top_k=0 switches top-k off, where leaving it out would apply the model's generation_config default (50).
        return {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k or 0}

    def generate_ids(self, pair_ids: list[str], prompts: list[list[int]]) -> list[Output]:
        torch = self.torch
        enc = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(self.model.device)
        width = enc["input_ids"].shape[1]
        max_new = self.cfg.sampling.max_tokens
        if self.max_len is not None:
            max_new = max(1, min(max_new, self.max_len - width))
        # fork_rng: seeding must not disturb the caller's global RNG (the actor's, or a test's).
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(batch_seed(self.seed, pair_ids))
            out = self.model.generate(**enc, max_new_tokens=max_new, pad_token_id=self.tokenizer.pad_token_id,
                                      repetition_penalty=self.cfg.sampling.repetition_penalty,
                                      **self._sampling_kwargs())
        return [self._decode(row[width:].tolist()) for row in out]

    def _decode(self, new: list[int]) -> Generated:
        """Text of the tokens up to the first end-of-sequence (padding after it is not generated text)."""
        n = next((i + 1 for i, t in enumerate(new) if t in self.eos_ids), len(new))
        return Generated(self.tokenizer.decode(new[:n], skip_special_tokens=True), n)


def _engine_dead_errors() -> tuple[type[BaseException], ...]:
    """vLLM's "engine process died" exception(s); the module moved between versions, hence the fallbacks."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:
        return ()
    return (EngineDeadError,)


class VLLMEngine(_LLMEngine):
    """vLLM: the whole batch goes to one ``LLM.generate`` call, which batches continuously; per-request
    ``SamplingParams`` carry a seed per pair (``request_seed``), so a pair's text does not depend on its batch.

    Rows vLLM refuses (e.g. a prompt longer than ``max_model_len``) are isolated by retrying row by row. If the
    engine process dies (``EngineDeadError``) the engine is rebuilt once and the batch retried; a second death in
    the same batch propagates, and the actor rejects that batch.
    """

    name = "vllm"

    def __init__(self, cfg: GenerateConfig):
        super().__init__(cfg)
        # CPU only: run vLLM's engine core in this (actor) process. Its default spawns an EngineCore and a worker
        # process, which works in a Ray actor too but pins the worker's OpenMP threads to cores of its own choosing
        # (core 0 on a 2-core node, whatever Ray gave the actor, so two actors share a core), runs outside the
        # actor's CPU accounting, and started slower here (158 s against 119 s on the busy 2-core test machine).
        # GPU nodes keep vLLM's default: there the separate process overlaps scheduling with the forward pass.
        if not _has_cuda():
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.SamplingParams, self.TokensPrompt = SamplingParams, TokensPrompt
        self.fatal_errors = _engine_dead_errors()
        self._build()

    def _build(self) -> None:
        from vllm import LLM

        llm = self.cfg.llm
        self.llm = LLM(model=llm.model, tokenizer=llm.tokenizer or llm.model, revision=llm.revision, dtype=llm.dtype,
                       tensor_parallel_size=llm.tensor_parallel_size, max_model_len=llm.max_model_len,
                       gpu_memory_utilization=llm.gpu_memory_utilization, seed=self.seed,
                       trust_remote_code=llm.trust_remote_code, **llm.engine_kwargs)
        self._use_tokenizer(self.llm.get_tokenizer())
        log.info("vllm engine: %s, tensor parallel %d, chat template %s", llm.model, llm.tensor_parallel_size,
                 "on" if self.templated else "off")

    def _params(self, pair_id: str):
        s = self.cfg.sampling
        greedy = s.temperature == 0
        return self.SamplingParams(
            n=1, temperature=s.temperature, top_p=1.0 if greedy else s.top_p, top_k=0 if greedy else (s.top_k or 0),
            max_tokens=s.max_tokens, repetition_penalty=s.repetition_penalty, seed=request_seed(self.seed, pair_id))

    def generate_ids(self, pair_ids: list[str], prompts: list[list[int]]) -> list[Output]:
        outs = self.llm.generate([self.TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                                 sampling_params=[self._params(p) for p in pair_ids], use_tqdm=False)
        return [Generated(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outs]

    def generate(self, batch: dict[str, np.ndarray]) -> list[Output]:
        return _retry_once(lambda: super(VLLMEngine, self).generate(batch), self.fatal_errors, self._rebuild)

    def _rebuild(self, error: BaseException) -> None:
        log.error("vllm engine died (%s: %s); rebuilding it and retrying the batch", type(error).__name__, error)
        self.llm = None
        gc.collect()
        self._build()


def _retry_once(fn: Callable[[], Any], errors: tuple[type[BaseException], ...],
                recover: Callable[[BaseException], None]) -> Any:
    """``fn()``; on one of ``errors``, ``recover(error)`` and ``fn()`` once more (a second error propagates)."""
    if not errors:
        return fn()
    try:
        return fn()
    except errors as e:
        recover(e)
    return fn()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
