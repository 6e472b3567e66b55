"""Which parameters of an open_clip model train (TrainConfig.trainable).

- ``text_transformer``: the paper's setting. Only the text transformer blocks train; token and positional
  embeddings, the final LayerNorm, the text projection, the logit scale/bias and the whole image tower are frozen,
  so image embeddings can be precomputed and the image tower can run under ``torch.no_grad``.
- ``text``: the whole text tower (embeddings, blocks, final LayerNorm, projection); not the logit scale/bias.
- ``full``: every parameter.

Works on open_clip's ``CLIP`` (text tower flattened onto the model: ``token_embedding``, ``transformer``, ...) and on
``CustomTextCLIP`` (text tower under ``model.text``). Parameters are selected by module identity, not by name
matching, so a tower whose submodules happen to share a name prefix cannot leak in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn

MODES = ("text_transformer", "text", "full")

# open_clip.CLIP holds its text tower's parts as attributes of the model itself (model.py, CLIP.__init__).
_CLIP_TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


def _params_of(parts) -> list:
    """Parameters of a mix of modules, bare Parameters and None (open_clip uses all three for text parts)."""
    import torch.nn as nn

    out = []
    for part in parts:
        if isinstance(part, nn.Parameter):
            out.append(part)
        elif isinstance(part, nn.Module):
            out.extend(part.parameters())
    return out


def _text_tower_parts(model: nn.Module) -> list:
    if hasattr(model, "text"):  # CustomTextCLIP
        return [model.text]
    missing = [name for name in _CLIP_TEXT_PARTS if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not an open_clip CLIP/CustomTextCLIP model (lacks {missing})")
    return [getattr(model, name) for name in _CLIP_TEXT_PARTS]


def _text_blocks(model: nn.Module):
    """The text transformer blocks: ``model.transformer`` (CLIP) or ``model.text.transformer`` (CustomTextCLIP)."""
    from open_clip.transformer import TextTransformer

    if hasattr(model, "text"):
        if not isinstance(model.text, TextTransformer):
            # An HF text tower's .transformer is the whole HF model, embeddings included: not "blocks only".
            raise ValueError(
                f"trainable='text_transformer' needs open_clip's TextTransformer text tower, "
                f"got {type(model.text).__name__}; use 'text' or 'full'"
            )
        return model.text.transformer
    _text_tower_parts(model)  # raises TypeError for a non-CLIP model
    return model.transformer


def select_trainable(model: nn.Module, which: str) -> list[str]:
    """Set ``requires_grad`` on every parameter of ``model`` for mode ``which`` (module docstring).

    Returns the names (as in ``model.named_parameters()``, in that order) of the parameters left trainable.
    Raises ValueError for an unknown mode (listing the valid ones) or a mode the model's text tower cannot do,
    TypeError if the model is not an open_clip CLIP / CustomTextCLIP.
    """
    if which not in MODES:
        raise ValueError(f"unknown trainable mode {which!r}; valid: {list(MODES)}")
    if which == "full":
        chosen = None
    elif which == "text":
        chosen = {id(p) for p in _params_of(_text_tower_parts(model))}
    else:
        chosen = {id(p) for p in _params_of([_text_blocks(model)])}
    names = []
    for name, param in model.named_parameters():
        train = chosen is None or id(param) in chosen
        param.requires_grad_(train)
        if train:
            names.append(name)
    return names


def image_tower_frozen(model: nn.Module) -> bool:
    """True when no parameter of ``model.visual`` requires grad: the train loop may then run it under no_grad."""
    return not any(p.requires_grad for p in model.visual.parameters())


def trains_image_tower(which: str) -> bool:
    """Whether a mode trains the image tower (decides, before any model is built, whether image embeddings can be
    computed once up front)."""
    if which not in MODES:
        raise ValueError(f"unknown trainable mode {which!r}; valid: {list(MODES)}")
    return which == "full"
