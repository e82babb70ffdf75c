"""Image transforms: the seeds' 224x224 resize + backbone normalisation, augmentation on train only."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T


def _fill(mean: Sequence[float]) -> tuple[int, int, int]:
    # Rotated-in corners take the mean colour, i.e. ~0 after normalisation, instead of black.
    return tuple(int(round(255 * m)) for m in mean)  # type: ignore[return-value]


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float], *, rotation: float = 15.0,
                    hflip: float = 0.5, color_jitter: float = 0.2, crop_scale: float = 1.0) -> T.Compose:
    steps: list = []
    if crop_scale < 1.0:
        steps.append(T.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), antialias=True))
    else:
        steps.append(T.Resize((image_size, image_size), antialias=True))
    if rotation > 0:
        steps.append(T.RandomRotation(rotation, fill=_fill(mean)))
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter, min(0.5, color_jitter / 4)))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose([T.Resize((image_size, image_size), antialias=True), T.ToTensor(), T.Normalize(mean, std)])
