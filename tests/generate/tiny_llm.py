"""A tiny randomly initialised Llama and an offline-trained tokenizer, written to a directory like a hub model.

No model hub is reachable in tests, so the LLM engines load this instead: ``write_tiny_llm(path)`` trains a byte-level
BPE tokenizer on synthetic captions and difference sentences, saves it as a ``PreTrainedTokenizerFast`` (with a small
chat template unless ``chat_template=False``, and without a pad token so the engines' fallback runs), and saves a
2-layer ``LlamaForCausalLM`` with ``save_pretrained``. Works in the main venv and in .venv-vllm (torch, transformers and
tokenizers only). Random weights give near-uniform next-token distributions: sampled outputs are strings of word
pieces from the training text, which is what the filter and the bookkeeping need, not sensible sentences.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""Marks each message with its role; the tests look for ``<|user|>`` / ``<|system|>`` in the rendered prompt."""

SPECIAL = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
_KINDS = ["circle", "square", "triangle", "star", "cat", "dog", "bird", "car", "flower", "tree"]
_SIZES = ["large", "small", "tiny", "huge", "medium sized"]
_PLACES = ["on the left", "on the right", "in the middle", "near the top", "at the bottom"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """``n`` synthetic captions, paper prompts and difference sentences (ASCII only, so every token is ASCII)."""
    rng = random.Random(seed)

    def thing() -> str:
        return f"a {rng.choice(_SIZES)} {rng.choice(_COLOURS)} {rng.choice(_KINDS)} {rng.choice(_PLACES)}"

    texts = []
    for k in itertools.count():
        if len(texts) >= n:
            break
        a, b = thing(), thing()
        texts.append(
            [
                f"A photo of {a}.",
                f"What is the visual difference between an image with a description of {a} and an image with a "
                f"description of {b}?",
                f"The first image shows {a}, while the second image shows {b}.",
                f"Compared to the second image, the first one is brighter and the object is {rng.choice(_SIZES)}.",
            ][k % 4]
        )
    return texts


def write_tiny_llm(
    path: str | Path,
    *,
    chat_template: bool = True,
    seed: int = 0,
    vocab_size: int = 600,
    hidden_size: int = 64,
    max_position_embeddings: int = 512,
    eos_fraction: float = 0.0,
) -> Path:
    """Write tokenizer + model files into ``path`` (created) and return it; loadable by Auto* classes and vLLM.

    head_dim is 32 (vLLM's CPU attention needs >= 32): ``hidden_size / 32`` heads.

    ``eos_fraction`` > 0 makes outputs end early at random: the model's generation_config.eos_token_id becomes a
    list of that fraction of the vocabulary (``</s>`` plus ordinary word pieces drawn with ``seed``), and vLLM and
    transformers stop on any of them. With near-uniform sampling each step then stops with about that probability,
    so output lengths spread from a few tokens to max_tokens (mean about 1 / eos_fraction). 0 (the default): only
    ``</s>`` ends an output, which a random model rarely samples, so outputs run to max_tokens.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # An empty initial alphabet keeps the vocabulary to bytes seen in the (ASCII) corpus: a random model cannot emit
    # half a UTF-8 character.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=[], show_progress=False
    )
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=max_position_embeddings,
    )
    if chat_template:
        hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(path)

    heads = hidden_size // 32
    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if eos_fraction > 0:
        model.generation_config.eos_token_id = eos_ids(hf_tok, eos_fraction, seed)
    model.save_pretrained(path)
    return path


def eos_ids(tokenizer, fraction: float, seed: int = 0) -> list[int]:
    """``</s>`` and enough ordinary (non-special) token ids, drawn with ``seed``, to make ``fraction`` of the
    vocabulary (at least ``</s>`` alone)."""
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    ordinary = sorted(set(range(len(tokenizer))) - special)
    n = min(len(ordinary), max(0, round(fraction * len(tokenizer)) - 1))
    return [tokenizer.eos_token_id, *sorted(random.Random(seed).sample(ordinary, n))]


def run_ten_pairs(job, long_caption: str, missing: str):
    """Run the generate job on 10 pairs: pair p-5's caption_a is ``long_caption`` (over the model's context), pair
    p-3 lacks ``missing`` (caption_a or caption_b). Checks every pair lands exactly once in diffs or rejects.

    Returns (summary, diffs table, {rejected pair_id: reason}). Shared by the transformers and vLLM job tests.
    """
    import pyarrow as pa

    from pcd_ray import artifacts
    from pcd_ray.generate.job import run_generate
    from pcd_ray.storage import Storage

    storage = Storage(job.storage)
    rows = [
        {
            "pair_id": f"p-{k}",
            "image_id_a": f"a{k}",
            "image_id_b": f"b{k}",
            "caption_a": long_caption if k == 5 else f"a small blue dog {k}",
            "caption_b": f"a huge red cat {k}",
            "attributes_a": None,
            "attributes_b": None,
        }
        for k in range(10)
    ]
    rows[3][missing] = None  # an LLM engine needs both captions
    artifacts.write_table(pa.Table.from_pylist(rows), storage, "pairs", "pairs")

    summary = run_generate(job, storage)

    diffs = artifacts.read_table(storage, "diffs", "diffs")
    rejects = artifacts.read_table(storage, "rejects", "rejects")
    kept, dropped = diffs["pair_id"].to_pylist(), rejects["pair_id"].to_pylist()
    assert len(kept) + len(dropped) == 10 and set(kept) | set(dropped) == {r["pair_id"] for r in rows}
    assert not set(kept) & set(dropped)
    return summary, diffs, dict(zip(dropped, rejects["reason"].to_pylist()))
