"""Judge a trained generator by networks it never trained against: ``animeai evaluate-generator``.

    animeai evaluate-generator --model models/generators/akari.pth --data data/all_characters \
        --judge models/judge_classifier.pth --n 256 --seed 0 --out runs/eval_akari.json

Three figures, none of them computed by a network the generator was trained to please:

* **Independent-judge recognition**: the fraction of ``n`` samples that a separately trained classifier (``--judge``:
  another seed, split or architecture than the guiding detector) classifies as the generator's character, with its
  mean probability of that character; chance is ``1 / its classes``. The same judge's score on the real images of
  the character, at the generator's resolution, is the ceiling to compare with. The guiding detector itself is
  refused as a judge (compared by the SHA-256 of the file content, and by its weights): a generator can learn
  adversarial patterns that its own detector scores at 100 % and nobody else recognises.
* **KID** (Kernel Inception Distance, Binkowski et al. 2018) between the samples and the real images of the
  character: the unbiased squared MMD with the polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over
  random subsets (mean and standard deviation over subsets, as torchmetrics and torch-fidelity report it; tested
  against torchmetrics' ``KernelInceptionDistance``). Unlike FID it is unbiased for the few hundred images one
  character has. Features: the pooled penultimate layer of a frozen ImageNet backbone from the registry
  (``efficientnet_lite0`` with its offline package weights by default, 1280-d, images resized to 224 px), because
  torchmetrics' and torch-fidelity's Inception weights are a download. Values are not comparable with published
  Inception-KID numbers, only with each other (same feature network, same real images).
* **Diversity**: the mean pairwise cosine distance between the samples' features, the same figure for the real
  images, and their ratio (1.0: as varied as the real set; near 0: mode collapse).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from animeai.checkpoint import CheckpointError, file_sha256, read_metadata, read_model_file
from animeai.models.perceptual import FrozenModule

DEFAULT_FEATURES = "efficientnet_lite0"
DEFAULT_FEATURE_SIZE = 224
REAL_SPLITS = ("train", "val", "all")


class EvaluationError(ValueError):
    """Input that cannot be evaluated (a judge that is the guiding detector, a character it does not know ...)."""


# ---------------------------------------------------------------------------------------------------- KID


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None,
                      coef: float = 1.0) -> torch.Tensor:
    """``(x @ y.T * gamma + coef) ** degree`` with ``gamma = 1 / feature_dim`` by default (KID's kernel)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef) ** degree


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None,
                  coef: float = 1.0) -> torch.Tensor:
    """Unbiased estimate of the squared MMD between the sets ``x`` (m, d) and ``y`` (n, d), polynomial kernel.

    ``sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1)) - 2 sum k(x_i, y_j) / (m n)``:
    its expectation is 0 when both sets come from the same distribution (single estimates may be slightly
    negative)."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 feature vectors on each side, got {m} and {n}")
    k_xx = polynomial_kernel(x, x, degree, gamma, coef)
    k_yy = polynomial_kernel(y, y, degree, gamma, coef)
    k_xy = polynomial_kernel(x, y, degree, gamma, coef)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return xx + yy - 2 * k_xy.sum() / (m * n)


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100,
                              subset_size: int | None = None, degree: int = 3, gamma: float | None = None,
                              coef: float = 1.0, seed: int = 0) -> dict[str, float]:
    """KID between real and generated feature vectors: :func:`mmd2_unbiased` on ``subsets`` random subsets of
    ``subset_size`` vectors from each side (drawn without replacement; default ``min(1000, len(real), len(fake))``).

    Returns ``mean`` and ``std`` (population standard deviation over the subsets), ``subsets`` and
    ``subset_size``. The subsets are drawn like torchmetrics' ``KernelInceptionDistance.compute`` does (a
    permutation of the real, then of the fake vectors, per subset), from a generator seeded with ``seed``:
    given the same features and ``torch.manual_seed(seed)`` before torchmetrics, both give the same numbers."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"KID needs two (n, d) feature matrices of the same d, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    if subsets < 1:
        raise ValueError(f"the number of KID subsets must be >= 1, got {subsets}")
    size = min(1000, real.shape[0], fake.shape[0]) if subset_size is None else int(subset_size)
    if size < 2 or size > min(real.shape[0], fake.shape[0]):
        raise ValueError(f"KID subset size {size} must be in 2..{min(real.shape[0], fake.shape[0])} (the smaller of "
                         f"{real.shape[0]} real and {fake.shape[0]} generated images)")
    real, fake = real.double(), fake.double()
    g = torch.Generator().manual_seed(int(seed))
    scores = []
    for _ in range(subsets):
        r = real[torch.randperm(real.shape[0], generator=g)[:size]]
        f = fake[torch.randperm(fake.shape[0], generator=g)[:size]]
        scores.append(mmd2_unbiased(r, f, degree, gamma, coef))
    s = torch.stack(scores)
    return {"mean": s.mean().item(), "std": s.std(unbiased=False).item(), "subsets": subsets, "subset_size": size}


# ---------------------------------------------------------------------------------------------- diversity


def mean_pairwise_cosine_distance(features: torch.Tensor) -> float:
    """Mean of ``1 - cos(f_i, f_j)`` over all pairs ``i < j``: 0 for identical images, larger for varied sets."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 feature vectors, got shape {tuple(features.shape)}")
    f = F.normalize(features.double(), dim=1)
    n = f.shape[0]
    sim = f @ f.T
    mean_sim = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
    return float(1.0 - mean_sim)


# ----------------------------------------------------------------------------------------- feature network


class FeatureNet(FrozenModule):
    """Frozen ImageNet registry backbone: images in ``[-1, 1]`` -> pooled penultimate features ``(B, D)``.

    Images are resized (bilinear, antialiased when shrinking) to ``image_size`` and normalised as the backbone's
    weights expect; features are timm's ``forward_head(forward_features(x), pre_logits=True)`` (global average
    pooled). Random weights are refused: they would measure nothing."""

    def __init__(self, arch: str = DEFAULT_FEATURES, pretrained: str = "auto", image_size: int = DEFAULT_FEATURE_SIZE):
        super().__init__()
        from animeai.models import create_model, get_model_spec
        from animeai.weights import WeightsError

        if str(pretrained).strip().lower() == "none":
            raise WeightsError(f"feature network {arch}: random weights would measure nothing, so 'none' is refused; "
                               "use auto, package, hub or a weights file")
        if not 16 <= int(image_size) <= 1024:
            raise ValueError(f"--feature-size must be in 16..1024, got {image_size}")
        spec = get_model_spec(arch)
        self.net = create_model(arch, num_classes=1, pretrained=pretrained)
        self.arch, self.image_size = arch, int(image_size)
        self.pretrained_source = self.net.animeai_pretrained_source
        self.dim = int(self.net.num_features)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() + 1) * 0.5
        size = self.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > size)
        return self.net.forward_head(self.net.forward_features((x - self.mean) / self.std), pre_logits=True).float()

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        device = self.mean.device
        return torch.cat([self(x.to(device)).cpu() for x in images.split(batch_size)])

    def describe(self) -> dict[str, Any]:
        return {"name": self.arch, "weights": self.pretrained_source, "input_size": self.image_size,
                "dim": self.dim, "layer": "global-average-pooled penultimate features (timm pre_logits)"}


# -------------------------------------------------------------------------------------------------- judge


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def check_judge(judge: str | Path, generator_meta: dict[str, Any], generator_path: str | Path) -> dict[str, Any]:
    """Check that ``judge`` is a classifier model file other than the detector the generator was guided by.

    The guiding detector is known from the generator file: ``detection_model_sha256`` (the SHA-256 of the detector
    file, recorded at training) and ``detection_model`` (its path). The judge is refused if its content hash equals
    either, or if it holds the very weights of the detector file (a copy with other metadata). Returns what was
    checked: ``{"judge_sha256", "detector_sha256", "verified", "note"}``; ``verified`` is false only for an older
    generator file without a recorded hash whose detector file is gone."""
    judge = Path(judge)
    meta = read_metadata(judge)  # CheckpointError naming the file if it is no model file at all
    kind = meta.get("kind", "classifier")
    if kind != "classifier":
        raise CheckpointError(f"{judge}: holds a '{kind}' model, not a classifier; --judge needs a classifier model "
                              "file trained separately from the generator's detector (`animeai train detector` with "
                              "another seed, split or architecture)")
    judge_sha = file_sha256(judge)
    recorded = generator_meta.get("detection_model_sha256")
    det_path = generator_meta.get("detection_model")
    det_sha = None
    det_file = Path(det_path) if det_path else None
    if det_file is not None and det_file.is_file():
        det_sha = file_sha256(det_file)
    refuse = (f"--judge {judge} is the detector the generator {generator_path} was guided by ({det_path}): the "
              "generator was trained to please that network, so it cannot grade it; pass a classifier trained "
              "separately (another seed, split or architecture)")
    if judge_sha in {recorded, det_sha}:
        raise EvaluationError(refuse + " [same file content, SHA-256]")
    if det_sha is not None:
        try:
            det_tensors, _ = read_model_file(det_file)
        except CheckpointError:
            det_tensors = None
        if det_tensors is not None and _same_weights(read_model_file(judge)[0], det_tensors):
            raise EvaluationError(refuse + " [same weights]")
    verified = recorded is not None or det_sha is not None
    note = ("judge differs from the guiding detector (file hash" + (" and weights)" if det_sha else ")")) if verified \
        else (f"the guiding detector {det_path} is not found and the generator file records no hash of it: "
              "could not verify that the judge is another model")
    return {"judge_sha256": judge_sha, "detector_sha256": recorded or det_sha, "verified": verified, "note": note}


# ------------------------------------------------------------------------------------------- real images


def real_images(data: str | Path, character: str, image_size: int, split: str = "train"):
    """The character's real images as the generator saw them (squashed to ``image_size``), a
    :class:`animeai.tasks.generator.RealImages`, and the folders they came from.

    ``split``: ``train`` (the generator's own rule: ``<data>/train/<character>/`` in a train/val layout, else
    ``<data>/<character>/``), ``val`` (``<data>/val/<character>/``: held-out images), ``all`` (both)."""
    from animeai.data.folder import DatasetError, has_train_val, visible_files
    from animeai.data.images import validate_images
    from animeai.tasks.generator import RealImages, find_character_images

    if split not in REAL_SPLITS:
        raise ValueError(f"--real-split must be one of {', '.join(REAL_SPLITS)}, got {split!r}")
    data = Path(data)
    paths, errors, folders = [], [], []
    if split in ("train", "all"):
        p, e, folder = find_character_images(data, character)
        paths, errors, folders = list(p), list(e), [folder]
    if split in ("val", "all") and (split == "val" or has_train_val(data)):
        folder = data / "val" / character
        if not folder.is_dir():
            raise DatasetError(f"character '{character}': no folder {folder} (--real-split {split} needs held-out "
                               f"images in <data>/val/<character>/; --data is {data})")
        ok, bad = validate_images(visible_files(folder))
        if not ok:
            raise DatasetError(f"character '{character}': no usable image in {folder}")
        paths, errors, folders = paths + list(ok), errors + list(bad), folders + [folder]
    return RealImages(paths, image_size, 0, hflip=0.0), errors, folders


# --------------------------------------------------------------------------------------------- the report


def _judge_metadata(judge: str | Path, character: str) -> dict[str, Any]:
    """The judge file's metadata; an error naming the file when the generator's character is not among its classes."""
    meta = read_metadata(judge)
    names = list(meta["class_names"])
    if character not in names:
        more = " ..." if len(names) > 30 else ""
        raise EvaluationError(f"--judge {judge} does not know the generator's character '{character}' (classes are "
                              f"matched by name); its classes: {', '.join(names[:30])}{more}")
    return meta


def evaluate_generator(model: str | Path, data: str | Path, judge: str | Path, *, n: int = 256, seed: int = 0,
                       batch_size: int = 64, device: str | None = None, features: str = DEFAULT_FEATURES,
                       features_pretrained: str = "auto", feature_size: int = DEFAULT_FEATURE_SIZE,
                       kid_subsets: int = 100, kid_subset_size: int | None = None,
                       real_split: str = "train", also_judges: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The quality report of a generator model file (see the module docstring): judge recognition, KID, diversity.

    ``also_judges``: more judges (other seeds or architectures) scoring the same samples and real images, reported
    under ``also_judges`` (recognition, target probability, real recognition): a judge that shares the guiding
    detector's architecture and ImageNet start may share its blind spots too.

    Errors, each naming the file or folder: ``model`` not a generator file (``CheckpointError``), ``judge`` not a
    classifier (``CheckpointError``) or the guiding detector itself / without the generator's character
    (``EvaluationError``), no real images of the character under ``data`` (``DatasetError``)."""
    from animeai.generation import judge_scores, load_generator, load_judge, sample_images
    from animeai.inference import pick_device

    if n < 2:
        raise ValueError(f"--n must be >= 2 (diversity and KID compare samples), got {n}")
    dev = pick_device(device)
    generator, meta = load_generator(model, dev)  # CheckpointError: not a generator file
    character = meta["character"]
    independence = check_judge(judge, meta, model)
    jmeta = _judge_metadata(judge, character)
    judge_names = list(jmeta["class_names"])
    other_metas = []
    for other in also_judges:  # every judge is checked before any sampling
        check_judge(other, meta, model)
        other_metas.append(_judge_metadata(other, character))
    real, skipped, folders = real_images(data, character, int(meta["image_size"]), real_split)
    if len(real) < 2:
        raise EvaluationError(f"character '{character}': only {len(real)} real image in "
                              f"{', '.join(map(str, folders))}; KID and diversity need at least 2")
    judge_net = load_judge(judge, dev)
    samples = sample_images(generator, n, class_id=meta["class_id"], seed=seed, batch_size=batch_size)
    real_x = torch.stack([real.image(i) for i in range(len(real))])

    scores = judge_scores(samples, judge_net, character, batch_size)
    real_scores = judge_scores(real_x, judge_net, character, batch_size)
    with torch.no_grad():
        preds = torch.cat([judge_net(x.to(dev)).argmax(dim=1).cpu() for x in samples.split(batch_size)])
    counts = torch.bincount(preds, minlength=len(judge_names))
    top = [{"class": judge_names[i], "fraction": round(counts[i].item() / n, 4)}
           for i in counts.argsort(descending=True)[:5].tolist() if counts[i] > 0]
    del judge_net
    others = []
    for other, other_meta in zip(also_judges, other_metas):  # the same samples, seen by other judges
        other_net = load_judge(other, dev)
        seen = judge_scores(samples, other_net, character, batch_size)
        seen_real = judge_scores(real_x, other_net, character, batch_size)
        others.append({"model": str(other), "arch": other_meta.get("arch"),
                       "recognition": seen["judge_recognition"], "target_prob": seen["judge_target_prob"],
                       "real_recognition": seen_real["judge_recognition"]})
        del other_net

    net = FeatureNet(features, features_pretrained, feature_size).to(dev)
    fake_f, real_f = net.features(samples, batch_size), net.features(real_x, batch_size)
    kid = kernel_inception_distance(real_f, fake_f, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    div_fake, div_real = mean_pairwise_cosine_distance(fake_f), mean_pairwise_cosine_distance(real_f)
    return {
        "model": str(model), "character": character, "class_id": meta["class_id"], "image_size": meta["image_size"],
        "epoch": meta.get("epoch"), "discriminator": meta.get("discriminator"), "n": n, "seed": seed,
        "judge": {
            "model": str(judge), "arch": jmeta.get("arch"), "num_classes": len(judge_names),
            "seed": (jmeta.get("config") or {}).get("run", {}).get("seed"), "class_id": judge_names.index(character),
            "chance": 1.0 / len(judge_names), "recognition": scores["judge_recognition"],
            "target_prob": scores["judge_target_prob"], "real_recognition": real_scores["judge_recognition"],
            "real_target_prob": real_scores["judge_target_prob"], "top_predictions": top,
            "independence": independence,
        },
        "also_judges": others,
        "kid": {**kid, "features": net.describe()["name"]},
        "diversity": {"samples": div_fake, "real": div_real,
                      "ratio": div_fake / div_real if div_real > 0 else math.nan,
                      "metric": "mean pairwise cosine distance of the feature network's features"},
        "feature_network": net.describe(),
        "real": {"split": real_split, "folders": [str(f) for f in folders], "images": len(real),
                 "skipped": [str(e) for e in skipped]},
        "guided_by": {"detection_model": meta.get("detection_model"), "arch": meta.get("detector_arch")},
    }
