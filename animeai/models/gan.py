"""Generator and discriminators of the detection-guided generator, with their small registry.

``create_generator(name, **params)`` and ``create_discriminator(name, **params)`` build them by name; the
parameters a generator was built with are stored in its model file so it can be rebuilt for sampling.

Generator (``upsample_cnn``): noise ``z`` and a class label (learned embedding) -> an image in ``[-1, 1]``
(tanh). A linear layer makes an ``s x s`` map (``s`` in 4..7, e.g. 7 for 224 = 7 * 2^5, 4 for 64 = 4 * 2^4);
each block doubles the resolution with nearest-neighbour ``nn.Upsample`` followed by 3x3 convolutions.
Transposed convolutions are not used anywhere: upsample + convolution has no checkerboard artefacts.
Sampling uses an exponential moving average (EMA) of the generator's weights (:func:`make_ema`,
:func:`ema_update`), which gives smoother, more stable samples than the raw weights at any step.

Discriminators, both trained with the hinge loss (:func:`d_hinge_loss`, :func:`g_hinge_loss`) on
differentiably augmented images (:func:`diff_augment`):

* ``plain``: a residual CNN whose every weight is spectrally normalised.
* ``projected`` (Projected GAN, Sauer et al. 2021): a frozen pretrained registry backbone (EfficientNet-Lite0,
  offline package weights) gives features at four scales; each goes through a fixed random 1x1 projection
  and a small trained spectrally normalised head that outputs a map of real/fake logits.

Why this formulation for ~150 images of one character: with so few images a discriminator memorises the
training set within a few hundred steps, its outputs saturate and the generator's gradients vanish or
oscillate. Spectral normalisation bounds the discriminator's Lipschitz constant (no exploding logits, no
extra gradient penalty pass as R1 needs); the hinge loss stops pushing on examples that are already
classified with margin, so the discriminator does not grow ever more confident on the few real images; and
DiffAugment (Zhao et al. 2020: random translation, cutout and colour, applied identically-distributed to real
and generated images in both the D and the G step, and differentiable so the generator learns through it)
multiplies the effective real set without leaking augmentations into the samples. The projected
discriminator adds pretrained features: the trained part is small and the features already separate
textures and shapes, which the paper reports converges many times faster on few-shot sets.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from animeai.models.perceptual import FrozenBackbone

# ----------------------------------------------------------------------------------------------- helpers


def upsample_plan(image_size: int) -> tuple[int, int]:
    """``(start, n)`` with ``image_size == start * 2**n``, ``start`` in 4..7 and ``n >= 1``.

    224 -> (7, 5), 64 -> (4, 4), 128 -> (4, 5), 96 -> (6, 4), 32 -> (4, 3)."""
    size, n = int(image_size), 0
    while size > 7 and size % 2 == 0:
        size //= 2
        n += 1
    if not 4 <= size <= 7 or n < 1:
        raise ValueError(f"image size {image_size} must be s * 2^k with s from 4 to 7 and k >= 1 "
                         "(e.g. 32, 48, 64, 96, 128, 224, 256)")
    return size, n


def _sn_conv(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int | None = None) -> nn.Module:
    return spectral_norm(nn.Conv2d(cin, cout, k, stride, k // 2 if padding is None else padding))


# --------------------------------------------------------------------------------------------- generator


class UpBlock(nn.Module):
    """x2 nearest-neighbour upsampling, then two 3x3 convolutions with batch norm and LeakyReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Generator(nn.Module):
    """Conditional generator: ``forward(z, labels) -> images`` of shape ``(B, 3, image_size, image_size)`` in
    ``[-1, 1]``. Channels halve at each upsampling, from ``min(max_channels, channels * 2**n)`` down to
    ``channels`` at full resolution."""

    def __init__(self, image_size: int = 224, z_dim: int = 128, num_classes: int = 1, embed_dim: int = 64,
                 channels: int = 32, max_channels: int = 512):
        super().__init__()
        if min(z_dim, num_classes, embed_dim, channels, max_channels) < 1:
            raise ValueError("generator sizes must be >= 1")
        start, n = upsample_plan(image_size)
        self.image_size, self.z_dim, self.num_classes, self.start = image_size, z_dim, num_classes, start
        chs = [min(max_channels, channels * 2 ** (n - i)) for i in range(n + 1)]
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.fc = nn.Linear(z_dim + embed_dim, chs[0] * start * start, bias=False)
        self.fc_norm = nn.Sequential(nn.BatchNorm2d(chs[0]), nn.LeakyReLU(0.2))
        self.blocks = nn.Sequential(*[UpBlock(chs[i], chs[i + 1]) for i in range(n)])
        self.to_rgb = nn.Conv2d(chs[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(labels)], dim=1))
        h = self.fc_norm(h.view(z.shape[0], -1, self.start, self.start))
        return torch.tanh(self.to_rgb(self.blocks(h)))


def make_ema(generator: nn.Module) -> nn.Module:
    """A frozen copy of ``generator`` for sampling, kept in eval mode, updated by :func:`ema_update`."""
    ema = copy.deepcopy(generator).requires_grad_(False).eval()
    ema.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, generator: nn.Module, decay: float) -> None:
    """``ema = d * ema + (1 - d) * generator`` for the weights (buffers such as batch-norm statistics are copied).

    The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` over the first updates, so short runs are not
    dominated by the random initial weights."""
    t = int(ema.ema_updates)
    d = min(decay, (1 + t) / (10 + t))
    for pe, p in zip(ema.parameters(), generator.parameters()):
        pe.lerp_(p.detach().to(pe.dtype), 1.0 - d)
    gen_buffers = dict(generator.named_buffers())
    for name, be in ema.named_buffers():
        if name in gen_buffers:
            be.copy_(gen_buffers[name])
    ema.ema_updates += 1


def ema_state_dict(ema: nn.Module) -> dict[str, torch.Tensor]:
    """The EMA generator's weights under the generator's own keys (for the model file)."""
    return {k: v for k, v in ema.state_dict().items() if k != "ema_updates"}


# ------------------------------------------------------------------------------------------ discriminators


class DownBlock(nn.Module):
    """Residual spectrally normalised block that halves the resolution."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(nn.LeakyReLU(0.2), _sn_conv(cin, cout), nn.LeakyReLU(0.2), _sn_conv(cout, cout),
                                  nn.AvgPool2d(2))
        self.skip = nn.Sequential(_sn_conv(cin, cout, 1), nn.AvgPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class Discriminator(nn.Module):
    """Plain discriminator: residual SN-CNN down to the generator's start resolution, sum pooling, SN linear.

    ``forward(images) -> (B, 1)`` real/fake logits."""

    def __init__(self, image_size: int = 224, channels: int = 32, max_channels: int = 512):
        super().__init__()
        _, n = upsample_plan(image_size)
        chs = [min(max_channels, channels * 2 ** i) for i in range(n + 1)]
        self.from_rgb = _sn_conv(3, chs[0])
        self.blocks = nn.Sequential(*[DownBlock(chs[i], chs[i + 1]) for i in range(n)])
        self.final = nn.Sequential(nn.LeakyReLU(0.2), _sn_conv(chs[-1], chs[-1]), nn.LeakyReLU(0.2))
        self.linear = spectral_norm(nn.Linear(chs[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.final(self.blocks(self.from_rgb(x)))
        return self.linear(h.sum(dim=(2, 3)))


def _scale_head(cin: int, channels: int, size: int) -> nn.Sequential:
    """A projected discriminator's per-scale head: SN convs, stride 2 until the map is at most 4x4, 1x1 logits."""
    layers: list[nn.Module] = [_sn_conv(cin, channels), nn.LeakyReLU(0.2)]
    c = channels
    while size > 4:
        nc = min(c * 2, 256)
        layers += [_sn_conv(c, nc, 4, 2, 1), nn.LeakyReLU(0.2)]
        c, size = nc, size // 2
    layers.append(_sn_conv(c, 1, 1))
    return nn.Sequential(*layers)


class ProjectedDiscriminator(nn.Module):
    """Projected discriminator: frozen pretrained multi-scale features -> fixed random 1x1 projections ->
    small trained SN heads. ``forward(images) -> (B, K)``: the logits of every head position, concatenated.

    The backbone (``self.features``) stays frozen and in eval mode; only the heads are trained."""

    def __init__(self, image_size: int = 224, backbone: str = "efficientnet_lite0", pretrained: str = "auto",
                 stages: Sequence[int] = (1, 2, 4, 6), proj_channels: int = 64, channels: int = 64, seed: int = 0):
        super().__init__()
        upsample_plan(image_size)
        self.features = FrozenBackbone(backbone, pretrained, stages)
        with torch.no_grad():
            probe = self.features(torch.zeros(1, 3, image_size, image_size))
        g = torch.Generator().manual_seed(seed)
        self.projections = nn.ModuleList()
        self.heads = nn.ModuleList()
        for f in probe:
            proj = nn.Conv2d(f.shape[1], proj_channels, 1, bias=False)
            with torch.no_grad():  # fixed random projection: spreads each scale's signal over all channels
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * math.sqrt(2.0 / f.shape[1]))
            self.projections.append(proj.requires_grad_(False))
            self.heads.append(_scale_head(proj_channels, channels, f.shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        return torch.cat([head(proj(f)).flatten(1) for f, proj, head in zip(feats, self.projections, self.heads)],
                         dim=1)


# -------------------------------------------------------------------------------------------------- losses


def d_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean()


def g_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.float().mean()


# ---------------------------------------------------------------------------------------------- DiffAugment


def _rand(x: torch.Tensor, *shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.rand(x.shape[0], *shape, device=x.device, dtype=x.dtype, generator=generator)


def _color(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    x = x + (_rand(x, 1, 1, 1, generator=g) - 0.5)  # brightness (the range is [-1, 1])
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x, 1, 1, 1, generator=g) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, 1, 1, 1, generator=g) + 0.5) + mean  # contrast


def _translation(x: torch.Tensor, g: torch.Generator | None, ratio: float = 0.125) -> torch.Tensor:
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = (_rand(x, generator=g) * (2 * sy + 1)).floor() - sy
    tx = (_rand(x, generator=g) * (2 * sx + 1)).floor() - sx
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * tx / w  # whole-pixel shifts, zeros shifted in
    theta[:, 1, 2] = -2 * ty / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _cutout(x: torch.Tensor, g: torch.Generator | None, ratio: float = 0.5) -> torch.Tensor:
    _, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = (_rand(x, generator=g) * (h + 1 - ch % 2)).floor()
    cx = (_rand(x, generator=g) * (w + 1 - cw % 2)).floor()
    ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    inside = ((ys - cy.view(-1, 1, 1)).abs() < ch / 2) & ((xs - cx.view(-1, 1, 1)).abs() < cw / 2)
    return x * (~inside).unsqueeze(1).to(x.dtype)


AUGMENTS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "color": _color, "translation": _translation, "cutout": _cutout,
}


def parse_policy(policy: str) -> tuple[str, ...]:
    """``"color,translation,cutout"`` -> the names; ``""`` or ``"none"`` -> no augmentation."""
    names = tuple(p.strip() for p in str(policy).split(",") if p.strip() and p.strip() != "none")
    unknown = [n for n in names if n not in AUGMENTS]
    if unknown:
        raise ValueError(f"unknown DiffAugment step(s) {', '.join(unknown)}; known: {', '.join(AUGMENTS)}")
    return names


def diff_augment(x: torch.Tensor, policy: str | Sequence[str],
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Differentiable augmentation (DiffAugment, Zhao et al. 2020) of images in ``[-1, 1]``: every step is a
    differentiable function of the pixels, so the generator is trained through it. Each image gets its own
    random parameters."""
    names = parse_policy(policy) if isinstance(policy, str) else tuple(policy)
    for name in names:
        x = AUGMENTS[name](x, generator)
    return x.contiguous()


# ------------------------------------------------------------------------------------------------- registry

GENERATORS: dict[str, type[nn.Module]] = {"upsample_cnn": Generator}
DISCRIMINATORS: dict[str, type[nn.Module]] = {"plain": Discriminator, "projected": ProjectedDiscriminator}


def create_generator(name: str = "upsample_cnn", **params) -> nn.Module:
    """Build the registered generator ``name`` with ``params`` (e.g. image_size, z_dim, num_classes)."""
    try:
        cls = GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown generator '{name}'; available: {', '.join(sorted(GENERATORS))}") from None
    return cls(**params)


def create_discriminator(name: str = "projected", **params) -> nn.Module:
    """Build the registered discriminator ``name`` (``plain`` or ``projected``) with ``params``."""
    try:
        cls = DISCRIMINATORS[name]
    except KeyError:
        raise ValueError(f"unknown discriminator '{name}'; available: {', '.join(sorted(DISCRIMINATORS))}") from None
    return cls(**params)
