"""select_trainable / image_tower_frozen on a real open_clip model (pcd-micro, random init)."""

from __future__ import annotations

import pytest

from pcd_ray.config import ModelSpec
from pcd_ray.model.trainable import MODES, image_tower_frozen, select_trainable

TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


@pytest.fixture(scope="module")
def model():
    from pcd_ray.model.factory import load_model

    return load_model(ModelSpec(name="pcd-micro")).model


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _all(model) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def test_text_transformer_is_the_paper_setting(model):
    names = select_trainable(model, "text_transformer")
    assert set(names) == _trainable(model)
    assert names and all(n.startswith("transformer.resblocks.") for n in names)
    # Every block parameter trains, nothing else does.
    assert set(names) == {n for n in _all(model) if n.startswith("transformer.")}
    for frozen in (
        "token_embedding.weight",
        "positional_embedding",
        "ln_final.weight",
        "ln_final.bias",
        "text_projection",
        "logit_scale",
    ):
        assert frozen in _all(model) and frozen not in names
    assert not any(n.startswith("visual.") for n in names)
    assert image_tower_frozen(model)


def test_text_is_the_whole_text_tower(model):
    names = set(select_trainable(model, "text"))
    assert names == _trainable(model)
    assert names == {n for n in _all(model) if n.startswith(TEXT_PREFIXES)}
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"} <= names
    assert "logit_scale" not in names
    assert not any(n.startswith("visual.") for n in names)
    assert image_tower_frozen(model)


def test_full_trains_everything(model):
    select_trainable(model, "text_transformer")  # start from a frozen state: full must unfreeze, not just keep
    names = select_trainable(model, "full")
    assert set(names) == _all(model) == _trainable(model)
    assert "logit_scale" in names and any(n.startswith("visual.") for n in names)
    assert not image_tower_frozen(model)


def test_partition_covers_every_parameter(model):
    """The name prefixes used above account for every parameter: a new open_clip part would show up here."""
    rest = {n for n in _all(model) if not n.startswith(TEXT_PREFIXES + ("visual.",))}
    assert rest == {"logit_scale"}


def test_modes_are_the_config_choices():
    from typing import get_args

    from pcd_ray.config import TrainConfig

    assert set(MODES) == set(get_args(TrainConfig.model_fields["trainable"].annotation))


def test_unknown_mode_raises_and_leaves_model_alone(model):
    select_trainable(model, "text")
    before = _trainable(model)
    with pytest.raises(ValueError, match="text_transformer.*text.*full"):
        select_trainable(model, "vision")
    assert _trainable(model) == before


def test_image_tower_frozen_tracks_single_parameter(model):
    select_trainable(model, "text_transformer")
    assert image_tower_frozen(model)
    next(model.visual.parameters()).requires_grad_(True)
    assert not image_tower_frozen(model)
    select_trainable(model, "text_transformer")
    assert image_tower_frozen(model)


def test_non_clip_model_raises_type_error():
    import torch.nn as nn

    with pytest.raises(TypeError, match="not an open_clip"):
        select_trainable(nn.Linear(2, 2), "text")


def test_custom_text_clip_uses_its_text_tower():
    """CustomTextCLIP keeps the text tower under model.text; the same modes select the same parts there."""
    from open_clip.model import CustomTextCLIP

    from pcd_ray.model.factory import load_model

    cfg = load_model(ModelSpec(name="pcd-micro")).model_cfg
    model = CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    blocks = set(select_trainable(model, "text_transformer"))
    assert blocks == {n for n, _ in model.named_parameters() if n.startswith("text.transformer.")}
    assert image_tower_frozen(model)
    tower = set(select_trainable(model, "text"))
    assert tower == {n for n, _ in model.named_parameters() if n.startswith("text.")} and blocks < tower
    assert "logit_scale" not in tower and image_tower_frozen(model)


def test_a_frozen_conv_tower_keeps_its_batchnorm_statistics_while_the_text_tower_trains():
    """pcd-tiny's image tower is a small ModifiedResNet: frozen must also mean BatchNorm stays in eval mode."""
    import torch

    from pcd_ray.model.factory import load_model
    from pcd_ray.model.pair_encoder import PairEncoder

    model = load_model(ModelSpec(name="pcd-tiny")).model
    select_trainable(model, "text")
    encoder = PairEncoder(model, image_frozen=image_tower_frozen(model)).train()
    bn = next(m for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    tokens = torch.randint(1, 100, (2, model.context_length))
    encoder({"image_a": torch.randn(2, 3, 64, 64), "caption_tokens": tokens})
    assert not model.visual.training and model.transformer.training
    assert torch.equal(bn.running_mean, before)
