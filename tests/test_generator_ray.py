"""Generators on Ray: one generator per character as concurrent Ray tasks (retries, summary), the Tune sweep of the
loss weights ranked by an independent judge, and bad input refused before Ray starts.

Tiny generators at 32 px, 2 epochs, 3 synthetic characters of 8 images, on a local Ray of 2 CPUs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from animeai.checkpoint import read_model_file, save_model_file  # noqa: E402
from animeai.config import ConfigError, GeneratorConfig, load_config  # noqa: E402
from animeai.distributed.fanout import (  # noqa: E402
    FanoutOptions,
    resolve_classes,
    sweep_generator_main,
    train_character,
    train_generators,
    train_generators_main,
)
from animeai.models import create_model, get_model_spec  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]
NAMES = ["akari", "botan", "chiyo"]




@pytest.fixture(scope="module")
def chars(tmp_path_factory) -> Path:
    """3 synthetic characters x 8 images; 'chiyo' has its folder but no image left (a character that must fail)."""
    from animeai.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ray_gen_chars") / "chars"
    make_synthetic_dataset(root, num_classes=3, images_per_class=8, image_size=48, seed=0)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == NAMES
    for f in (root / "chiyo").iterdir():
        f.unlink()
    return root


def _classifier_file(path: Path, seed: int) -> Path:
    """A classifier model file as the detector task writes it (Lite0 offline weights, a new 3-class head, 32 px)."""
    torch.manual_seed(seed)
    model = create_model("efficientnet_lite0", len(NAMES), pretrained="package")
    spec = get_model_spec("efficientnet_lite0")
    save_model_file(path, model.state_dict(), {
        "kind": "classifier", "arch": "efficientnet_lite0", "num_classes": len(NAMES), "class_names": NAMES,
        "image_size": 32, "mean": list(spec.mean), "std": list(spec.std),
    })
    return path


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory) -> Path:
    return _classifier_file(tmp_path_factory.mktemp("det") / "detector.pth", seed=0)


@pytest.fixture(scope="module")
def judge_file(tmp_path_factory) -> Path:
    return _classifier_file(tmp_path_factory.mktemp("judge") / "judge.pth", seed=1)  # another head: independent


TINY = ["--image-size", "32", "--perceptual", "efficientnet_lite0", "--perceptual-pretrained", "package",
        "--z-dim", "16", "--class-embed-dim", "8", "--gen-channels", "8", "--gen-max-channels", "32",
        "--disc-channels", "8", "--disc-pretrained", "package", "--batch-size", "4", "--sample-every", "1",
        "--sample-count", "4", "--eval-samples", "8"]


def _tiny_cfg(chars: Path, detector: Path, out: Path, **extra) -> GeneratorConfig:
    over = {"data.root": str(chars), "data.image_size": 32, "guide.detection_model": str(detector),
            "guide.perceptual": "efficientnet_lite0", "guide.perceptual_pretrained": "package", "model.z_dim": 16,
            "model.embed_dim": 8, "model.g_channels": 8, "model.g_max_channels": 32, "model.d_channels": 8,
            "model.d_pretrained": "package", "optim.batch_size": 4, "run.epochs": 2, "run.progress": False,
            "sample.every": 1, "sample.count": 4, "sample.eval_count": 8,
            "sample.folder": str(out / "generated_images")}
    over.update(extra)
    return load_config(GeneratorConfig, None, over)


# ------------------------------------------------------------------------------------------- class lists


def test_class_lists_resolve_names_ids_all_and_refuse_unknown_or_empty():
    names = ["akari", "botan", "Hoshimachi Suisei", "7"]
    assert resolve_classes("all", names) == list(enumerate(names))
    assert resolve_classes(["akari,1", "2"], names) == [(0, "akari"), (1, "botan"), (2, "Hoshimachi Suisei")]
    assert resolve_classes(["akari botan", "Hoshimachi Suisei"], names) == [(0, "akari"), (1, "botan"),
                                                                            (2, "Hoshimachi Suisei")]
    assert resolve_classes(["7", "akari", "0"], names) == [(3, "7"), (0, "akari")]  # a name first; duplicates go
    with pytest.raises(ConfigError, match=r"'dana', '9' are not classes of the detector \(4 classes, ids 0 to 3"):
        resolve_classes("akari,dana,9", names)
    for empty in ("", [" , "], []):
        with pytest.raises(ConfigError, match="--classes is empty"):
            resolve_classes(empty, names)


# ------------------------------------------------------------------------------------------- the fan-out


def test_fanout_job_trains_each_character_and_reports_a_failed_one(local_ray, chars, detector_file, judge_file,
                                                                   tmp_path, capsys):
    out_dir, runs_dir, samples = tmp_path / "models", tmp_path / "runs", tmp_path / "grids"
    summary_file = tmp_path / "summary.json"
    argv = ["--classes", "akari,chiyo", "botan", "--data", str(chars), "--detection_model", str(detector_file),
            "--num_epochs", "2", *TINY, "--out-dir", str(out_dir), "--runs-dir", str(runs_dir), "--samples-dir",
            str(samples), "--summary-out", str(summary_file), "--cpus-per-generator", "1", "--max-retries", "1",
            "--judge", str(judge_file), "--judge-samples", "8"]
    assert train_generators_main(argv) == 1  # one character failed: the job says so, the others are trained
    printed = capsys.readouterr().out
    summary = json.loads(summary_file.read_text())
    rows = {r["character"]: r for r in summary["characters"]}
    assert [r["character"] for r in summary["characters"]] == ["akari", "chiyo", "botan"]  # the order asked
    assert (summary["ok"], summary["failed"]) == (2, 1)
    for name, class_id in (("akari", 0), ("botan", 1)):
        row = rows[name]
        assert row["status"] == "ok" and row["attempts"] == 1 and row["error"] is None and row["epochs"] == 2
        assert row["model"] == str(out_dir / f"{name}.pth") and row["run_dir"] == str(runs_dir / name)
        _, meta = read_model_file(row["model"])
        assert meta["kind"] == "generator" and meta["character"] == name and meta["class_id"] == class_id
        assert meta["epoch"] == 2 and meta["detection_model"] == str(detector_file)
        assert (runs_dir / name / "metrics.jsonl").is_file()
        assert row["samples"] == str(samples / name / "samples_epoch_2.png") and Path(row["samples"]).is_file()
        assert set(row["scores"]) == {"recognition", "target_prob", "perc_dist", "judge_recognition",
                                      "judge_target_prob"}
        assert 0.0 <= row["scores"]["judge_recognition"] <= 1.0
    failed = rows["chiyo"]
    assert failed["status"] == "failed" and failed["attempts"] == 2  # retried once, then reported
    assert len(failed["errors"]) == 2 and all("DatasetError" in e and "no usable image" in e for e in failed["errors"])
    assert failed["error"] == failed["errors"][-1] and not (out_dir / "chiyo.pth").exists()
    assert summary["resources"] == {"cpus_per_generator": 1.0, "gpus_per_generator": 0.0, "threads_per_generator": 1,
                                    "max_retries": 1}
    assert summary["out_dir"] == str(out_dir) and summary["samples_dir"] == str(samples)
    header = next(line for line in printed.splitlines() if line.startswith("character"))
    assert "judge_recognition" in header and "recognition" in header
    assert "2 of 3 generators trained" in printed
    # a second run over the same outputs is refused without --overwrite, before any Ray work
    assert train_generators_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --resume with more epochs continues each trained character from its saved state
    more = [("3" if a == "2" and argv[i - 1] == "--num_epochs" else a) for i, a in enumerate(argv)]
    more[more.index("--classes") + 1: more.index("--classes") + 3] = ["akari,botan"]
    assert train_generators_main([*more, "--resume"]) == 0
    summary = json.loads(summary_file.read_text())
    assert [(r["character"], r["status"], r["epochs"], r["resumed"]) for r in summary["characters"]] == [
        ("akari", "ok", 3, True), ("botan", "ok", 3, True)]
    for name in ("akari", "botan"):
        lines = (runs_dir / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
        assert read_model_file(out_dir / f"{name}.pth")[1]["epoch"] == 3


def crash_once_train_fn(job):
    """Fan-out task body: the first attempt of 'botan' trains 1 epoch (saving its state), then its worker process
    dies; every other attempt is the library's."""
    if job["character"] == "botan" and job["attempt"] == 1:
        cfg = dict(job["cfg"], run={**job["cfg"]["run"], "epochs": 1})
        train_character({**job, "cfg": cfg})
        os._exit(3)  # a lost worker, not a Python exception
    return train_character(job)


def test_a_lost_worker_is_retried_and_resumes_the_character(local_ray, chars, detector_file, tmp_path):
    cfg = _tiny_cfg(chars, detector_file, tmp_path)
    lines = []
    rows = train_generators(cfg, ["akari", "botan"], tmp_path / "models", tmp_path / "runs",
                            FanoutOptions(cpus_per_generator=1.0, max_retries=1), train_fn=crash_once_train_fn,
                            log=lines.append)
    by = {r["character"]: r for r in rows}
    assert by["akari"]["status"] == "ok" and by["akari"]["attempts"] == 1
    botan = by["botan"]
    assert botan["status"] == "ok" and botan["attempts"] == 2 and len(botan["errors"]) == 1
    assert "botan: attempt 1 failed" in "\n".join(lines)
    assert botan["resumed"] is True and botan["epochs"] == 2  # went on from the state saved after epoch 1
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "runs" / "botan" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    _, meta = read_model_file(tmp_path / "models" / "botan.pth")
    assert meta["character"] == "botan" and meta["epoch"] == 2


# ------------------------------------------------------------------------------------------- the sweep


def test_sweep_smoke_runs_two_trials_and_writes_the_best_weights_by_the_judge(local_ray, tmp_path, capsys):
    out = tmp_path / "best.json"
    argv = ["--smoke-test", "--epochs", "4", "--out", str(out), "--storage-path", str(tmp_path / "tune"),
            "--cpus-per-trial", "1", "--judge-samples", "16", "--grace-period", "4"]
    assert sweep_generator_main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert summary["metric"] == "judge_recognition" and summary["mode"] == "max"
    assert len(summary["trials"]) == 2 and all(t["error"] is None for t in summary["trials"])
    assert all(t["epochs"] == 4 and 0.0 <= t["judge_recognition"] <= 1.0 for t in summary["trials"])
    # each trial reported at its evaluation epochs only (the smoke test evaluates every 2nd), with the judge's score
    results = sorted((tmp_path / "tune" / "sweep_generator").glob("*/result.json"))
    assert len(results) == 2
    for path in results:
        reports = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["epoch"] for r in reports] == [2, 4] and all("judge_recognition" in r for r in reports)
    assert summary["best"]["judge_recognition"] == max(t["judge_recognition"] for t in summary["trials"])
    assert set(summary["best_weights"]) == {"loss.adv", "loss.cls", "loss.perc"}
    for key, value in summary["best"]["params"].items():
        assert summary["best_weights"][key] == value
    assert summary["judge"] != summary["detection_model"] and Path(summary["judge"]).is_file()
    assert "recognition" in summary["extra_metrics"]  # the guiding detector's view: listed, never ranking
    assert "judge_recognition" in printed and "best judge_recognition" in printed


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_ray_work(monkeypatch):
    """The job mains may not reach Ray (nor train a smoke detector): fail the test if they do."""
    import animeai.distributed.trainer as trainer
    import animeai.generation as generation

    def forbidden(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(trainer, "connect", forbidden)
    monkeypatch.setattr(generation, "make_smoke_setup", forbidden)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)


def test_bad_input_is_a_clear_error_before_ray_starts(no_ray_work, chars, detector_file, judge_file, tmp_path,
                                                      capsys, monkeypatch):
    base = ["--data", str(chars), "--detection-model", str(detector_file), "--out-dir", str(tmp_path / "m"),
            "--runs-dir", str(tmp_path / "r")]

    GUIDING = "is the detector the generator trained here was guided by"  # noqa: N806

    def refused(argv, main=train_generators_main) -> str:
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "'dana' is not a class of the detector" in refused([*base, "--classes", "akari,dana"])
    assert "0=akari, 1=botan, 2=chiyo" in refused([*base, "--classes", "7"])
    assert "--classes is empty" in refused([*base, "--classes", ""])
    assert "--classes is empty" in refused(["--smoke-test", "--classes", ","])  # before the smoke data is made
    assert "use --out-dir" in refused([*base, "--out", str(tmp_path / "g.pth")])
    assert "use --classes" in refused([*base, "--target-class", "akari"])
    assert GUIDING in refused([*base, "--judge", str(detector_file)])
    assert "no such file" in refused([*base[:2], "--detection-model", str(tmp_path / "none.pth"), *base[4:]])
    # inside a submitted job, relative outputs (the default --samples-dir included) are refused
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_t"}}))
    err = refused(base)
    assert "relative output path in a submitted Ray job" in err and "--samples-dir generated_images" in err
    assert "--summary-out" not in err  # its default, <runs-dir>/summary.json, is absolute here
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    # the sweep: a judge is required, must not be the detector, and the metric must be the judge's
    sweep = ["--data", str(chars), "--detection-model", str(detector_file), "--target-class", "akari"]
    assert "--judge is required" in refused(sweep, sweep_generator_main)
    assert GUIDING in refused([*sweep, "--judge", str(detector_file)], sweep_generator_main)
    bad = tmp_path / "bad_sweep.yaml"
    bad.write_text("task: generator\nmetric: recognition\nmode: max\nspace:\n  loss.adv: {choice: [0.1]}\n")
    err = refused([*sweep, "--judge", str(judge_file), "--sweep", str(bad)], sweep_generator_main)
    assert "metric 'recognition' cannot rank generators" in err and "judge_recognition" in err
    assert "not a class" in refused([*sweep[:-1], "dana", "--judge", str(judge_file)], sweep_generator_main)
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()
