"""Training on a CUDA device: the detector, the generator and distillation each run an epoch there.

Run on a GPU machine with ``pytest -m gpu tests/test_gpu.py``. Weights are random (``pretrained=none`` or random
weight files) so that no download or offline package is needed there.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NAMES = ["aoi", "botan", "chiyo"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Synthetic characters, a random detector model file and random VGG16 / Lite0 weight files."""
    import torchvision
    from safetensors.torch import save_file

    from animeai.checkpoint import save_model_file
    from animeai.data.synthetic import make_synthetic_dataset
    from animeai.models import create_model, get_model_spec

    tmp = tmp_path_factory.mktemp("gpu")
    root = tmp / "chars"
    make_synthetic_dataset(root, num_classes=3, images_per_class=16, image_size=64, seed=0)
    det = tmp / "detector.pth"
    spec = get_model_spec("efficientnet_lite0")
    save_model_file(det, create_model("efficientnet_lite0", 3, pretrained="none").state_dict(), {
        "kind": "classifier", "arch": "efficientnet_lite0", "num_classes": 3,
        "class_names": sorted(p.name for p in root.iterdir() if p.is_dir()), "image_size": 64,
        "mean": list(spec.mean), "std": list(spec.std)})
    vgg, lite = tmp / "vgg16.safetensors", tmp / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in torchvision.models.vgg16().state_dict().items()}, str(vgg))
    save_file({k: v.contiguous() for k, v in create_model("efficientnet_lite0", 1000, pretrained="none")
               .state_dict().items()}, str(lite))
    return {"root": root, "detector": det, "vgg": vgg, "lite": lite, "tmp": tmp}


def _finite(history: list[dict]) -> bool:
    return all(math.isfinite(v) for row in history for v in row.values() if isinstance(v, float))


@pytest.mark.parametrize("augment_on", ["auto", "workers"])
def test_detector_trains_on_the_gpu_in_bf16(files, augment_on):
    from animeai.config import DetectorConfig, load_config
    from animeai.engine import train
    from animeai.inference import Classifier
    from animeai.tasks.detector import DetectorTask

    out = files["tmp"] / f"det_run_{augment_on}"
    cfg = load_config(DetectorConfig, None, {
        "data.root": str(files["root"]), "data.image_size": 64, "data.num_workers": 2,
        "model.arch": "efficientnet_b0", "model.pretrained": "none", "optim.batch_size": 8, "run.epochs": 2,
        "run.progress": False, "run.mixed_precision": "bf16", "run.out": str(out / "model.pth"),
        "run.run_dir": str(out / "run"), "augment.on": augment_on})
    task = DetectorTask(cfg)
    result = train(cfg, task)
    assert len(result.history) == 2 and _finite(result.history)
    # auto = the jitter/rotation batched on the GPU; workers = all of it in the loader processes
    assert (task.device_augment is not None) == (augment_on == "auto")
    if task.device_augment is not None:
        assert task.device_augment.mean.is_cuda
    clf = Classifier.from_file(out / "model.pth", device="cuda")
    assert next(clf.model.parameters()).is_cuda


def test_device_augment_ops_agree_between_cuda_and_cpu():
    from animeai.data import device_augment as da

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    f = torch.tensor([0.7, 0.9, 1.1, 1.3])
    for fn, arg in [(da.adjust_brightness, f), (da.adjust_contrast, f), (da.adjust_saturation, f),
                    (da.adjust_hue, f - 1.0), (da.rotate, (f - 1.0) * 50)]:
        torch.testing.assert_close(fn(x.cuda(), arg.cuda()).cpu(), fn(x, arg), atol=1e-4, rtol=0)


def test_generator_trains_on_the_gpu(files):
    from animeai.config import GeneratorConfig, load_config
    from animeai.engine import train
    from animeai.tasks.generator import GeneratorTask

    out = files["tmp"] / "gen_run"
    cfg = load_config(GeneratorConfig, None, {
        "data.root": str(files["root"]), "data.image_size": 64, "guide.detection_model": str(files["detector"]),
        "guide.target_class": "1", "guide.perceptual": "vgg16", "guide.perceptual_pretrained": str(files["vgg"]),
        "model.d_pretrained": str(files["lite"]), "optim.batch_size": 8, "run.epochs": 2, "run.progress": False,
        "run.mixed_precision": "bf16", "run.eval_every": 1, "sample.every": 1, "sample.count": 4,
        "sample.eval_count": 8, "sample.folder": str(out / "generated_images"), "run.out": str(out / "g.pth"),
        "run.run_dir": str(out / "run")})
    task = GeneratorTask(cfg)
    result = train(cfg, task)
    assert len(result.history) == 2 and _finite(result.history)
    # The frozen networks (buffers included) live on the GPU with the models that train.
    assert all(t.is_cuda for t in list(task.detector.parameters()) + list(task.detector.buffers()))
    assert (out / "generated_images" / task.character / "samples_epoch_2.png").is_file()


def test_online_system_on_the_gpu_matches_the_cpu(files):
    """The online system on CUDA (multiscale embedding): enrol, add a role, identify; its raw features agree with
    the CPU's for the same images and both give the same answers."""
    pytest.importorskip("faiss")
    import numpy as np

    from animeai.online import OnlineLearningSystem

    names = sorted(p.name for p in files["root"].iterdir() if p.is_dir())
    enrol = files["tmp"] / "enrol"
    for c in names[:2]:
        (enrol / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((files["root"] / c).iterdir())[:8]:
            if not (enrol / c / f.name).exists():
                (enrol / c / f.name).symlink_to(f)
    db = files["tmp"] / "online_db"
    gpu = OnlineLearningSystem(files["detector"], db, data_root=enrol, device="cuda")
    assert gpu.embedding == "multiscale" and gpu.clf.device.type == "cuda"
    new = sorted((files["root"] / names[2]).iterdir())
    gpu.add_new_role("新しい", new[:4])
    probe = [p for c in names for p in sorted((files["root"] / c).iterdir())[-3:]]
    cpu = OnlineLearningSystem(files["detector"], db, device="cpu")
    a, b = gpu.embed(probe), cpu.embed(probe)
    assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()  # TF32/cuDNN vs CPU arithmetic
    sg, sc = gpu.scores(a)[0], cpu.scores(b)[0]
    assert np.abs(sg - sc).max() < 0.05
    assert np.mean(sg.argmax(1) == sc.argmax(1)) >= 8 / 9  # random weights: a near tie may flip
