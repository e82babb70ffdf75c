"""Run-folder rules every task inherits from the engine: one run per folder (lock), no appending to or
clobbering an earlier run, checked resume state, diverged runs refused, intervals, and failures that leave the
run folder and the model file byte-for-byte as they were."""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from animeai.checkpoint import read_model_file
from animeai.config import ConfigError, RunConfig, opt, section, with_overrides
from animeai.engine import train
from animeai.runs import LOCK_FILE, RunError, TrainingDiverged, resume_config
from animeai.tasks.base import Task


@dataclass(frozen=True)
class RegConfig:
    run: RunConfig = section(RunConfig)
    lr: float = opt(0.05, "learning rate")
    nan_from_step: int = opt(-1, "training steps after this many return a NaN loss (-1: never)")


class RegressionTask(Task):
    """Linear regression on fixed data: fast, deterministic, with a switch that makes the loss NaN."""

    name = "regression"
    monitor = "val_mse"
    monitor_mode = "min"

    def setup(self, accelerator):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 3, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
        self.models = {"model": nn.Linear(3, 1)}
        self.optimizers = {"model": torch.optim.SGD(self.models["model"].parameters(), lr=self.cfg.lr)}
        self.train_loader = DataLoader(TensorDataset(x, y), batch_size=16)
        self.val_loader = DataLoader(TensorDataset(x, y), batch_size=64)
        self.steps = 0
        self.evaluated = 0

    def training_step(self, batch):
        x, y = batch
        loss = F.mse_loss(self.models["model"](x), y)
        self.steps += 1
        if 0 <= self.cfg.nan_from_step < self.steps:
            loss = loss * float("nan")
        return {"loss": loss}

    @torch.no_grad()
    def evaluate(self):
        self.evaluated += 1
        x, y = next(iter(self.val_loader))
        return {"val_mse": F.mse_loss(self.models["model"](x), y).item()}

    def export(self):
        return self.unwrap("model").state_dict(), {"kind": "regression"}

    def run_files(self):
        return {"notes.txt": "written at start\n"}


def make_cfg(tmp_path: Path, **over) -> RegConfig:
    base = RegConfig(run=RunConfig(epochs=2, out=str(tmp_path / "m.pth"), run_dir=str(tmp_path / "run"),
                                   progress=False))
    return with_overrides(base, over)


def snapshot(*paths: Path) -> dict[str, bytes]:
    """Every file under the given paths (but the lock file) with its bytes."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.exists() else []
        out.update({str(f): f.read_bytes() for f in files if f.name != LOCK_FILE})
    return out


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def finished(tmp_path):
    cfg = make_cfg(tmp_path)
    train(cfg, RegressionTask(cfg))
    return cfg, tmp_path / "run", tmp_path / "m.pth"


# ----------------------------------------------------------------------------------------- one run per folder


def test_a_new_run_over_a_finished_one_is_refused_and_changes_nothing(finished, tmp_path):
    cfg, run_dir, model = finished
    before = snapshot(run_dir, model)
    with pytest.raises(RunError, match="--resume.*--overwrite"):
        train(cfg, RegressionTask(cfg))
    assert snapshot(run_dir, model) == before


def test_a_new_run_writing_an_existing_model_file_is_refused(finished, tmp_path):
    _, _, model = finished
    cfg = make_cfg(tmp_path, **{"run.run_dir": str(tmp_path / "other_run")})
    with pytest.raises(RunError, match="exists"):
        train(cfg, RegressionTask(cfg))
    assert not (tmp_path / "other_run").exists()


def test_overwrite_starts_clean(finished, tmp_path):
    cfg, run_dir, model = finished
    (run_dir / "stray.txt").write_text("not the engine's")
    cfg3 = with_overrides(cfg, {"run.overwrite": True, "run.epochs": 3})
    result = train(cfg3, RegressionTask(cfg3))
    assert [m["epoch"] for m in lines(run_dir)] == [1, 2, 3]  # no lines of the earlier run
    assert read_model_file(model)[1]["config"]["run"]["epochs"] == 3
    assert result.best_metrics["epoch"] in (1, 2, 3)
    assert (run_dir / "stray.txt").exists()  # only the run's own files are removed


def test_a_second_concurrent_run_is_refused(tmp_path):
    cfg = make_cfg(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running run holds
    try:
        with pytest.raises(RunError, match="another run is using"):
            train(cfg, RegressionTask(cfg))
    finally:
        os.close(fd)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
    train(cfg, RegressionTask(cfg))  # the lock is gone with its holder


def test_a_run_that_fails_before_starting_leaves_no_folder(tmp_path):
    class Broken(RegressionTask):
        def setup(self, accelerator):
            raise ValueError("data missing")

    cfg = make_cfg(tmp_path)
    with pytest.raises(ValueError, match="data missing"):
        train(cfg, Broken(cfg))
    assert not (tmp_path / "run").exists() and not (tmp_path / "m.pth").exists()


def test_out_pointing_at_a_folder_fails_before_any_work(tmp_path):
    (tmp_path / "models").mkdir()
    cfg = make_cfg(tmp_path, **{"run.out": str(tmp_path / "models")})
    task = RegressionTask(cfg)
    with pytest.raises(RunError, match="is a folder"):
        train(cfg, task)
    assert not hasattr(task, "steps")  # setup never ran


# ----------------------------------------------------------------------------------------- resume


def test_resume_continues_and_trims_metrics_written_after_the_state(finished, tmp_path):
    cfg, run_dir, model = finished
    with open(run_dir / "metrics.jsonl", "a") as fh:  # a line written just before a crash, state never saved
        fh.write(json.dumps({"epoch": 3, "train_loss": 9.9}) + "\n")
    cfg4 = with_overrides(cfg, {"run.resume": True, "run.epochs": 4})
    result = train(cfg4, RegressionTask(cfg4))
    assert [m["epoch"] for m in result.history] == [3, 4]
    assert [m["epoch"] for m in lines(run_dir)] == [1, 2, 3, 4]
    assert lines(run_dir)[2]["train_loss"] != 9.9


def test_resume_config_takes_the_saved_config_and_refuses_unsafe_changes(finished, tmp_path):
    cfg, run_dir, model = finished
    paths = {"run.out": cfg.run.out, "run.run_dir": cfg.run.run_dir}
    resumed = resume_config(RegConfig, {**paths, "run.epochs": 5})
    assert resumed.run.epochs == 5 and resumed.run.resume and resumed.lr == cfg.lr
    before = snapshot(run_dir, model)
    with pytest.raises(RunError, match=r"--lr \(run: 0.05, now: 0.5\)"):
        resume_config(RegConfig, {**paths, "lr": 0.5})
    unsafe = with_overrides(cfg, {"run.resume": True, "lr": 0.5})  # the engine checks it too (Python API)
    with pytest.raises(RunError, match="cannot change on --resume"):
        train(unsafe, RegressionTask(unsafe))
    assert snapshot(run_dir, model) == before


def test_resume_refuses_when_the_best_model_file_is_gone(finished):
    cfg, run_dir, model = finished
    model.unlink()
    cfg = with_overrides(cfg, {"run.resume": True, "run.epochs": 3})
    with pytest.raises(RunError, match="best model file .* is missing"):
        train(cfg, RegressionTask(cfg))


def _damage_json(state: Path):
    (state / "trainer_state.json").write_text("{not json")
    return "trainer_state.json"


def _extra_key(state: Path):
    data = json.loads((state / "trainer_state.json").read_text())
    data["surprise"] = 1
    (state / "trainer_state.json").write_text(json.dumps(data))
    return "surprise"


def _truncate_optimizer(state: Path):
    f = state / "optimizer.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "optimizer.bin"


def _delete_weights(state: Path):
    (state / "model.safetensors").unlink()
    return "model.safetensors"


def _flip_weights(state: Path):
    f = state / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    return "model.safetensors"


@pytest.mark.parametrize("damage", [_damage_json, _extra_key, _truncate_optimizer, _delete_weights, _flip_weights])
def test_damaged_resume_state_is_a_clear_error_naming_the_file(finished, damage):
    cfg, run_dir, model = finished
    named = damage(run_dir / "state")
    before = snapshot(run_dir, model)
    cfg = with_overrides(cfg, {"run.resume": True, "run.epochs": 3})
    with pytest.raises(RunError) as err:
        train(cfg, RegressionTask(cfg))
    msg = str(err.value)
    assert named in msg and str(run_dir / "state") in msg and "--overwrite" in msg, msg
    assert snapshot(run_dir, model) == before


# ----------------------------------------------------------------------------------------- divergence


def test_a_nan_loss_stops_the_run_and_writes_no_model(tmp_path):
    cfg = make_cfg(tmp_path, nan_from_step=2)
    with pytest.raises(TrainingDiverged, match="epoch 1, batch 3.*nan"):
        train(cfg, RegressionTask(cfg))
    assert not (tmp_path / "m.pth").exists()


def test_a_nan_loss_after_a_good_epoch_keeps_the_good_model(tmp_path):
    cfg = make_cfg(tmp_path, nan_from_step=5, **{"run.epochs": 3})  # 4 batches per epoch: epoch 2 diverges
    with pytest.raises(TrainingDiverged):
        train(cfg, RegressionTask(cfg))
    tensors, meta = read_model_file(tmp_path / "m.pth")
    assert meta["epoch"] == 1 and all(torch.isfinite(t).all() for t in tensors.values())


def test_nonfinite_skip_skips_steps_then_gives_up(tmp_path):
    cfg = make_cfg(tmp_path, nan_from_step=3, **{"run.nonfinite": "skip", "run.epochs": 5})
    task = RegressionTask(cfg)
    with pytest.raises(TrainingDiverged, match="10 steps in a row"):
        train(cfg, task)
    history = lines(tmp_path / "run")
    assert history[0]["skipped_steps"] == 1 and history[1]["skipped_steps"] == 4
    w = read_model_file(tmp_path / "m.pth")[0]
    assert all(torch.isfinite(t).all() for t in w.values())


# ----------------------------------------------------------------------------------------- intervals


def test_eval_and_save_intervals(tmp_path):
    seen = []
    cfg = make_cfg(tmp_path, **{"run.epochs": 5, "run.eval_every": 2, "run.save_every": 3})
    task = RegressionTask(cfg)
    train(cfg, task, callbacks=[lambda m, state_dir, t: seen.append((m["epoch"], "val_mse" in m,
                                                                      state_dir is not None))])
    assert seen == [(1, False, False), (2, True, False), (3, False, True), (4, True, False), (5, True, True)]
    assert task.evaluated == 3
    assert json.loads((tmp_path / "run" / "state" / "trainer_state.json").read_text())["epoch"] == 5
    assert (tmp_path / "run" / "notes.txt").read_text() == "written at start\n"


def test_options_are_checked_where_the_config_is_built():
    with pytest.raises(ConfigError, match=r"run.eval_every' \(--eval-every\) must be >= 1"):
        with_overrides(RegConfig(), {"run.eval_every": 0})
    with pytest.raises(ConfigError, match="--overwrite"):
        RunConfig(resume=True, overwrite=True)
