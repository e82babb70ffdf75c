"""The Ray Data engine (``--data-engine ray``, issue 17): the DataLoader engine's seeded order, split evenly over
ranks; the images the task's dataset gives; a clear error when no CPU is left to decode or when run outside Ray
Train; the detector trained through it on a local Ray with the same classes and metrics comparable to the
DataLoader engine's."""

from __future__ import annotations

import json

import pytest
import torch

ray = pytest.importorskip("ray")

from animeai.cli import main  # noqa: E402
from animeai.config import DetectorConfig, load_config  # noqa: E402
from animeai.data.folder import EpochShuffleSampler, ImageFolderDataset, build_splits  # noqa: E402
from animeai.data.transforms import eval_transform  # noqa: E402
from animeai.distributed.ray_data import RayDataError, RayDataLoader, shard_order  # noqa: E402
from animeai.distributed.trainer import DistributedOptions, fit  # noqa: E402
from animeai.engine import train  # noqa: E402
from animeai.inference import Classifier  # noqa: E402
from animeai.tasks.detector import DetectorTask  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (7, 2), (64, 4)])
def test_shards_follow_the_dataloader_order_evenly(n, world):
    for epoch in (0, 1):
        sampler = EpochShuffleSampler(n, seed=5)
        sampler.set_epoch(epoch)
        full = list(sampler)
        shards = [shard_order(n, 5, epoch, r, world) for r in range(world)]
        assert {len(s) for s in shards} == {n // world}  # every rank the same number of steps (DDP)
        interleaved = [shards[i % world][i // world] for i in range(world * (n // world))]
        assert interleaved == full[: world * (n // world)]
    assert shard_order(n, 5, 0, 0, 1) != shard_order(n, 5, 1, 0, 1)  # a new order each epoch


def _dataset(synth_root):
    splits = build_splits(synth_root, val_fraction=0.25, split_seed=0, manifest="off")
    return ImageFolderDataset(splits.train, eval_transform(32, (0.5,) * 3, (0.5,) * 3), draft_size=32)


def test_loader_streams_the_datasets_images_in_order(local_ray, synth_root):
    ds = _dataset(synth_root)
    loader = RayDataLoader(ds, 16, seed=3, rank=0, world=1, device="cpu", drop_last=True, cpus=1)
    loader.set_epoch(2)
    batches = list(loader)
    assert len(batches) == len(loader) == len(ds) // 16
    order = shard_order(len(ds), 3, 2, 0, 1)[: len(loader) * 16]
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert labels.tolist() == [ds[i][1] for i in order]  # the DataLoader engine's order, kept by Ray Data
    expected = torch.stack([ds[i][0] for i in order[:5]])
    assert torch.equal(images[:5], expected)  # the task's decode + transform, unchanged
    # rank 1 of 2 gets the other half, no overlap
    other = RayDataLoader(ds, 16, seed=3, rank=1, world=2, device="cpu", cpus=1)
    other.set_epoch(2)
    assert len(list(other)) == len(other) == (len(ds) // 2) // 16


def test_loader_streams_uint8_images_for_device_augmentation(local_ray, synth_root):
    from animeai.data.device_augment import loader_transform

    splits = build_splits(synth_root, val_fraction=0.25, split_seed=0, manifest="off")
    ds = ImageFolderDataset(splits.train, loader_transform(32, hflip=0.0), draft_size=32)
    loader = RayDataLoader(ds, 16, seed=1, rank=0, world=1, device="cpu", drop_last=True, cpus=1)
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    order = shard_order(len(ds), 1, 0, 0, 1)[:16]
    assert images.dtype == torch.uint8 and tuple(images.shape) == (16, 32, 32, 3)  # a quarter of float32's bytes
    assert torch.equal(images, torch.stack([ds[i][0] for i in order]))
    assert labels.tolist() == [ds[i][1] for i in order]


def test_no_cpu_left_to_decode_is_an_error_not_a_hang(local_ray, synth_root, monkeypatch):
    monkeypatch.setattr("animeai.distributed.ray_data.CAPACITY_WAIT_S", 0.5)
    loader = RayDataLoader(_dataset(synth_root), 8, seed=0, rank=0, world=1, device="cpu", cpus=64)
    with pytest.raises(RayDataError, match="no CPU free for decode tasks"):
        next(iter(loader))


def test_local_cli_refuses_the_ray_engine(synth_root, tmp_path, capsys):
    assert main(["train", "detector", "--data", str(synth_root), "--data-engine", "ray", "--out",
                 str(tmp_path / "m.pth")]) == 2
    assert "Ray job" in capsys.readouterr().err and not (tmp_path / "m.pth").exists()
    assert main(["train", "fusion", "--data", str(synth_root), "--data-engine", "ray"]) == 2
    assert "DataLoader engine only" in capsys.readouterr().err


def test_detector_trains_through_ray_data_like_the_dataloader(local_ray, synth_root, tmp_path):
    from conftest import small_overrides

    common = {"optim.batch_size": 8, "run.epochs": 3, "data.image_size": 48}
    ref = load_config(DetectorConfig, None, small_overrides(synth_root, tmp_path / "torch", **common))
    torch_result = train(ref, DetectorTask(ref))
    cfg = load_config(DetectorConfig, None, small_overrides(synth_root, tmp_path / "ray", **common,
                                                            **{"data.engine": "ray"}))
    result = fit("detector", cfg, DistributedOptions(num_workers=1, cpus_per_worker=1,
                                                     storage_path=str(tmp_path / "storage")),
                 scratch_dir=str(tmp_path / "scratch"))
    clf = Classifier.from_file(cfg.run.out)
    assert clf.class_names == sorted(p.name for p in synth_root.iterdir() if p.is_dir())
    history = [json.loads(x) for x in (tmp_path / "scratch" / "detector-model" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3] and result.metrics["epoch"] == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    ray_top1, torch_top1 = clf.meta["metrics"]["val_top1"], torch_result.best_metrics["val_top1"]
    assert ray_top1 > 2 / 6  # well above chance (6 classes)
    assert abs(ray_top1 - torch_top1) <= 0.25, (ray_top1, torch_top1)
