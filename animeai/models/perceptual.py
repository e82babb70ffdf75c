"""Frozen feature networks for the generator: the perceptual network and the projected discriminator's backbone.

Both take images in the generator's range ``[-1, 1]`` and return a list of feature maps (one per chosen
layer). They are frozen: no parameter requires a gradient, and ``train()`` cannot take them out of eval
mode (batch-norm statistics and dropout stay fixed), so putting a parent module in training mode is safe.

Perceptual networks (``create_perceptual``):

* ``vgg16`` (default): torchvision's ImageNet VGG16, layers relu1_2, relu2_2, relu3_3, relu4_3. Weights from
  the download site (``hub``/``auto``; cached under ``torch.hub.get_dir()``) or a local file
  (``pretrained=PATH``: the torchvision ``vgg16-397923af.pth`` or a ``.safetensors`` of it).
* any registry backbone with EfficientNet/MobileNet-style stages, e.g. ``efficientnet_lite0`` (offline weights
  from its pip package): outputs of stages 1, 2 and 4.

Weights that cannot be had raise :class:`~animeai.weights.WeightsError` saying how to supply them; a frozen
network is never built from random weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from animeai.models.registry import IMAGENET_MEAN, IMAGENET_STD, create_model, get_model_spec, list_models
from animeai.weights import WeightsError, read_state_dict

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision VGG16_Weights.IMAGENET1K_V1
VGG16_LAYERS = (3, 8, 15, 22)  # indices of relu1_2, relu2_2, relu3_3, relu4_3 in torchvision's vgg16().features
PERCEPTUAL_STAGES = (1, 2, 4)  # registry backbones: strides 4, 8, 16


class FrozenModule(nn.Module):
    """A module that stays in eval mode and never requires gradients (gradients still flow to its input)."""

    def freeze(self) -> FrozenModule:
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FrozenModule:  # noqa: ARG002 - always eval, whatever the parent asks
        return super().train(False)


class FrozenBackbone(FrozenModule):
    """Stage outputs of a frozen registry backbone (timm EfficientNet/MobileNet layout: conv_stem, bn1, blocks)."""

    def __init__(self, arch: str = "efficientnet_lite0", pretrained: str = "auto",
                 stages: Sequence[int] = (1, 2, 4, 6)):
        super().__init__()
        spec = get_model_spec(arch)
        net = create_model(arch, num_classes=1, pretrained=pretrained)  # WeightsError if weights cannot be had
        if not (hasattr(net, "conv_stem") and hasattr(net, "bn1") and hasattr(net, "blocks")):
            raise ValueError(f"{arch}: not a staged backbone (needs conv_stem, bn1, blocks)")
        stages = tuple(sorted(set(int(s) for s in stages)))
        if not stages or stages[0] < 0 or stages[-1] >= len(net.blocks):
            raise ValueError(f"{arch}: stages must be in 0..{len(net.blocks) - 1}, got {stages}")
        self.arch, self.stages = arch, stages
        self.pretrained_source = net.animeai_pretrained_source
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = nn.ModuleList(list(net.blocks)[: stages[-1] + 1])
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x + 1) * 0.5 - self.mean) / self.std
        x = self.stem(x)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stages:
                out.append(x)
        return out


def _vgg16_layers(last: int) -> nn.Sequential:
    """torchvision's VGG16 ``features`` (config "D") up to index ``last``, without building the classifier."""
    from torchvision.models.vgg import cfgs, make_layers

    return nn.Sequential(*list(make_layers(cfgs["D"], batch_norm=False))[: last + 1])


def _how_to_supply_vgg16() -> str:
    return (f"Supply the torchvision VGG16 ImageNet weights with --perceptual-pretrained PATH (the file "
            f"{VGG16_URL.rsplit('/', 1)[-1]} from {VGG16_URL}, or a .safetensors of it), or put that file in "
            f"{torch.hub.get_dir()}/checkpoints/, or use the offline perceptual network "
            "--perceptual efficientnet_lite0 (pip package weights).")


def _vgg16_state_dict(pretrained: str) -> tuple[dict[str, torch.Tensor], str]:
    value = str(pretrained).strip()
    low = value.lower()
    if low == "none":
        raise WeightsError("perceptual network vgg16: random weights would measure nothing, so 'none' is refused. "
                           + _how_to_supply_vgg16())
    if low == "package":
        raise WeightsError("perceptual network vgg16 has no offline weights package. " + _how_to_supply_vgg16())
    if low in ("auto", "hub"):
        try:
            sd = torch.hub.load_state_dict_from_url(VGG16_URL, progress=False, check_hash=True, weights_only=True)
        except Exception as exc:  # network down, proxy, bad cache file: one clear error, never random weights
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise WeightsError(f"perceptual network vgg16: could not get its ImageNet weights from {VGG16_URL} "
                               f"({type(exc).__name__}: {reason}). {_how_to_supply_vgg16()}") from None
        return sd, f"hub:{VGG16_URL}"
    return read_state_dict(value), f"file:{value}"


class VGG16Features(FrozenModule):
    """Frozen ImageNet VGG16: relu1_2, relu2_2, relu3_3 and relu4_3 feature maps."""

    def __init__(self, pretrained: str = "auto", layers: Sequence[int] = VGG16_LAYERS):
        super().__init__()
        self.layer_ids = tuple(sorted(layers))
        self.features = _vgg16_layers(self.layer_ids[-1])
        sd, self.pretrained_source = _vgg16_state_dict(pretrained)
        if any(k.startswith("features.") for k in sd):
            sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        target = self.features.state_dict()
        missing = [k for k in target if k not in sd or sd[k].shape != target[k].shape]
        if missing:
            raise WeightsError(f"{self.pretrained_source}: weights do not fit VGG16 ({len(missing)} of {len(target)} "
                               f"tensors missing or of another shape, first: {missing[0]}). {_how_to_supply_vgg16()}")
        self.features.load_state_dict({k: sd[k] for k in target})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x + 1) * 0.5 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.layer_ids:
                out.append(x)
        return out


def perceptual_names() -> list[str]:
    return ["vgg16", *list_models()]


def create_perceptual(name: str = "vgg16", pretrained: str = "auto") -> FrozenModule:
    """The frozen perceptual network ``name`` (``vgg16`` or a registry backbone) with pretrained weights."""
    if name == "vgg16":
        return VGG16Features(pretrained)
    if name not in list_models():
        raise ValueError(f"unknown perceptual network '{name}'; available: {', '.join(perceptual_names())}")
    if str(pretrained).strip().lower() == "none":
        raise WeightsError(f"perceptual network {name}: random weights would measure nothing, so 'none' is refused; "
                           "use auto, package, hub or a weights file")
    return FrozenBackbone(name, pretrained, PERCEPTUAL_STAGES)


def feature_stats(feats: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per layer: the channel mean and standard deviation over the whole batch and all positions, and the
    standard deviation *across the batch* of each image's channel means (None for a batch of one image)."""
    out = []
    for f in feats:
        f = f.float()
        per_image = f.mean(dim=(2, 3))  # (B, C)
        between = per_image.std(dim=0) if f.shape[0] > 1 else None
        out.append((f.mean(dim=(0, 2, 3)), f.std(dim=(0, 2, 3)), between))
    return out


def feature_stat_loss(fake_feats: Sequence[torch.Tensor], real_feats: Sequence[torch.Tensor],
                      eps: float = 1e-6) -> torch.Tensor:
    """Distance between the feature statistics of a generated batch and of a real batch.

    Per layer, three statistics are compared (squared error), each divided by the real batch's mean square of
    that statistic's spread so that every layer and every network weighs the same whatever its activation scale;
    the result is the mean over layers:

    * the channel means and standard deviations over the *batch and all positions* (colour, line and texture
      distribution of the batch as a whole);
    * the standard deviation *across images* of each image's channel means (how much the images differ from
      each other).

    Why statistics of the batch, not pairs of images: a loss between each generated image and a real image (or
    the real images' mean) is smallest for the average image, which pulls every sample towards one blurry mean
    and kills diversity. Batch statistics only ask the generated batch, as a set, to have the distribution of
    the real batch: any diverse set of samples with that distribution scores zero, and the spatial layout (pose,
    framing) is free. Mean and standard deviation per channel (the statistics style transfer matches, as in
    AdaIN) are chosen over Gram matrices: C numbers per layer instead of C^2 (512^2 at relu4_3), stable with
    batches of 8-32 images, and cheap at 224 px.

    Why the across-images term: the first two are also matched by a batch of copies of one image that has the
    real batch's spread *within* it (a holo20 run at 64 px collapsed that way: every sample the same picture,
    recognised 100 % but with a tenth of the real images' diversity). A collapsed batch has zero spread across
    images and pays the full real spread here.
    """
    if len(fake_feats) != len(real_feats) or not fake_feats:
        raise ValueError("fake and real features must come from the same layers")
    total = torch.zeros((), device=fake_feats[0].device)
    for (mf, sf, bf), (mr, sr, br) in zip(feature_stats(fake_feats), feature_stats(real_feats)):
        scale = sr.detach().pow(2).mean() + eps
        total = total + (F.mse_loss(mf, mr) + F.mse_loss(sf, sr)) / scale
        if bf is not None and br is not None:
            total = total + F.mse_loss(bf, br) / (br.detach().pow(2).mean() + eps)
    return total / len(fake_feats)
