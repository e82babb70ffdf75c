"""Detection-guided generator: models, losses and their weights, frozen judges, the engine run, sampling, errors.

Everything runs on the CPU at 32 px with tiny models, a detector file built from Lite0's offline weights,
and 3 synthetic characters of 8 images.
"""

from __future__ import annotations

import json
import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image

from animeai.checkpoint import CheckpointError, read_model_file, save_model_file
from animeai.config import ConfigError, GeneratorConfig, config_from_args, load_config, with_overrides
from animeai.data.folder import DatasetError
from animeai.engine import make_accelerator, train
from animeai.generation import build_job_parser, generate_grid, load_generator, sample_images
from animeai.models import create_model, get_model_spec
from animeai.models.gan import (
    create_discriminator,
    create_generator,
    diff_augment,
    make_ema,
    parse_policy,
    upsample_plan,
)
from animeai.models.perceptual import FrozenModule, VGG16Features, create_perceptual, feature_stat_loss
from animeai.tasks.generator import LOSS_TERMS, GeneratorTask, resolve_target_class
from animeai.weights import WeightsError

PACKAGE = PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "animeai"
NAMES = ["akari", "botan", "chiyo"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chars(tmp_path_factory) -> Path:
    """3 synthetic characters x 8 images, flat layout."""
    from animeai.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("gen_chars") / "chars"
    make_synthetic_dataset(root, num_classes=3, images_per_class=8, image_size=48, seed=0)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == NAMES
    return root


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory) -> Path:
    """A classifier model file as the detector task writes it (Lite0 offline weights, new 3-class head, 32 px)."""
    model = create_model("efficientnet_lite0", len(NAMES), pretrained="package")
    spec = get_model_spec("efficientnet_lite0")
    path = tmp_path_factory.mktemp("det") / "detector.pth"
    save_model_file(path, model.state_dict(), {
        "kind": "classifier", "arch": "efficientnet_lite0", "num_classes": len(NAMES), "class_names": NAMES,
        "image_size": 32, "mean": list(spec.mean), "std": list(spec.std),
    })
    return path


def tiny_overrides(chars: Path, detector: Path, out_dir: Path, **extra) -> dict:
    over = {
        "data.root": str(chars), "data.image_size": 32, "guide.detection_model": str(detector),
        "guide.target_class": "botan", "guide.perceptual": "efficientnet_lite0",
        "guide.perceptual_pretrained": "package", "model.z_dim": 16, "model.embed_dim": 8, "model.g_channels": 8,
        "model.g_max_channels": 32, "model.d_channels": 8, "model.d_pretrained": "package",
        "optim.batch_size": 4, "run.epochs": 2, "run.progress": False, "sample.every": 1, "sample.count": 4,
        "sample.eval_count": 8, "sample.folder": str(out_dir / "generated_images"),
        "run.out": str(out_dir / "generator.pth"), "run.run_dir": str(out_dir / "run"), "run.eval_every": 1,
        "run.save_every": 1,
    }
    over.update(extra)
    return over


@pytest.fixture
def gen_cfg(chars, detector_file, tmp_path):
    def make(**extra) -> GeneratorConfig:
        return load_config(GeneratorConfig, None, tiny_overrides(chars, detector_file, tmp_path, **extra))

    return make


def set_up(cfg: GeneratorConfig) -> GeneratorTask:
    """A task built as the engine builds it (no training)."""
    task = GeneratorTask(cfg)
    task.accelerator = make_accelerator(cfg.run)
    task.setup(task.accelerator)
    return task


# ------------------------------------------------------------------------------------------- models


def test_upsample_plan_and_generator_shapes():
    assert upsample_plan(224) == (7, 5) and upsample_plan(64) == (4, 4) and upsample_plan(96) == (6, 4)
    for bad in (100, 225, 6):
        with pytest.raises(ValueError, match="s \\* 2\\^k"):
            upsample_plan(bad)
    for size in (32, 224):
        g = create_generator(image_size=size, z_dim=16, num_classes=3, embed_dim=4, channels=4, max_channels=16)
        x = g(torch.randn(2, 16), torch.tensor([0, 2]))
        assert x.shape == (2, 3, size, size)
        assert x.min() >= -1 and x.max() <= 1
        assert g.fc.out_features == 16 * upsample_plan(size)[0] ** 2  # starts from a 7x7 map at 224, 4x4 at 32
    assert create_discriminator("plain", image_size=32, channels=4)(torch.randn(3, 3, 32, 32)).shape == (3, 1)
    with pytest.raises(ValueError, match="unknown discriminator"):
        create_discriminator("stylegan")


def test_config_rejects_an_image_size_the_generator_cannot_make(gen_cfg):
    with pytest.raises(ConfigError, match="--image-size"):
        gen_cfg(**{"data.image_size": 100})
    with pytest.raises(ConfigError, match="unknown DiffAugment"):
        gen_cfg(**{"model.diffaugment": "color,zoom"})


def _all_modules(*models: nn.Module):
    for m in models:
        yield from m.modules()


def test_no_transposed_convolution_in_any_model_or_source(gen_cfg):
    task = set_up(gen_cfg())
    plain = create_discriminator("plain", image_size=32, channels=4)
    mods = list(_all_modules(*task.models.values(), plain, task.perceptual, task.detector))
    assert any(isinstance(m, nn.Upsample) for m in mods)
    assert not [m for m in mods if isinstance(m, nn.modules.conv._ConvTransposeNd)]
    offenders = [str(p) for p in PACKAGE_ROOT.rglob("*.py") if "ConvTranspose" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_projected_discriminator_trains_heads_only_on_a_frozen_backbone(gen_cfg):
    task = set_up(gen_cfg())
    d = task.models["discriminator"]
    assert d.features.pretrained_source.startswith("package:")
    assert not any(p.requires_grad for p in d.features.parameters())
    assert not any(p.requires_grad for p in d.projections.parameters())
    assert all(p.requires_grad for p in d.heads.parameters())
    out = d(torch.randn(2, 3, 32, 32))
    assert out.ndim == 2 and out.shape[0] == 2
    d.train()
    assert d.training and not d.features.training and not any(m.training for m in d.features.modules())


def test_diffaugment_is_differentiable_and_keeps_shape():
    x = (torch.rand(4, 3, 32, 32) * 2 - 1).requires_grad_(True)
    y = diff_augment(x, "color,translation,cutout", torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not torch.equal(y.detach(), x.detach())
    assert parse_policy("none") == ()
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        parse_policy("rotate")


def test_feature_statistics_do_not_pull_samples_towards_the_mean_image():
    net = create_perceptual("efficientnet_lite0", "package")
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    shuffled = real[torch.randperm(8)]
    mean_image = real.mean(0, keepdim=True).expand(8, -1, -1, -1)
    with torch.no_grad():
        target = net(real)
        same_set = feature_stat_loss(net(shuffled), target).item()
        collapsed = feature_stat_loss(net(mean_image), target).item()
    assert same_set < 1e-6  # any arrangement of a real-like set scores zero: no pull towards one image
    assert collapsed > 100 * max(same_set, 1e-6) and collapsed > 0.01  # a collapsed set is penalised


def test_feature_statistics_penalise_copies_of_one_real_image():
    """Copies of one image with the real batch's spread *within* it (the collapse a holo20 run showed) pay the
    across-images term in full; a batch of one image (no spread to measure) still gives a finite loss."""
    from animeai.models.perceptual import feature_stats

    torch.manual_seed(0)
    net = create_perceptual("efficientnet_lite0", "package")
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    copies = real[:1].expand(8, -1, -1, -1)
    with torch.no_grad():
        target, fake = net(real), net(copies)
        loss = feature_stat_loss(fake, target).item()
        between = [b for _, _, b in feature_stats(fake)]
        one = feature_stat_loss(net(real[:1]), target)
    assert all(b.abs().max().item() < 1e-5 for b in between)  # no spread across the copies
    assert loss >= 0.9  # each layer's across-images term alone is (0 - s)^2 / s^2 = 1
    assert torch.isfinite(one)


# --------------------------------------------------------------------------------------- loss wiring


def _generator_loss(task: GeneratorTask, fake: torch.Tensor, real: torch.Tensor):
    fake = fake.detach().clone().requires_grad_(True)
    labels = torch.full((fake.shape[0],), task.class_id)
    torch.manual_seed(123)  # the same DiffAugment draws in every call
    total, terms = task.generator_loss(fake, real, labels, task.models["discriminator"])
    grad = torch.autograd.grad(total, fake)[0] if total.requires_grad else torch.zeros_like(fake)
    return total.detach(), {k: v.detach() for k, v in terms.items()}, grad


@pytest.fixture(scope="module")
def loss_task(chars, detector_file, tmp_path_factory):
    # --no-cls-augment here: with it, whether the detector term draws augmentations depends on its weight, so the
    # calls compared would not share the adversarial term's DiffAugment draws (its own test sets it explicitly)
    over = {**tiny_overrides(chars, detector_file, tmp_path_factory.mktemp("loss")), "guide.cls_augment": False}
    cfg = load_config(GeneratorConfig, None, over)
    task = set_up(cfg)
    task.models["discriminator"].eval()  # no power-iteration update between the calls compared
    return task


@pytest.mark.parametrize("term", LOSS_TERMS)
def test_each_loss_term_enters_with_its_config_weight(loss_task, term):
    task, base = loss_task, loss_task.cfg
    assert task.loss_weights() == {"adv": 0.1, "cls": 0.2, "perc": 10.0}  # the original design's defaults
    real = task.fixed_real[:4]
    # stand-in generated images: other real images with noise (an untrained generator's grey images leave the
    # 32 px Lite0 detector's features all zero, so its gradient would vanish for a reason unrelated to the wiring)
    fake = (task.fixed_real[4:8] + 0.2 * torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    fake = fake.clamp(-1, 1)
    try:
        total, terms, grad = _generator_loss(task, fake, real)
        task.cfg = with_overrides(base, {f"loss.{term}": 0.0})
        total_wo, terms_wo, grad_wo = _generator_loss(task, fake, real)
        only = {f"loss.{k}": 0.0 for k in LOSS_TERMS if k != term}
        task.cfg = with_overrides(base, {**only, f"loss.{term}": 3.0})
        total_3, terms_3, grad_3 = _generator_loss(task, fake, real)
    finally:
        task.cfg = base
    w = getattr(base.loss, term)
    assert set(terms) == set(LOSS_TERMS) and term not in terms_wo and set(terms_3) == {term}
    assert terms[term] != 0  # (the adversarial term -D(fake) may be negative)
    torch.testing.assert_close(total - total_wo, w * terms[term], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total_3, 3.0 * terms[term], rtol=1e-5, atol=1e-6)
    # the term's gradient: present, scaled by its weight, and gone when its weight is 0
    assert grad_3.abs().sum() > 0
    torch.testing.assert_close(grad - grad_wo, grad_3 * (w / 3.0), rtol=1e-4, atol=1e-7)


def test_cls_augment_classifies_diffaugmented_samples(loss_task):
    from animeai.models.gan import diff_augment

    task, base = loss_task, loss_task.cfg
    fake = (task.fixed_real[4:8] + 0.2 * torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    fake, labels = fake.clamp(-1, 1), torch.full((4,), task.class_id)
    cls_only = {"loss.adv": 0.0, "loss.perc": 0.0, "loss.cls": 1.0}
    try:
        task.cfg = with_overrides(base, {**cls_only, "guide.cls_augment": True})
        _, terms, _ = _generator_loss(task, fake, task.fixed_real[:4])
        task.cfg = with_overrides(base, {**cls_only, "guide.cls_augment": False})
        _, plain, _ = _generator_loss(task, fake, task.fixed_real[:4])
    finally:
        task.cfg = base
    torch.manual_seed(123)  # the draws _generator_loss makes
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(task.detector(diff_augment(fake, task.policy)), labels)
        unaugmented = torch.nn.functional.cross_entropy(task.detector(fake), labels)
    torch.testing.assert_close(terms["cls"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain["cls"], unaugmented, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(terms["cls"], plain["cls"])


def test_all_loss_weights_zero_is_refused(gen_cfg):
    with pytest.raises(ConfigError, match="all generator loss weights are 0"):
        set_up(gen_cfg(**{"loss.adv": 0.0, "loss.cls": 0.0, "loss.perc": 0.0}))


# -------------------------------------------------------------------------------- the engine run


@pytest.fixture(scope="module")
def trained(chars, detector_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    cfg = load_config(GeneratorConfig, None, tiny_overrides(chars, detector_file, out))
    task = GeneratorTask(cfg)
    result = train(cfg, task)
    return cfg, task, result, out


def test_engine_run_writes_a_generator_model_file_and_sample_grids(trained, detector_file):
    cfg, task, result, out = trained
    assert [m["epoch"] for m in result.history] == [1, 2]
    for m in result.history:
        assert {"recognition", "target_prob", "perc_dist", "g_loss", "d_loss", "adv", "cls", "perc"} <= set(m)
        assert 0.0 <= m["recognition"] <= 1.0 and all(
            torch.isfinite(torch.tensor(v)) for v in m.values() if isinstance(v, float))
    tensors, meta = read_model_file(result.model_path)
    assert meta["kind"] == "generator" and meta["task"] == "generator" and meta["epoch"] == 2
    assert meta["character"] == "botan" and meta["class_id"] == 1 and meta["class_names"] == NAMES
    assert meta["detection_model"] == str(detector_file)
    assert meta["image_size"] == 32 and meta["z_dim"] == 16 and meta["generator"]["num_classes"] == 3
    assert meta["ema_updates"] == 2 * 2  # 8 images / batch 4 = 2 steps per epoch
    for epoch in (1, 2):
        grid = out / "generated_images" / "botan" / f"samples_epoch_{epoch}.png"
        with Image.open(grid) as im:
            assert im.size == (2 + 2 * 34, 2 + 2 * 34)  # 4 images of 32 px, 2 per row, 2 px padding
    # the exported weights are the EMA generator's, and differ from the raw generator's
    raw = task.unwrap("generator").state_dict()
    assert any(not torch.equal(tensors[k], raw[k].cpu()) for k in tensors if k.endswith("weight"))


def test_frozen_networks_get_no_gradient_and_stay_in_eval_mode(trained):
    _, task, _, _ = trained
    frozen = {"detector": task.detector, "perceptual": task.perceptual,
              "projected D backbone": task.unwrap("discriminator").features,
              "EMA generator": task.unwrap("generator_ema")}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in frozen.items()}
    trained_before = {k: v.clone() for k, v in task.unwrap("generator").state_dict().items()}
    heads_before = {k: v.clone() for k, v in task.unwrap("discriminator").heads.state_dict().items()}
    task.train_mode(True)
    task.training_step(next(iter(task.train_loader)))
    for name, m in frozen.items():
        assert not m.training and not any(sub.training for sub in m.modules()), f"{name} left eval mode"
        assert all(not p.requires_grad and p.grad is None for p in m.parameters()), f"{name} got a gradient"
    for name in ("detector", "perceptual", "projected D backbone"):
        for k, v in frozen[name].state_dict().items():
            assert torch.equal(v, before[name][k]), f"{name} changed: {k}"
    ema_after = frozen["EMA generator"].state_dict()
    assert any(not torch.equal(ema_after[k], before["EMA generator"][k]) for k in ema_after)  # updated by EMA only
    g_after = task.unwrap("generator").state_dict()
    assert any(not torch.equal(g_after[k], trained_before[k]) for k in g_after)  # the generator trained
    h_after = task.unwrap("discriminator").heads.state_dict()
    assert any(not torch.equal(h_after[k], heads_before[k]) for k in h_after)  # the D heads trained


def test_resume_continues_the_run(trained, chars, detector_file):
    cfg, _, first, out = trained
    cfg3 = load_config(GeneratorConfig, None, tiny_overrides(chars, detector_file, out, **{
        "run.epochs": 3, "run.resume": True}))
    task = GeneratorTask(cfg3)
    result = train(cfg3, task)
    assert [m["epoch"] for m in result.history] == [3]
    lines = [json.loads(x) for x in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    _, meta = read_model_file(result.model_path)
    assert meta["epoch"] == 3 and meta["ema_updates"] == 3 * 2  # the EMA state came back with the resume
    assert (out / "generated_images" / "botan" / "samples_epoch_3.png").is_file()


def test_generate_samples_a_model_file(trained, tmp_path, detector_file):
    from animeai.cli import main

    _, _, result, _ = trained
    g, meta = load_generator(result.model_path, device="cpu")
    a = sample_images(g, 5, class_id=meta["class_id"], seed=7)
    b = sample_images(g, 5, class_id=meta["class_id"], seed=7)
    assert a.shape == (5, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, sample_images(g, 5, class_id=meta["class_id"], seed=8))
    info = generate_grid(result.model_path, 3, tmp_path / "lib.png", seed=1, device="cpu")
    assert info["character"] == "botan" and Path(info["out"]).is_file()
    grid = tmp_path / "cli" / "grid.png"
    assert main(["generate", "--model", str(result.model_path), "--n", "6", "--out", str(grid), "--seed", "2",
                 "--device", "cpu"]) == 0
    with Image.open(grid) as im:
        assert im.size == (2 + 3 * 34, 2 + 2 * 34)  # 6 images, 3 per row
    with pytest.raises(CheckpointError, match="not a generator"):
        load_generator(detector_file)
    assert main(["generate", "--model", str(detector_file), "--n", "2", "--out", str(tmp_path / "x.png")]) == 2


# ------------------------------------------------------------------------------------------ bad input


def test_detector_file_that_is_not_a_classifier(trained, gen_cfg, tmp_path):
    _, _, result, _ = trained
    with pytest.raises(CheckpointError, match="'generator' model, not a classifier"):
        set_up(gen_cfg(**{"guide.detection_model": str(result.model_path)}))
    junk = tmp_path / "notes.pth"
    junk.write_text("not a model")
    with pytest.raises(CheckpointError, match="not an animeai model file"):
        set_up(gen_cfg(**{"guide.detection_model": str(junk)}))


def test_target_class_the_detector_does_not_know(gen_cfg):
    assert resolve_target_class("2", NAMES) == 2 and resolve_target_class("chiyo", NAMES) == 2
    with pytest.raises(ConfigError, match=r"--target-class 3 is out of range: .* 3 classes, ids 0 to 2"):
        set_up(gen_cfg(**{"guide.target_class": "3"}))
    with pytest.raises(ConfigError, match=r"--target-class 'nobody' is not a class .*0=akari, 1=botan, 2=chiyo"):
        set_up(gen_cfg(**{"guide.target_class": "nobody"}))


def test_character_without_real_images(gen_cfg, tmp_path):
    root = tmp_path / "data"
    for name in NAMES:
        (root / name).mkdir(parents=True)
    (root / "botan" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match=r"character 'botan': no usable image in .*botan \(all 1 files are "
                                           "unreadable"):
        set_up(gen_cfg(**{"data.root": str(root)}))
    with pytest.raises(DatasetError, match="character 'akari': no usable image .*the folder is empty"):
        set_up(gen_cfg(**{"data.root": str(root), "guide.target_class": "0"}))
    (root / "chiyo").rmdir()
    with pytest.raises(DatasetError, match="character 'chiyo': no folder"):
        set_up(gen_cfg(**{"data.root": str(root), "guide.target_class": "chiyo"}))


def test_real_images_come_from_the_train_folder_of_a_split_layout(gen_cfg, chars, tmp_path):
    import shutil

    root = tmp_path / "split"
    shutil.copytree(chars, root / "train")
    (root / "val" / "botan").mkdir(parents=True)
    task = set_up(gen_cfg(**{"data.root": str(root)}))
    assert task.real_folder == root / "train" / "botan" and len(task.dataset) == 8


def test_vgg16_weights_that_cannot_be_had_are_a_clear_error(gen_cfg, monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"vgg16: could not get its ImageNet weights .*URLError.*"
                                           r"--perceptual-pretrained PATH.*--perceptual efficientnet_lite0"):
        set_up(gen_cfg(**{"guide.perceptual": "vgg16", "guide.perceptual_pretrained": "hub"}))
    with pytest.raises(WeightsError, match="random weights would measure nothing"):
        create_perceptual("vgg16", "none")
    with pytest.raises(WeightsError, match="random weights would measure nothing"):
        create_perceptual("efficientnet_lite0", "none")
    junk = tmp_path / "vgg.safetensors"
    junk.write_bytes(b"nope")
    with pytest.raises(WeightsError):
        create_perceptual("vgg16", str(junk))


def test_vgg16_from_a_local_weights_file(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    full = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}  # torchvision's key layout
    path = tmp_path / "vgg16.safetensors"
    save_file(full, str(path))
    net = create_perceptual("vgg16", str(path))
    assert isinstance(net, VGG16Features) and isinstance(net, FrozenModule)
    assert net.pretrained_source == f"file:{path}"
    torch.testing.assert_close(net.features[0].weight, full["features.0.weight"])
    feats = net(torch.zeros(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]
    net.train()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    bad = tmp_path / "wrong.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(WeightsError, match="do not fit VGG16"):
        create_perceptual("vgg16", str(bad))


def test_ema_is_frozen_and_follows_the_generator():
    from animeai.models.gan import ema_update

    g = create_generator(image_size=32, z_dim=4, num_classes=1, embed_dim=2, channels=4, max_channels=8)
    ema = make_ema(g)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
    ema_update(ema, g, decay=0.999)  # first update: decay ramps from 0.1
    p_ema, p_g = next(ema.parameters()), next(g.parameters())
    torch.testing.assert_close(p_ema, p_g - 1.0 + 0.9, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ the job


def test_job_accepts_the_original_flag_names():
    p = build_job_parser()
    for argv in (["--target_class", "botan", "--num_epochs", "7", "--detection_model", "d.pth"],
                 ["--target-class", "botan", "--num-epochs", "7", "--detection-model", "d.pth"],
                 ["--target-class", "botan", "--epochs", "7", "--detection-model", "d.pth"]):
        cfg = config_from_args(GeneratorConfig, p.parse_args(argv))
        assert (cfg.guide.target_class, cfg.run.epochs, cfg.guide.detection_model) == ("botan", 7, "d.pth"), argv
    assert p.parse_args(["--smoke-test"]).smoke_test


def test_train_generator_is_a_cli_task():
    from animeai.cli import build_parser

    args = build_parser().parse_args(["train", "generator", "--target-class", "1", "--perc-weight", "5",
                                      "--discriminator", "plain", "--image-size", "64"])
    cfg = config_from_args(GeneratorConfig, args)
    assert (cfg.guide.target_class, cfg.loss.perc, cfg.model.discriminator, cfg.data.image_size) == \
        ("1", 5.0, "plain", 64)
    assert re.search(r"models/generator\.pth", cfg.run.out)


def test_job_trains_with_the_original_flags_and_resumes(chars, detector_file, tmp_path, capsys):
    from animeai.generation import job_main

    out, run = tmp_path / "job.pth", tmp_path / "job_run"
    tiny = ["--data", str(chars), "--image-size", "32", "--perceptual", "efficientnet_lite0",
            "--perceptual-pretrained", "package", "--z-dim", "16", "--class-embed-dim", "8", "--gen-channels", "8",
            "--gen-max-channels", "32", "--discriminator", "plain", "--disc-channels", "8", "--batch-size", "4",
            "--sample-every", "1", "--eval-samples", "8", "--samples-dir", str(tmp_path / "grids"), "--no-progress",
            "--out", str(out), "--run-dir", str(run)]
    assert job_main(["--target_class", "chiyo", "--num_epochs", "1", "--detection_model", str(detector_file),
                     *tiny]) == 0
    printed = capsys.readouterr().out  # epoch lines, then the JSON summary
    summary = json.loads(printed[printed.index("\n{") + 1:])
    assert summary["character"] == "chiyo" and summary["class_id"] == 2 and summary["model"] == str(out)
    assert summary["samples"] == str(tmp_path / "grids" / "chiyo" / "samples_epoch_1.png")
    # --resume continues with the run's saved config; only the epochs (and other safe keys) may change
    assert job_main(["--num_epochs", "2", "--resume", "--out", str(out), "--run-dir", str(run)]) == 0
    _, meta = read_model_file(out)
    assert meta["epoch"] == 2 and meta["character"] == "chiyo" and meta["discriminator"] == "plain"
    assert job_main(["--num_epochs", "3", "--resume", "--out", str(out), "--run-dir", str(run),
                     "--target_class", "akari"]) == 2
    assert "cannot change on --resume" in capsys.readouterr().err
    assert job_main(["--smoke-test", "--num-workers", "2"]) == 2


def test_job_refuses_relative_outputs_inside_a_submitted_ray_job(detector_file, tmp_path, monkeypatch, capsys):
    from animeai.generation import job_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_pkg.zip"}}))
    assert job_main(["--target_class", "0", "--num_epochs", "1", "--detection_model", str(detector_file)]) == 2
    err = capsys.readouterr().err
    assert "--out models/generators/" in err and "--samples-dir generated_images" in err and "vanish" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "models").exists()


def test_sample_grids_follow_sample_every_even_when_evaluation_is_sparser(loss_task, tmp_path):
    task, base = loss_task, loss_task.cfg
    task.cfg = with_overrides(base, {"sample.every": 2, "run.epochs": 9, "sample.folder": str(tmp_path)})
    try:
        task._last_grid_epoch = 2  # as after the first step of a run resumed at epoch 2
        for epoch in (3, 6, 7, 9):  # evaluation every 3 epochs, and at the last one
            task.train_sampler.set_epoch(epoch - 1)
            task.evaluate()
    finally:
        task.cfg = base
    written = sorted(int(p.stem.rsplit("_", 1)[1]) for p in (tmp_path / "botan").glob("samples_epoch_*.png"))
    assert written == [6, 9]  # 4 was reached by epoch 6; 7 reached nothing new; 8 by the last epoch, 9


def test_generator_schema_applies_in_a_reader_that_never_imported_the_generator(tmp_path):
    """`animeai info` imports only the checkpoint module: the generator schema still checks the file."""
    import subprocess
    import sys

    from animeai.checkpoint import save_model_file

    bad = tmp_path / "gen.pth"
    save_model_file(bad, {"w": torch.zeros(2)}, {"kind": "generator", "arch": "upsample_cnn", "generator": {},
                                                 "character": "akari", "class_names": ["akari", "botan"],
                                                 "class_id": 5, "image_size": 64, "z_dim": 8})
    code = ("import sys; from animeai.checkpoint import CheckpointError, read_model_file\n"
            f"try:\n    read_model_file({str(bad)!r})\nexcept CheckpointError as e:\n    print(e); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "class_id" in proc.stdout and str(bad) in proc.stdout
