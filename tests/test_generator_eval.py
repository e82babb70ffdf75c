"""Generator quality by networks it never trained against: independent judge, KID, diversity, `evaluate-generator`.

On the CPU at small size: 4 synthetic characters x 24 images, a guiding detector and an independent judge (Lite0
offline weights, 48 px, other seed and split) trained briefly, and a 32 px generator trained for 40 short epochs.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from animeai.checkpoint import CheckpointError, read_model_file, save_model_file
from animeai.data.folder import DatasetError
from animeai.gen_eval import (
    DEFAULT_FEATURE_SIZE,
    DEFAULT_FEATURES,
    REAL_SPLITS,
    EvaluationError,
    FeatureNet,
    check_judge,
    evaluate_generator,
    file_sha256,
    kernel_inception_distance,
    mean_pairwise_cosine_distance,
    mmd2_unbiased,
    real_images,
)

NAMES = ["akari", "botan", "chiyo", "daichi"]
FAST = {"n": 64, "feature_size": 64, "kid_subsets": 20, "device": "cpu"}  # evaluation settings of these tests


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_classifier(data: Path, out: Path, *, seed: int, split_seed: int) -> Path:
    from animeai.config import DetectorConfig, load_config
    from animeai.engine import train
    from animeai.tasks.detector import DetectorTask

    cfg = load_config(DetectorConfig, None, {
        "data.root": str(data), "data.image_size": 48, "data.num_workers": 0, "data.val_fraction": 0.25,
        "data.split_seed": split_seed, "model.arch": "efficientnet_lite0", "model.pretrained": "package",
        "optim.batch_size": 16, "run.epochs": 5, "run.seed": seed, "run.progress": False, "run.out": str(out),
        "run.run_dir": str(out.with_suffix("")) + "_run",
    })
    return train(cfg, DetectorTask(cfg)).model_path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Synthetic characters, the guiding detector (seed 1, split 0) and the independent judge (seed 7, split 3)."""
    from animeai.data.synthetic import make_synthetic_dataset

    work = tmp_path_factory.mktemp("gen_eval")
    make_synthetic_dataset(work / "chars", num_classes=4, images_per_class=24, image_size=64, seed=0)
    return {"work": work, "data": work / "chars",
            "detector": train_classifier(work / "chars", work / "detector.pth", seed=1, split_seed=0),
            "judge": train_classifier(work / "chars", work / "judge.pth", seed=7, split_seed=3)}


@pytest.fixture(scope="module")
def generators(world) -> dict[str, Path]:
    """A generator of 'akari' trained for 40 epochs (120 steps) guided by the detector, and an untrained one (same
    architecture and metadata, initial weights)."""
    from animeai.config import GeneratorConfig, load_config
    from animeai.engine import train
    from animeai.models.gan import create_generator
    from animeai.tasks.generator import GeneratorTask

    work, epochs = world["work"], 40
    cfg = load_config(GeneratorConfig, None, {
        "data.root": str(world["data"]), "data.image_size": 32, "guide.detection_model": str(world["detector"]),
        "guide.target_class": "akari", "guide.perceptual": "efficientnet_lite0",
        "guide.perceptual_pretrained": "package", "model.discriminator": "plain", "model.z_dim": 32,
        "model.embed_dim": 8, "model.g_channels": 16, "model.g_max_channels": 64, "model.d_channels": 16,
        "optim.batch_size": 8, "optim.g_lr": 1e-3, "optim.d_lr": 1e-3, "loss.cls": 0.5, "run.epochs": epochs,
        # the plain detector loss: the default --cls-augment (better on holo20 at 64 px) learns the class more
        # slowly, and 40 epochs at 32 px left the judge at 48 % instead of >= 50 % when it was switched on
        "guide.cls_augment": False,
        "run.eval_every": epochs, "run.save_every": epochs, "run.progress": False, "run.seed": 0,
        "sample.every": epochs, "sample.count": 16, "sample.eval_count": 16, "sample.folder": str(work / "grids"),
        "run.out": str(work / "akari.pth"), "run.run_dir": str(work / "akari_run"),
    })
    trained = train(cfg, GeneratorTask(cfg)).model_path
    _, meta = read_model_file(trained)
    torch.manual_seed(0)
    untrained = create_generator(meta["arch"], **meta["generator"])
    save_model_file(work / "untrained.pth", untrained.state_dict(), {**meta, "epoch": 0})
    return {"trained": trained, "untrained": work / "untrained.pth"}


# ---------------------------------------------------------------------------------------------- KID math


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_matches_torchmetrics_on_random_features():
    torchmetrics_kid = pytest.importorskip("torchmetrics.image.kid")
    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 24, generator=g, dtype=torch.float64).abs()
    fake = (torch.randn(50, 24, generator=g, dtype=torch.float64) * 1.3 + 0.2).abs()
    for seed, subsets, size in ((0, 7, 40), (3, 5, 50)):
        torch.manual_seed(seed)  # torchmetrics draws its subsets from the global generator
        metric = torchmetrics_kid.KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets,
                                                          subset_size=size)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        ref_mean, ref_std = metric.compute()
        ours = kernel_inception_distance(real, fake, subsets=subsets, subset_size=size, seed=seed)
        assert ours["subsets"] == subsets and ours["subset_size"] == size
        assert ours["mean"] == pytest.approx(ref_mean.item(), rel=1e-9, abs=1e-12)
        assert ours["std"] == pytest.approx(ref_std.item(), rel=1e-9, abs=1e-12)
        assert ours["mean"] > 0 and ours["std"] > 0
    # one subset of everything: exactly torchmetrics' unbiased polynomial MMD
    x, y = real[:50], fake
    ref = torchmetrics_kid.poly_mmd(x, y)
    assert mmd2_unbiased(x, y).item() == pytest.approx(ref.item(), rel=1e-12)


def test_unbiased_mmd_by_hand_with_unequal_set_sizes():
    x = torch.tensor([[1.0, 0.0], [0.5, 2.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[2.0, 1.0], [1.0, 1.0]], dtype=torch.float64)

    def k(a, b):  # (a.b / d + 1)^3, d = 2
        return (float(a @ b) / 2 + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    assert mmd2_unbiased(x, y).item() == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert mmd2_unbiased(x, y).item() == pytest.approx(mmd2_unbiased(y, x).item(), rel=1e-12)  # symmetric
    with pytest.raises(ValueError, match="at least 2"):
        mmd2_unbiased(x[:1], y)
    with pytest.raises(ValueError, match="subset size 4 must be in 2..2"):
        kernel_inception_distance(x, y, subset_size=4)
    with pytest.raises(ValueError, match="same d"):
        kernel_inception_distance(x, torch.ones(3, 5))


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shifted_one():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 32, generator=g), torch.randn(400, 32, generator=g)
    same = kernel_inception_distance(a, b, subsets=50, subset_size=200)
    shifted = kernel_inception_distance(a, b + 0.5, subsets=50, subset_size=200)
    assert abs(same["mean"]) < 3 * same["std"] + 1e-3  # unbiased: zero within its subset noise
    assert shifted["mean"] > 10 * max(abs(same["mean"]), same["std"])
    assert kernel_inception_distance(a, b + 1.0, subsets=50, subset_size=200)["mean"] > shifted["mean"]


def test_diversity_is_lower_for_a_collapsed_set():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert mean_pairwise_cosine_distance(v) == pytest.approx((1 + 2 + 1) / 3)  # pairs: 90, 180, 90 degrees
    g = torch.Generator().manual_seed(2)
    varied = torch.randn(64, 16, generator=g)
    collapsed = varied[:1] + 0.01 * torch.randn(64, 16, generator=g)
    assert mean_pairwise_cosine_distance(collapsed) < 0.01 < 0.5 < mean_pairwise_cosine_distance(varied)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_cosine_distance(varied[:1])


# ------------------------------------------------------------------------------------- feature network


@pytest.fixture(scope="module")
def feature_net() -> FeatureNet:
    return FeatureNet(DEFAULT_FEATURES, "package", image_size=64)


def test_feature_network_on_real_images(world, feature_net):
    """KID and diversity on the offline Lite0 features behave on images: one character's two halves are close, a
    different character is far; one image repeated has no diversity."""
    assert feature_net.describe()["weights"].startswith("package:") and feature_net.dim == 1280
    assert not any(p.requires_grad for p in feature_net.parameters())
    akari, _, _ = real_images(world["data"], "akari", 32)
    botan, _, _ = real_images(world["data"], "botan", 32)
    fa = feature_net.features(akari.images.float() / 127.5 - 1)
    fb = feature_net.features(botan.images.float() / 127.5 - 1)
    assert fa.shape == (24, 1280)
    same = kernel_inception_distance(fa[:12], fa[12:], subsets=20)["mean"]
    other = kernel_inception_distance(fa[:12], fb[:12], subsets=20)["mean"]
    assert other > 3 * max(same, 0) and other > 0
    repeated = fa[:1].expand(24, -1)
    assert mean_pairwise_cosine_distance(repeated) < 1e-6 < mean_pairwise_cosine_distance(fa)
    from animeai.weights import WeightsError

    with pytest.raises(WeightsError, match="random weights would measure nothing"):
        FeatureNet(DEFAULT_FEATURES, "none")


# ------------------------------------------------------------------------------ the independent judge


def test_a_trained_generator_is_recognised_by_an_independent_judge(world, generators):
    trained = evaluate_generator(generators["trained"], world["data"], world["judge"], **FAST)
    untrained = evaluate_generator(generators["untrained"], world["data"], world["judge"], **FAST)
    jt, ju = trained["judge"], untrained["judge"]
    assert jt["chance"] == 0.25 and jt["class_id"] == 0 and jt["num_classes"] == 4 and jt["seed"] == 7
    assert jt["real_recognition"] >= 0.75  # the judge knows the character's real images at 32 px
    # clearly above chance, and above the same generator untrained
    assert jt["recognition"] >= 0.5, trained
    assert jt["recognition"] >= ju["recognition"] + 0.3, (trained, untrained)
    assert jt["target_prob"] > ju["target_prob"]
    # the samples moved towards the real images in the feature network's space, without collapsing
    assert trained["kid"]["mean"] < untrained["kid"]["mean"]
    assert trained["diversity"]["samples"] > 0.05 and 0 < trained["diversity"]["ratio"] < 2
    assert jt["independence"]["verified"] and jt["independence"]["detector_sha256"] == file_sha256(world["detector"])
    _, meta = read_model_file(generators["trained"])
    assert meta["detection_model_sha256"] == file_sha256(world["detector"])  # recorded at training
    assert trained["real"]["images"] == 24 and trained["feature_network"]["name"] == DEFAULT_FEATURES


def test_evaluate_generator_cli_writes_the_report(world, generators, tmp_path, capsys):
    from animeai.cli import build_parser, main

    out = tmp_path / "report.json"
    assert main(["evaluate-generator", "--model", str(generators["trained"]), "--data", str(world["data"]),
                 "--judge", str(world["judge"]), "--n", "16", "--seed", "3", "--feature-size", "48",
                 "--kid-subsets", "5", "--device", "cpu", "--out", str(out), "--also-judge", str(world["judge"])]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 16 and report["seed"] == 3 and report["character"] == "akari"
    assert {"recognition", "target_prob", "chance", "real_recognition"} <= set(report["judge"])
    assert report["kid"]["subsets"] == 5 and report["kid"]["subset_size"] == 16
    assert {"samples", "real", "ratio"} <= set(report["diversity"]) and report["feature_network"]["input_size"] == 48
    err = capsys.readouterr().err
    assert "judge recognition" in err and f"also judged by {world['judge']}" in err
    assert report["also_judges"][0]["recognition"] == report["judge"]["recognition"]
    args = build_parser().parse_args(["evaluate-generator", "--model", "g", "--data", "d", "--judge", "j"])
    assert (args.n, args.features, args.feature_size, args.real_split) == (256, DEFAULT_FEATURES,
                                                                          DEFAULT_FEATURE_SIZE, "train")
    assert build_parser()._subparsers._group_actions[0].choices["evaluate-generator"]._option_string_actions[
        "--real-split"].choices == REAL_SPLITS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate-generator", "--model", "g", "--data", "d", "--judge", "j", "--n", "1"])


# ------------------------------------------------------------------------------------------ bad input


def test_the_guiding_detector_is_refused_as_judge(world, generators, tmp_path):
    from animeai.cli import main

    gen = generators["trained"]
    with pytest.raises(EvaluationError, match=r"is the detector the generator .* was guided by.*same file content"):
        evaluate_generator(gen, world["data"], world["detector"], **FAST)
    copy = tmp_path / "renamed_copy.pth"
    shutil.copy(world["detector"], copy)
    with pytest.raises(EvaluationError, match="renamed_copy.pth is the detector"):
        evaluate_generator(gen, world["data"], copy, **FAST)
    # the same weights saved with other metadata (another file hash): refused by the weights
    tensors, meta = read_model_file(world["detector"])
    resaved = tmp_path / "resaved.pth"
    save_model_file(resaved, tensors, {**meta, "note": "re-saved"})
    with pytest.raises(EvaluationError, match="same weights"):
        evaluate_generator(gen, world["data"], resaved, **FAST)
    # the detector file moved away: the hash recorded in the generator file still recognises a copy
    _, gmeta = read_model_file(gen)
    moved = {**gmeta, "detection_model": str(tmp_path / "gone.pth")}
    with pytest.raises(EvaluationError, match="same file content"):
        check_judge(copy, moved, gen)
    assert check_judge(world["judge"], moved, gen)["verified"]
    # an older generator file without the hash, whose detector is gone: evaluated, but flagged as unverified
    old = {k: v for k, v in moved.items() if k != "detection_model_sha256"}
    info = check_judge(world["judge"], old, gen)
    assert not info["verified"] and "could not verify" in info["note"]
    assert main(["evaluate-generator", "--model", str(gen), "--data", str(world["data"]), "--judge",
                 str(world["detector"]), "--n", "4"]) == 2


def test_judge_that_is_not_a_classifier_or_does_not_know_the_character(world, generators, tmp_path):
    gen = generators["trained"]
    with pytest.raises(CheckpointError, match=r"untrained.pth: holds a 'generator' model, not a classifier"):
        evaluate_generator(gen, world["data"], generators["untrained"], **FAST)
    junk = tmp_path / "judge.pth"
    junk.write_text("not a model")
    with pytest.raises(CheckpointError, match=r"judge.pth: not an animeai model file"):
        evaluate_generator(gen, world["data"], junk, **FAST)
    # other classes in another order are fine when the character's name is among them; a missing name is an error
    tensors, meta = read_model_file(world["judge"])
    strangers = tmp_path / "strangers.pth"
    save_model_file(strangers, tensors, {**meta, "class_names": ["botan", "chiyo", "daichi", "emi"]})
    with pytest.raises(EvaluationError, match=r"strangers.pth does not know the generator's character 'akari' "
                                              r"\(classes are matched by name\); its classes: botan, chiyo"):
        evaluate_generator(gen, world["data"], strangers, **FAST)
    reordered = tmp_path / "reordered.pth"
    order = [3, 2, 1, 0]
    head = {k: (v[order] if k.startswith("classifier.") else v) for k, v in tensors.items()}
    save_model_file(reordered, head, {**meta, "class_names": [NAMES[i] for i in order]})
    a = evaluate_generator(gen, world["data"], reordered, **{**FAST, "n": 16})
    b = evaluate_generator(gen, world["data"], world["judge"], **{**FAST, "n": 16}, also_judges=[reordered])
    assert a["judge"]["class_id"] == 3 and b["judge"]["class_id"] == 0
    assert a["judge"]["recognition"] == b["judge"]["recognition"]
    # another judge scores the same samples and real images as it would as the main judge
    (other,) = b["also_judges"]
    assert other["model"] == str(reordered) and other["recognition"] == a["judge"]["recognition"]
    assert other["real_recognition"] == a["judge"]["real_recognition"]
    with pytest.raises(EvaluationError, match=r"strangers.pth does not know the generator's character 'akari'"):
        evaluate_generator(gen, world["data"], world["judge"], **FAST, also_judges=[strangers])
    with pytest.raises(EvaluationError, match="is the detector"):  # not as an extra judge either
        evaluate_generator(gen, world["data"], world["judge"], **FAST, also_judges=[world["detector"]])
    assert a["judge"]["target_prob"] == pytest.approx(b["judge"]["target_prob"], abs=1e-6)


def test_generator_file_that_is_not_a_generator(world):
    with pytest.raises(CheckpointError, match=r"judge.pth: holds a 'classifier' model, not a generator"):
        evaluate_generator(world["judge"], world["data"], world["judge"], **FAST)


def test_data_without_real_images_of_the_character(world, generators, tmp_path):
    gen, judge = generators["trained"], world["judge"]
    empty = tmp_path / "data"
    (empty / "akari").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"character 'akari': no usable image in .*akari \(the folder is empty"):
        evaluate_generator(gen, empty, judge, **FAST)
    (empty / "akari").rmdir()
    (empty / "botan").mkdir()
    with pytest.raises(DatasetError, match=r"character 'akari': no folder .*akari"):
        evaluate_generator(gen, empty, judge, **FAST)
    with pytest.raises(DatasetError, match="dataset folder not found"):
        evaluate_generator(gen, tmp_path / "nowhere", judge, **FAST)
    with pytest.raises(DatasetError, match=r"--real-split val needs held-out images"):
        evaluate_generator(gen, world["data"], judge, **{**FAST, "real_split": "val"})
