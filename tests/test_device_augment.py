"""--augment-on device: the batched jitter/rotation equals torchvision's per image, and the detector trains with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from animeai.config import ConfigError, DetectorConfig, FusionConfig, load_config
from animeai.data import device_augment as da
from animeai.data.transforms import train_transform
from animeai.tasks.detector import DetectorTask

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(n=4, h=20, w=20, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_jitter_ops_match_torchvision_per_image(name):
    x = _images()
    factors = torch.tensor([0.6, 0.9, 1.1, 1.4])
    ours = getattr(da, f"adjust_{name}")(x.clone(), factors)
    ref = torch.stack([getattr(TF, f"adjust_{name}")(x[i], float(factors[i])) for i in range(4)])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_hue_matches_torchvision_and_hsv_round_trips():
    x = _images(h=16, w=24)
    shifts = torch.tensor([-0.3, -0.05, 0.05, 0.45])
    ours = da.adjust_hue(x, shifts)
    ref = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(4)])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(da.hsv_to_rgb(da.rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    gray = torch.full((1, 3, 4, 4), 0.5)  # no hue: a shift leaves it alone
    torch.testing.assert_close(da.adjust_hue(gray, torch.tensor([0.3])), gray)


def test_rotation_identity_and_direction_match_torchvision():
    x = _images(n=2, h=12, w=12)
    torch.testing.assert_close(da.rotate(x, torch.zeros(2)), x, atol=1e-5, rtol=0)
    ours = da.rotate(x, torch.tensor([90.0, -90.0]))
    ref = torch.stack([TF.rotate(x[0], 90.0), TF.rotate(x[1], -90.0)])  # positive = counter-clockwise
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_loader_transform_gives_uint8_hwc_and_flips():
    img = Image.fromarray(np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3))
    out = da.loader_transform(4, hflip=0.0)(img)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (4, 4, 3)
    flipped = da.loader_transform(4, hflip=1.0)(img)
    assert torch.equal(flipped, out.flip(1))


def test_device_augment_without_augmentation_is_the_eval_normalisation():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 10, 3), dtype=np.uint8))
    batch = da.loader_transform(10, hflip=0.0)(img).unsqueeze(0)
    aug = da.DeviceAugment(MEAN, STD, rotation=15, color_jitter=0.2)
    ref = train_transform(10, MEAN, STD, rotation=0, hflip=0, color_jitter=0)(img).unsqueeze(0)
    out = aug(batch, augment=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not torch.allclose(aug(batch, augment=True), ref, atol=1e-3)
    with pytest.raises(ValueError, match="uint8"):
        aug(batch.float())


def test_device_augment_draws_depend_on_seed_epoch_and_rank_only():
    batch = (torch.rand(3, 16, 16, 3) * 255).to(torch.uint8)

    def draw(seed, epoch, rank=0):
        aug = da.DeviceAugment(MEAN, STD, seed=seed, rank=rank)
        aug.set_epoch(epoch)
        return aug(batch, augment=True)

    assert torch.equal(draw(1, 3), draw(1, 3))  # a resumed epoch redraws the same augmentation
    aug = da.DeviceAugment(MEAN, STD, seed=1)
    aug.set_epoch(3)
    first = aug(batch, augment=True)
    aug.set_epoch(3)  # what every step of the epoch calls: it must not restart the draws
    assert not torch.equal(aug(batch, augment=True), first)
    assert not torch.equal(draw(1, 3), draw(1, 4))
    assert not torch.equal(draw(1, 3), draw(2, 3))
    assert not torch.equal(draw(1, 3), draw(1, 3, rank=1))
    assert draw(1, 3).shape == (3, 3, 16, 16)


def test_auto_means_the_device_on_a_gpu_only():
    from animeai.tasks.detector import augment_on_device

    assert augment_on_device("auto", torch.device("cuda", 0)) and not augment_on_device("auto", "cpu")
    assert augment_on_device("device", "cpu") and not augment_on_device("workers", torch.device("cuda"))


def test_augment_on_choice_and_fusion_refuses_device():
    assert load_config(DetectorConfig, None, {"augment.on": "device"}).augment.on == "device"
    with pytest.raises(ConfigError, match="augment.on"):
        load_config(DetectorConfig, None, {"augment.on": "gpu"})
    with pytest.raises(ConfigError, match="fusion augments in the loader"):
        load_config(FusionConfig, None, {"augment.on": "device"})


class _Recording(DetectorTask):
    """A detector task that records what the model is fed with ``--augment-on device``."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.fed: list[tuple[int, float]] = []

    def train_images(self, images):
        assert images.dtype == torch.uint8  # the loader handed over uint8
        out = super().train_images(images)
        self.fed.append((self.device_augment._epoch, float(out.double().sum())))
        return out


class _Interrupt(Exception):
    pass


def test_detector_trains_with_device_augmentation_and_resume_redraws_it(small_cfg, tmp_path):
    from animeai.engine import train

    def cfg_for(name, **extra):
        return small_cfg(**{"augment.on": "device", "run.epochs": 2, "run.run_dir": str(tmp_path / name),
                            "run.out": str(tmp_path / f"{name}.pth"), **extra})

    straight = _Recording(cfg_for("a"))
    result = train(straight.cfg, straight)
    assert result.history[-1]["val_top1"] > 0.5  # 4 classes: it learned through the device pipeline
    epochs = [e for e, _ in straight.fed]
    assert epochs == sorted(epochs) and set(epochs) == {0, 1}  # reseeded per engine epoch
    second_epoch = [s for e, s in straight.fed if e == 1]

    def crash(metrics, state_dir, task):
        if metrics["epoch"] == 1:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        first = _Recording(cfg_for("b"))
        train(first.cfg, first, callbacks=[crash])
    resumed = _Recording(cfg_for("b", **{"run.resume": True}))
    train(resumed.cfg, resumed)
    assert [s for _, s in resumed.fed] == pytest.approx(second_epoch, rel=1e-6)  # the same augmented batches
