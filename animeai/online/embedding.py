"""What the online system embeds an image as: the classifier head's input, and the database's search descriptor.

Two embeddings (``OnlineLearningSystem(..., embedding=...)``):

* ``penultimate``: the pooled features the classifier head reads (:meth:`Classifier.embed`). One vector serves
  the head (imprinting, replay) and the database.
* ``multiscale`` (the default for new databases): the head still reads the penultimate features; the database
  indexes a retrieval descriptor made of the final feature map and the outputs of the last two backbone stages,
  each GeM-pooled (generalised mean, p = 3; Radenović et al. 2018), power-normalised (signed square root) and
  L2-normalised, then concatenated (1,792-d for the EfficientNet/MobileNet backbones: 1280 + 320 + 192), and
  averaged with the descriptor of the mirrored image (a character seen from the other side is the same character;
  one forward pass of twice the batch), re-normalised. The
  database keeps each exemplar's penultimate features beside it (``FeatureDB(aux_dim=...)``) for imprinting and
  replay.

Why: average pooling, what a classifier trained on a few characters pools with, blurs the small distinctive parts
(eyes, hair ornaments, emblems) that tell an unseen character apart; GeM leans towards the strongest
activations, the square root damps the few dominant channels, and earlier stages keep detail the last layers
trained away. On holo20 (detector trained on 15 characters, 5 more added from 5 images each, nearest prototype
over 10 draws): new-character top-1 0.677 with the penultimate features, 0.733 GeM, 0.790 GeM + square root,
0.826 for this descriptor (``tests/benchmarks/bench_fewshot_features.py``; 0.806 with the two stages added but
no mirror image, in a one-off analysis); the system's numbers are in the README.

The system's raw feature vector (what :meth:`OnlineLearningSystem.embed` returns and ``identify_features``
takes) is the head features followed by the descriptor; :meth:`Embedder.split` separates them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from animeai.online.errors import OnlineError

EMBEDDINGS = ("penultimate", "multiscale")
DEFAULT_EMBEDDING = "multiscale"
GEM_P = 3.0
STAGES_FROM_END = 2  # backbone stages before the final map that enter the descriptor


def gem(x: torch.Tensor, p: float = GEM_P, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling of ``(n, c, h, w)`` maps over the positions: ``mean(x^p)^(1/p)`` (values clamped
    at ``eps``; p = 1 is average pooling, p -> infinity max pooling)."""
    return x.float().clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def recipe(kind: str, model: nn.Module) -> str:
    """What ``kind`` computes for ``model``, as a string: it enters the database's model hash, so a database built
    by another recipe is refused rather than searched with different vectors."""
    if kind == "penultimate":
        return "penultimate"
    n = len(getattr(model, "blocks", ()))
    return f"multiscale:gem{GEM_P:g}+sqrt+l2:final+stages{list(range(n - STAGES_FROM_END, n))}:flip-mean"


def _power_l2(x: torch.Tensor) -> torch.Tensor:
    x = x.sign() * x.abs().sqrt()
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


class Embedder:
    """Computes ``(n, dim)`` raw features of preprocessed batches for one classifier (see the module docstring)."""

    def __init__(self, clf, kind: str = DEFAULT_EMBEDDING):
        if kind not in EMBEDDINGS:
            raise OnlineError(f"embedding {kind!r}: use one of {', '.join(EMBEDDINGS)}")
        self.clf, self.kind = clf, kind
        self.head_dim = clf.feature_dim
        model = clf.model
        if kind == "multiscale":
            needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")
            if not all(isinstance(getattr(model, a, None), nn.Module) for a in needed):
                raise OnlineError(f"embedding multiscale needs a staged backbone ({', '.join(needed)}); "
                                  f"{clf.meta.get('arch')} is not one: use embedding='penultimate'")
            if len(model.blocks) <= STAGES_FROM_END:
                raise OnlineError(f"embedding multiscale: {clf.meta.get('arch')} has too few stages")
            self.stage_ids = list(range(len(model.blocks) - STAGES_FROM_END, len(model.blocks)))
            with torch.no_grad():  # channel counts, from a tiny forward pass
                probe = torch.zeros(1, 3, 32, 32, device=clf.device)
                widths = [m.shape[1] for m in self._maps(probe)[1]]
            self.db_dim = int(sum(widths))
        else:
            self.stage_ids, self.db_dim = [], self.head_dim
        self.recipe = recipe(kind, model)
        self.dim = self.head_dim + (self.db_dim if kind == "multiscale" else 0)

    def _maps(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(pooled head features, [final map, stage maps ...])."""
        m = self.clf.model
        x = m.bn1(m.conv_stem(batch.to(self.clf.device, memory_format=torch.channels_last)))
        stages = []
        for i, block in enumerate(m.blocks):
            x = block(x)
            if i in self.stage_ids:
                stages.append(x)
        final = m.bn2(m.conv_head(x))
        return m.global_pool(final).flatten(1), [final, *stages[::-1]]

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        if self.kind == "penultimate":
            return self.clf.embed(batch).numpy()
        both = torch.cat([batch, batch.flip(-1)])  # the image and its mirror image in one pass
        head, maps = self._maps(both)
        desc = torch.cat([_power_l2(gem(f)) for f in maps], dim=1)
        n = len(batch)
        desc = desc[:n] + desc[n:]  # the descriptor does not change when the picture is mirrored
        desc = desc / desc.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return torch.cat([head[:n].float(), desc], dim=1).cpu().numpy()

    def split(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(head features, database embedding) of raw features; the same array twice for ``penultimate``."""
        if self.kind == "penultimate":
            return feats, feats
        return feats[:, : self.head_dim], feats[:, self.head_dim:]


class Whitening:
    """Shrunk within-class whitening of the database descriptor: ``normalize((x - mean) @ proj)``.

    Learnt (:func:`learn_whitening`) from labelled exemplars, as retrieval pipelines learn theirs from matching
    pairs (Radenović et al. 2018, "learned whitening"): directions along which pictures of one character vary
    (pose, colouring, framing) are shrunk, directions that set characters apart are stretched. The online system
    learns it from the stored exemplars of the roles the classifier was trained on and scores every role in the
    whitened space."""

    def __init__(self, mean: np.ndarray, proj: np.ndarray):
        self.mean, self.proj = mean.astype(np.float32), proj.astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = (np.asarray(x, np.float32) - self.mean) @ self.proj
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def learn_whitening(groups: list[np.ndarray], shrink: float = 0.5) -> Whitening | None:
    """The whitening of ``groups`` (one ``(n_i, d)`` array of vectors per class, at least 2 classes with at least 2
    vectors): the pooled within-class covariance, shrunk halfway (``shrink``) towards the identity times its mean
    variance (Ledoit-Wolf style: a few hundred vectors do not determine a 1,792-d covariance), to the power -1/2.
    ``None`` when the groups cannot give one (fewer than 2 usable classes, or no variance at all)."""
    groups = [np.asarray(g, np.float64) for g in groups if len(g) >= 2]
    if len(groups) < 2:
        return None
    x = np.concatenate(groups)
    centred = np.concatenate([g - g.mean(axis=0) for g in groups])
    cov = centred.T @ centred / len(centred)
    scale = float(np.trace(cov)) / len(cov)
    if not scale > 1e-12:
        return None
    cov = (1.0 - shrink) * cov + shrink * scale * np.eye(len(cov))
    ev, vecs = np.linalg.eigh(cov)
    proj = (vecs * np.clip(ev, shrink * scale, None) ** -0.5) @ vecs.T
    return Whitening(x.mean(axis=0), proj)
