"""The one training loop: learning, resume, accumulation, callbacks, and the task interface for
multi-model tasks (a GAN with alternating D/G steps; a frozen-teacher distillation)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from animeai.checkpoint import read_model_file
from animeai.config import RunConfig, opt, section
from animeai.engine import load_trainer_state, train
from animeai.runs import RunError
from animeai.tasks.base import Task
from animeai.tasks.detector import DetectorTask


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_detector_loss_goes_down_and_beats_chance(small_cfg):
    cfg = small_cfg(**{"run.epochs": 4})
    result = train(cfg, DetectorTask(cfg))
    losses = [m["train_loss"] for m in result.history]
    assert losses[-1] < losses[0]
    assert result.best_metrics["val_top1"] > 0.5  # 6 classes: chance is 0.167
    tensors, meta = read_model_file(result.model_path)
    assert meta["epoch"] == max(result.history, key=lambda m: m["val_top1"])["epoch"]
    assert meta["metrics"]["val_top1"] == result.best_metrics["val_top1"]
    assert meta["config"]["run"]["epochs"] == 4
    assert meta["class_names"] == sorted(p.name for p in cfg_root(cfg).iterdir() if p.is_dir())
    assert (result.run_dir / "config.yaml").is_file() and (result.run_dir / "split.json").is_file()


def cfg_root(cfg):
    from pathlib import Path

    return Path(cfg.data.root)


class Interrupt(Exception):
    pass


def test_resume_continues_from_the_right_epoch_and_matches_an_uninterrupted_run(small_cfg, tmp_path):
    def cfg_for(name, **extra):
        paths = {"run.run_dir": str(tmp_path / name), "run.out": str(tmp_path / f"{name}.pth")}
        return small_cfg(**{"run.epochs": 3, **paths, **extra})

    straight = cfg_for("a")
    train(straight, DetectorTask(straight))

    def crash_after_epoch_2(metrics, state_dir, task):
        if metrics["epoch"] == 2:
            raise Interrupt("simulated crash")

    crashing = cfg_for("b")
    with pytest.raises(Interrupt):
        train(crashing, DetectorTask(crashing), callbacks=[crash_after_epoch_2])
    assert load_trainer_state(tmp_path / "b" / "state").epoch == 2
    resumed_cfg = cfg_for("b", **{"run.resume": True})
    resumed = train(resumed_cfg, DetectorTask(resumed_cfg))

    assert [m["epoch"] for m in resumed.history] == [3]  # only the missing epoch ran
    assert [m["epoch"] for m in _history(tmp_path / "b")] == [1, 2, 3]  # nothing repeated, nothing lost
    a = load_file(str(tmp_path / "a" / "state" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "state" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=f"weights differ after resume: {k}")
    assert _history(tmp_path / "a")[-1]["train_loss"] == pytest.approx(_history(tmp_path / "b")[-1]["train_loss"])
    assert _history(tmp_path / "a")[-1]["lr"] == pytest.approx(_history(tmp_path / "b")[-1]["lr"])


def test_resume_without_saved_state_is_a_clear_error(small_cfg):
    cfg = small_cfg(**{"run.resume": True})
    with pytest.raises(RunError, match="no saved state"):
        train(cfg, DetectorTask(cfg))
    assert not cfg.run.resolved_run_dir().exists()  # a run that never started leaves no folder behind


def test_grad_accumulation_steps_and_metrics_callback(small_cfg):
    cfg = small_cfg(**{"run.epochs": 2, "run.grad_accum": 2, "run.max_steps_per_epoch": 5})
    seen = []

    def callback(metrics, state_dir, task):
        seen.append((metrics["epoch"], (state_dir / "trainer_state.json").is_file(), task.accelerator.num_processes))

    train(cfg, DetectorTask(cfg), callbacks=[callback])
    assert seen == [(1, True, 1), (2, True, 1)]
    # a truncated epoch ends on a whole accumulation cycle: 5 batches -> 4 -> 2 optimizer steps per epoch
    assert load_trainer_state(tmp_state(cfg)).global_step == 4


def test_full_epochs_with_accumulation_step_on_the_last_partial_cycle(small_cfg):
    cfg = small_cfg(**{"run.epochs": 2, "run.grad_accum": 4})
    task = DetectorTask(cfg)
    train(cfg, task)
    batches = len(task.train_loader)  # 114 images / 16 -> 7 batches: 2 steps per epoch (4 + the last 3)
    assert load_trainer_state(tmp_state(cfg)).global_step == 2 * -(-batches // 4)


def tmp_state(cfg):
    from pathlib import Path

    return Path(cfg.run.run_dir) / "state"


# ------------------------------------------------------------------ the interface for later tasks


@dataclass(frozen=True)
class ToyConfig:
    run: RunConfig = section(RunConfig)
    lr: float = opt(1e-2, "learning rate")


@dataclass(frozen=True)
class _Holder:
    run: RunConfig = field(default_factory=RunConfig)


def _toy_loaders(n=256, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n, dim, generator=g) * 0.3 + torch.tensor([2.0, -1.0])
    labels = torch.zeros(n, dtype=torch.long)
    ds = TensorDataset(real, labels)
    return DataLoader(ds, batch_size=32, shuffle=False), DataLoader(ds, batch_size=64)


class ToyGANTask(Task):
    """Two models, two optimizers, alternating D/G steps, metrics from an independent judge."""

    name = "toy_gan"
    monitor = "judge_distance"
    monitor_mode = "min"
    manual_optimization = True

    def setup(self, accelerator):
        torch.manual_seed(0)
        self.models = {"generator": nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)),
                       "discriminator": nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))}
        self.optimizers = {k: torch.optim.Adam(m.parameters(), lr=self.cfg.lr, betas=(0.5, 0.999))
                           for k, m in self.models.items()}
        self.train_loader, self.val_loader = _toy_loaders()
        self.d_steps = 0

    def training_step(self, batch):
        real, _ = batch
        acc = self.accelerator
        G, D = self.models["generator"], self.models["discriminator"]
        opt_g, opt_d = self.optimizers["generator"], self.optimizers["discriminator"]
        z = torch.randn(real.shape[0], 4, device=real.device)
        fake = G(z)
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        d_loss = F.binary_cross_entropy_with_logits(D(real), ones) + \
            F.binary_cross_entropy_with_logits(D(fake.detach()), zeros)
        acc.backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.d_steps += 1
        g_loss = F.binary_cross_entropy_with_logits(D(fake), ones)
        acc.backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        opt_d.zero_grad()  # G's backward also filled D's grads
        return {"loss": g_loss + d_loss, "d_loss": d_loss, "g_loss": g_loss}

    @torch.no_grad()
    def evaluate(self):
        z = torch.randn(512, 4, generator=torch.Generator().manual_seed(1))
        fake = self.models["generator"](z)
        return {"judge_distance": (fake.mean(0) - torch.tensor([2.0, -1.0])).norm().item()}

    def export(self):
        tensors = {f"{name}.{k}": v for name in self.models for k, v in self.unwrap(name).state_dict().items()}
        return tensors, {"kind": "toy_gan"}


def test_manual_optimization_gan_task_trains_both_models(tmp_path):
    run = RunConfig(epochs=6, out=str(tmp_path / "gan.pth"), run_dir=str(tmp_path / "run"), progress=False)
    cfg = ToyConfig(run=run)
    task = ToyGANTask(cfg)
    result = train(cfg, task)
    dist = [m["judge_distance"] for m in result.history]
    assert dist[-1] < dist[0] * 0.5, dist  # the generator moved towards the real distribution
    assert task.d_steps == 6 * 8
    tensors, meta = read_model_file(result.model_path)
    assert meta["kind"] == "toy_gan" and meta["task"] == "toy_gan"
    assert any(k.startswith("generator.") for k in tensors) and any(k.startswith("discriminator.") for k in tensors)


class ToyDistillTask(Task):
    """A frozen teacher, a trained student, soft labels (KL at temperature T)."""

    name = "toy_distill"
    monitor = "agreement"
    monitor_mode = "max"

    def setup(self, accelerator):
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 3)).requires_grad_(False).eval()
        student = nn.Linear(2, 3)
        self.teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
        self.models = {"student": student, "teacher": teacher}
        self.optimizers = {"student": torch.optim.SGD(student.parameters(), lr=0.5)}
        self.train_loader, self.val_loader = _toy_loaders(seed=2)

    def train_mode(self, mode=True):
        self.models["student"].train(mode)  # the teacher stays in eval mode

    def training_step(self, batch):
        x, _ = batch
        T = 2.0
        with torch.no_grad():
            soft = F.softmax(self.models["teacher"](x) / T, dim=1)
        log_p = F.log_softmax(self.models["student"](x) / T, dim=1)
        return {"loss": F.kl_div(log_p, soft, reduction="batchmean") * T * T}

    @torch.no_grad()
    def evaluate(self):
        x = next(iter(self.val_loader))[0]
        agree = (self.models["student"](x).argmax(1) == self.models["teacher"](x).argmax(1)).float().mean()
        return {"agreement": agree.item()}

    def export(self):
        return self.unwrap("student").state_dict(), {"kind": "toy_student"}


def test_frozen_teacher_distillation_task(tmp_path):
    run = RunConfig(epochs=4, out=str(tmp_path / "student.pth"), run_dir=str(tmp_path / "run"), progress=False)
    cfg = _Holder(run=run)
    task = ToyDistillTask(cfg)
    result = train(cfg, task)
    losses = [m["train_loss"] for m in result.history]
    assert losses[-1] < losses[0]
    for k, v in task.unwrap("teacher").state_dict().items():
        assert torch.equal(v, task.teacher_before[k]), f"teacher changed: {k}"
    assert not any(p.requires_grad for p in task.models["teacher"].parameters())
