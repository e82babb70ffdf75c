"""Metric learning next to the classifier: a cosine-proxy loss on the pooled features.

A classifier trained with plain cross-entropy only needs its features to be linearly separable for the classes it
knows; nothing asks characters it has never seen to land in tight, well-separated directions, which is what the
online system's few-shot enrolment and its cosine database rely on. :class:`CosineProxyLoss` adds that request:
one learned proxy per class and a normalised softmax over cosines with an additive margin, as in NormSoftmax
(Zhai & Wu 2018, "Classification is a strong baseline for deep metric learning") and CosFace (Wang et al. 2018):

    loss = CE(scale * (cos(f, p_y) - margin, cos(f, p_j) for j != y), y)

It is trained beside the classifier head (the detector's ``--metric-weight``), on the same pooled features the
online system stores (:meth:`animeai.inference.Classifier.embed`). The proxies only shape training: they are not
part of the model file, which stays a plain classifier.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CosineProxyLoss(nn.Module):
    """``forward(features (n, dim), labels (n,)) -> scalar loss``; one learned proxy per class."""

    def __init__(self, num_classes: int, dim: int, scale: float = 16.0, margin: float = 0.1):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes} and {dim}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale, self.margin = float(scale), float(margin)
        self.proxies = nn.Parameter(torch.randn(num_classes, dim) / dim ** 0.5)

    def cosines(self, features: torch.Tensor) -> torch.Tensor:
        """``(n, num_classes)`` cosine similarities of features and proxies (float32)."""
        return F.normalize(features.float(), dim=1) @ F.normalize(self.proxies.float(), dim=1).T

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosines(features)
        if self.margin:
            cos = cos - self.margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return F.cross_entropy(self.scale * cos, labels)


class PooledFeatures:
    """Keeps the latest output of a timm model's ``global_pool`` (the pooled, pre-dropout features that
    ``forward_head(pre_logits=True)`` returns in eval mode) while the model runs its normal ``forward``.

    A forward hook rather than a second forward path: a distributed (DDP) wrapper synchronises gradients only for
    what runs inside its own ``forward`` call."""

    def __init__(self, model: nn.Module):
        pool = getattr(model, "global_pool", None)
        if not isinstance(pool, nn.Module):
            raise ValueError(f"{type(model).__name__} has no global_pool module to take the features from")
        self.value: torch.Tensor | None = None
        self._handle = pool.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.value = output.flatten(1)

    def take(self) -> torch.Tensor:
        """The features of the last forward pass (then forgotten, so a stale batch is never used twice)."""
        if self.value is None:
            raise RuntimeError("no pooled features: the model has not run a forward pass since the last take()")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self._handle.remove()
