"""The detector's metric-learning option (--metric-weight): the cosine-proxy loss, the pooled-feature tap, and a
detector trained with it (file, resume, the embedding the online system reads)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from animeai.checkpoint import read_model_file
from animeai.config import ConfigError, DetectorConfig, load_config
from animeai.engine import train
from animeai.models import create_model
from animeai.models.metric import CosineProxyLoss, PooledFeatures
from animeai.tasks.detector import DetectorTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cosine_proxy_loss_equals_a_hand_computation():
    loss_fn = CosineProxyLoss(3, 2, scale=10.0, margin=0.2)
    with torch.no_grad():
        loss_fn.proxies.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]]))
    feats = torch.tensor([[1.0, 1.0], [0.0, -5.0]])
    labels = torch.tensor([0, 2])
    r = 1 / math.sqrt(2)
    # cosines: sample 0 -> (r, r, -1), sample 1 -> (0, -1, r); the true class loses the margin
    logits = [[10 * (r - 0.2), 10 * r, -10.0], [0.0, -10.0, 10 * (r - 0.2)]]
    expected = sum(-math.log(math.exp(row[y]) / sum(math.exp(v) for v in row)) for row, y in zip(logits, [0, 2])) / 2
    assert loss_fn(feats, labels).item() == pytest.approx(expected, rel=1e-5)


def test_cosine_proxy_loss_ignores_feature_length_and_margin_raises_it():
    torch.manual_seed(0)
    feats, labels = torch.randn(8, 16), torch.randint(0, 4, (8,))
    plain, margin = CosineProxyLoss(4, 16, margin=0.0), CosineProxyLoss(4, 16, margin=0.3)
    margin.load_state_dict(plain.state_dict())
    assert plain(feats, labels).item() == pytest.approx(plain(5 * feats, labels).item(), rel=1e-5)
    assert margin(feats, labels).item() > plain(feats, labels).item()


def test_cosine_proxy_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="scale"):
        CosineProxyLoss(3, 4, scale=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        CosineProxyLoss(0, 4)


def test_pooled_features_are_what_the_online_system_embeds():
    model = create_model("efficientnet_lite0", 3, drop_rate=0.5).eval()
    tap = PooledFeatures(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        pooled = tap.take()
        with pytest.raises(RuntimeError, match="no pooled features"):
            tap.take()  # taken once: a stale batch is never reused
        embedded = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(pooled, embedded)
    torch.testing.assert_close(tap.take(), embedded)  # forward_head pools through the same module
    tap.remove()
    with torch.no_grad():
        model(x)
    assert tap.value is None


def test_pooled_features_need_a_global_pool():
    with pytest.raises(ValueError, match="global_pool"):
        PooledFeatures(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("key,value", [("metric.weight", -1.0), ("metric.scale", 0.0), ("metric.margin", 1.0)])
def test_metric_settings_are_checked(key, value):
    flag = "--metric-" + key.split(".")[1]
    with pytest.raises(ConfigError, match=flag):
        load_config(DetectorConfig, None, {key: value})


def test_training_step_adds_the_weighted_metric_loss(small_cfg):
    cfg = small_cfg(**{"metric.weight": 0.5, "run.epochs": 1})
    task = DetectorTask(cfg)

    class Acc:  # the parts of an Accelerator that setup uses
        is_main_process = False
        device = torch.device("cpu")

    task.setup(Acc())
    images, labels = next(iter(task.train_loader))
    torch.manual_seed(0)
    logs = task.training_step((images, labels))
    assert logs["loss"].item() == pytest.approx(logs["ce_loss"].item() + 0.5 * logs["metric_loss"].item(), rel=1e-5)
    # the proxies are trained by the one optimizer, without weight decay
    proxy_groups = [g for g in task.optimizers["model"].param_groups
                    if any(p is task.models["metric"].proxies for p in g["params"])]
    assert len(proxy_groups) == 1 and proxy_groups[0]["weight_decay"] == 0.0
    # the metric term alone reaches the backbone
    model = task.models["model"]
    model.zero_grad()
    model(images)
    task.models["metric"](task.pooled.take(), labels).backward()
    grad = model.blocks[-1][0].conv_pw.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.classifier.weight.grad is None  # ... through the features, not the head


def test_detector_with_metric_loss_trains_resumes_and_writes_a_plain_classifier(small_cfg, tmp_path):
    def cfg_for(name, **extra):
        paths = {"run.run_dir": str(tmp_path / name), "run.out": str(tmp_path / f"{name}.pth")}
        return small_cfg(**{"metric.weight": 1.0, "run.epochs": 2, **paths, **extra})

    cfg = cfg_for("a", **{"run.epochs": 1})
    train(cfg, DetectorTask(cfg))
    state = load_file(str(tmp_path / "a" / "state" / "model_1.safetensors"))  # accelerate numbers the 2nd model
    assert set(state) == {"proxies"} and state["proxies"].shape == (6, 1280)
    resumed = cfg_for("a", **{"run.resume": True})
    result = train(resumed, DetectorTask(resumed))
    assert [m["epoch"] for m in result.history] == [2]

    tensors, meta = read_model_file(tmp_path / "a.pth")
    plain = small_cfg(**{"run.epochs": 1, "run.run_dir": str(tmp_path / "p"), "run.out": str(tmp_path / "p.pth")})
    train(plain, DetectorTask(plain))
    plain_tensors, plain_meta = read_model_file(tmp_path / "p.pth")
    assert set(tensors) == set(plain_tensors)  # the proxies stay out of the model file
    assert meta["metric_loss"] == {"kind": "cosine_proxy", "weight": 1.0, "scale": 16.0, "margin": 0.1}
    assert "metric_loss" not in plain_meta
    assert meta["kind"] == "classifier" and meta["class_names"] == plain_meta["class_names"]
