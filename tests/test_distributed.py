"""Ray Train runs the same engine loop on 2 CPU workers: gradient sync, fault-tolerant resume, fail-fast errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from animeai.config import DetectorConfig, load_config  # noqa: E402
from animeai.distributed.trainer import DistributedError, DistributedOptions, fit, run_worker  # noqa: E402
from animeai.inference import Classifier  # noqa: E402

pytestmark = pytest.mark.ray


def _cfg(data_root: Path, tmp_path: Path, **extra) -> DetectorConfig:
    from conftest import small_overrides

    over = small_overrides(data_root, tmp_path, **{"optim.batch_size": 8, **extra})
    return load_config(DetectorConfig, None, over)


def _digest(task) -> str:
    h = hashlib.sha256()
    for k, v in sorted(task.unwrap("model").state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def digest_train_func(config):
    """Worker: the library's run_worker, plus a callback that records each rank's final weights."""
    import ray.train

    out = Path(config["cfg"]["run"]["run_dir"]).parent / "digests"
    out.mkdir(exist_ok=True)

    def record(metrics, state_dir, task):
        rank = ray.train.get_context().get_world_rank()
        world = task.accelerator.num_processes
        (out / f"rank{rank}.json").write_text(json.dumps({"epoch": metrics["epoch"], "digest": _digest(task),
                                                          "world": world}))

    run_worker(config, callbacks=[record])


def test_two_workers_train_in_sync_and_write_the_model_file(local_ray, synth_root, tmp_path):
    cfg = _cfg(synth_root, tmp_path, **{"run.epochs": 3})
    result = fit("detector", cfg, DistributedOptions(num_workers=2, storage_path=str(tmp_path / "ray")),
                 train_func=digest_train_func, scratch_dir=str(tmp_path / "scratch"))
    ranks = [json.loads((tmp_path / "digests" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]  # a real 2-process DDP group
    assert ranks[0]["epoch"] == ranks[1]["epoch"] == 3
    assert ranks[0]["digest"] == ranks[1]["digest"]  # gradients were all-reduced: identical weights
    history = [json.loads(line) for line in
               (tmp_path / "scratch" / "detector-model" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert result.metrics["epoch"] == 3
    clf = Classifier.from_file(cfg.run.out)  # the same model file as the local CLI writes
    assert clf.class_names == sorted(p.name for p in synth_root.iterdir() if p.is_dir())
    assert clf.meta["metrics"]["val_top1"] > 1 / 6


def crash_once_train_func(config):
    """Worker: on the first attempt, rank 0 kills its own process in the middle of epoch 3."""
    import ray.train

    from animeai.tasks.detector import DetectorTask

    marker = Path(config["cfg"]["run"]["run_dir"]).parent / "crashed"
    steps_per_epoch = config["cfg"]["run"]["max_steps_per_epoch"]
    original = DetectorTask.training_step
    calls = {"n": 0}

    def training_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 2 * steps_per_epoch + 2 and ray.train.get_context().get_world_rank() == 0 \
                and not marker.exists():
            marker.write_text("killed")
            # Ray's controller collects reports every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): let the epoch-2
            # checkpoint be committed, as it is in any real run where an epoch takes longer than that.
            time.sleep(4)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, batch)

    DetectorTask.training_step = training_step  # this worker process only
    run_worker(config)


def test_killed_worker_resumes_from_the_latest_checkpoint(local_ray, synth_root, tmp_path):
    cfg = _cfg(synth_root, tmp_path, **{"run.epochs": 4, "run.max_steps_per_epoch": 4})
    result = fit("detector", cfg, DistributedOptions(num_workers=2, max_failures=1,
                                                     storage_path=str(tmp_path / "ray")),
                 train_func=crash_once_train_func, scratch_dir=str(tmp_path / "scratch"))
    assert (tmp_path / "crashed").is_file()  # the failure really happened
    epochs = [json.loads(line)["epoch"] for line in
              (tmp_path / "scratch" / "detector-model" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]  # the run went on from the epoch-2 checkpoint: nothing lost or repeated
    assert result.metrics["epoch"] == 4
    clf = Classifier.from_file(cfg.run.out)
    assert clf.meta["epoch"] in (1, 2, 3, 4)


def test_more_workers_than_cpus_fails_fast(local_ray, synth_root, tmp_path):
    with pytest.raises(DistributedError, match="need 8 CPUs but the cluster has 2"):
        fit("detector", _cfg(synth_root, tmp_path), DistributedOptions(num_workers=8))
    with pytest.raises(DistributedError, match="GPU"):
        fit("detector", _cfg(synth_root, tmp_path), DistributedOptions(num_workers=1, use_gpu=True))


def test_missing_data_on_the_cluster_is_a_clear_error(local_ray, tmp_path):
    with pytest.raises(DistributedError, match="does not exist on the cluster"):
        fit("detector", _cfg(tmp_path / "nowhere", tmp_path), DistributedOptions(num_workers=1))


# ------------------------------------------------------------------------------------------- Ray Tune


def _sweep_file(tmp_path: Path, space: str) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(
        "task: detector\nmetric: val_top1\nmode: max\n"
        "base: {model: {arch: efficientnet_lite0, pretrained: package}, data: {image_size: 64, num_workers: 0},\n"
        "       optim: {batch_size: 16}, run: {epochs: 2}}\n" + space
    )
    return p


def test_sweep_file_errors_name_the_problem(tmp_path):
    from animeai.config import ConfigError
    from animeai.distributed.tune import load_sweep

    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_sweep(_sweep_file(tmp_path, "space:\n  optim.lrr: {choice: [0.1]}\n"))
    with pytest.raises(ConfigError, match="must be one of"):
        load_sweep(_sweep_file(tmp_path, "space:\n  optim.lr: {normal: [0, 1]}\n"))
    spec = load_sweep(_sweep_file(tmp_path, "space:\n  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"))
    assert spec.metric == "val_top1" and spec.mode == "max"


def test_tune_sweep_runs_trials_and_picks_the_best(local_ray, synth_root, tmp_path):
    from animeai.distributed.tune import format_table, load_sweep, summarize, sweep

    # lr 1e-3 learns in 2 epochs; lr 1e-7 cannot: the sweep must pick the former.
    spec = load_sweep(_sweep_file(tmp_path, "space:\n  optim.lr: {grid: [1.0e-7, 1.0e-3]}\n"))
    results = sweep(spec, data=str(synth_root), num_samples=1, cpus_per_trial=1.0, grace_period=2,
                    storage_path=str(tmp_path / "tune"), name="t")
    summary = summarize(results, spec)
    assert len(summary["trials"]) == 2 and all(t["error"] is None for t in summary["trials"])
    assert all(t["epochs"] == 2 for t in summary["trials"])
    assert summary["best"]["params"] == {"optim.lr": 1e-3}
    assert summary["best"]["val_top1"] == max(t["val_top1"] for t in summary["trials"])
    assert summary["best_config"]["optim"]["lr"] == 1e-3
    assert "optim.lr" in format_table(summary)


def test_job_command_lines_build_and_parse():
    from animeai.distributed.jobs import build_sweep_parser, build_train_parser

    args = build_train_parser("detector").parse_args(["--num-workers", "3", "--loader-workers", "1", "--lr", "0.01",
                                                       "--max-failures", "2", "--use-gpu"])
    assert (args.num_workers, getattr(args, "data.num_workers"), getattr(args, "optim.lr")) == (3, 1, 0.01)
    assert args.max_failures == 2 and args.use_gpu and args.check_resources
    sweep = build_sweep_parser().parse_args(["--sweep", "s.yaml", "--cpus-per-trial", "0.5"])
    assert sweep.cpus_per_trial == 0.5 and sweep.workers_per_trial == 1



def test_tune_trial_as_a_two_worker_torchtrainer(local_ray, synth_root, tmp_path):
    from animeai.distributed.tune import load_sweep, summarize, sweep

    spec = load_sweep(_sweep_file(tmp_path, "space:\n  optim.lr: {choice: [1.0e-3]}\n"))
    with pytest.raises(DistributedError, match="use --cpus-per-trial 0.99 or less"):
        sweep(spec, data=str(synth_root), num_samples=1, workers_per_trial=2, cpus_per_trial=1.0)
    results = sweep(spec, data=str(synth_root), num_samples=1, workers_per_trial=2, cpus_per_trial=0.99,
                    storage_path=str(tmp_path / "tune"), name="t2")
    summary = summarize(results, spec)
    assert len(summary["trials"]) == 1 and summary["trials"][0]["error"] is None
    assert summary["trials"][0]["epochs"] == 2 and summary["best"]["val_top1"] > 0


# ------------------------------------------------------------------------------- submitted-job paths

JOB_ENV = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"},
                      "metadata": {"job_submission_id": "raysubmit_test"}})


@pytest.fixture
def no_ray_work(monkeypatch):
    """The job mains may not reach Ray: connect/fit fail the test if called."""
    import animeai.distributed.trainer as trainer

    def forbidden(*a, **k):
        raise AssertionError("Ray work started before the paths were checked")

    monkeypatch.setattr(trainer, "connect", forbidden)
    monkeypatch.setattr(trainer, "fit", forbidden)


def test_submitted_job_refuses_relative_outputs_before_any_ray_work(monkeypatch, capsys, tmp_path, no_ray_work):
    from animeai.distributed.jobs import submitted_job, sweep_job_main, train_job_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", JOB_ENV)  # what Ray's job supervisor sets
    assert train_job_main("detector", ["--smoke-test"]) == 2  # default --out and --storage-path are relative
    err = capsys.readouterr().err
    assert "--out models/character_classifier.pth" in err and "--storage-path runs/ray" in err
    assert "raysubmit_test" in err and "deletes when the job ends" in err
    assert "absolute paths on storage every node sees" in err and "s3://" in err
    assert train_job_main("detector", ["--smoke-test", "--out", str(tmp_path / "m.pth")]) == 2
    err = capsys.readouterr().err
    assert "submitted Ray job (--storage-path runs/ray)" in err  # only the relative one is named
    # sweep: checked before the sweep file is even read
    assert sweep_job_main(["--sweep", "missing.yaml", "--out", "best.json", "--storage-path", "s3://b/p"]) == 2
    assert "--out best.json" in capsys.readouterr().err
    assert not (tmp_path / "models").exists() and not (tmp_path / "runs").exists()
    # detection: Ray's env var, or a cwd inside Ray's unpacked working_dir; neither outside a job
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert submitted_job() is None
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    assert submitted_job(environ={}, cwd=copy).temporary_cwd


def test_job_json_names_absolute_model_path_and_warns_on_relative_data(monkeypatch, capsys, tmp_path):
    import types

    import animeai.distributed.trainer as trainer
    from animeai.distributed.jobs import train_job_main

    seen = {}

    def fake_fit(task, cfg, opts, synthetic=None):
        seen.update(cfg=cfg, opts=opts)
        ckpt = types.SimpleNamespace(path="bucket/ray/detector-m/checkpoint_1")
        return types.SimpleNamespace(checkpoint=ckpt, metrics={"epoch": 1, "val_top1": 0.5})

    monkeypatch.setattr(trainer, "connect", lambda address=None: None)
    monkeypatch.setattr(trainer, "fit", fake_fit)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    # outside a submitted job a relative --out is fine, but the JSON names where the file really is
    argv = ["--data", "chars", "--out", "models/m.pth", "--storage-path", "s3://bucket/ray"]
    assert train_job_main("detector", argv) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out[out.out.index("{"):])
    assert summary["model"] == str(tmp_path / "models" / "m.pth") == seen["cfg"].run.out
    assert summary["checkpoint"] == "s3://bucket/ray/detector-m/checkpoint_1"
    assert seen["opts"].storage_path == "s3://bucket/ray" and "warning" not in out.err
    # inside one: absolute outputs accepted; relative data resolves in the temporary copy, with a warning
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", JOB_ENV)
    assert train_job_main("detector", ["--data", "chars", "--out", str(tmp_path / "abs.pth"),
                                       "--storage-path", str(tmp_path / "ray")]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out[out.out.index("{"):])["model"] == str(tmp_path / "abs.pth")
    assert "warning: --data chars is relative" in out.err and seen["cfg"].data.root == str(tmp_path / "chars")
    assert seen["opts"].storage_path == str(tmp_path / "ray")


def test_job_refuses_an_existing_model_file_and_resume_before_any_ray_work(monkeypatch, capsys, tmp_path,
                                                                           no_ray_work):
    from animeai.distributed.jobs import train_job_main

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    existing = tmp_path / "m.pth"
    existing.write_bytes(b"an earlier model")
    argv = ["--data", str(tmp_path), "--out", str(existing), "--storage-path", str(tmp_path / "ray")]
    assert train_job_main("detector", argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert train_job_main("detector", [*argv[:3], str(tmp_path / "new.pth"), *argv[4:], "--resume"]) == 2
    assert "--max-failures" in capsys.readouterr().err
    assert existing.read_bytes() == b"an earlier model"


def test_ray_train_per_report_lines_stay_off_the_console():
    import logging

    from animeai.distributed.trainer import quiet_ray_train_console

    records = []

    class Console(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    root = logging.getLogger()
    console = Console()
    console.set_name("console")  # the name Ray Train's dictConfig gives its console handler
    root.addHandler(console)
    try:
        quiet_ray_train_console("WARNING")
        quiet_ray_train_console("WARNING")  # a second worker run in the same process adds nothing
        assert len(console.filters) == 1
        # Ray 2.60 names this logger after the module's file, outside the ray.train hierarchy
        path_logger = logging.getLogger(os.path.join(os.sep, "x", "ray", "train", "v2", "context.py"))
        path_logger.setLevel(logging.INFO)  # Ray's worker root logger is at INFO
        path_logger.info("Reporting training result 1: TrainingReport(...)")
        path_logger.error("kept")
        logging.getLogger("user").warning("epoch 1/2")
    finally:
        root.removeHandler(console)
    assert records == ["kept", "epoch 1/2"]


def test_overwrite_starts_a_new_ray_run_instead_of_restoring_the_earlier_one(tmp_path, capsys):
    """Ray Train restores a run of the same name; --overwrite must not silently continue it."""
    from animeai.distributed.trainer import _fresh_run_name

    earlier = tmp_path / "detector-m"
    (earlier / "checkpoint_000001").mkdir(parents=True)
    assert _fresh_run_name(str(tmp_path), "detector-m", overwrite=False) == "detector-m"
    assert earlier.exists()  # without --overwrite a re-submitted job continues its run
    assert _fresh_run_name(str(tmp_path), "detector-m", overwrite=True) == "detector-m"
    assert not earlier.exists()
    fresh = _fresh_run_name("s3://bucket/ray", "detector-m", overwrite=True)
    assert fresh.startswith("detector-m-") and fresh != "detector-m"
    assert "new Ray run" in capsys.readouterr().err
