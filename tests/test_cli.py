"""`animeai` end to end on tiny synthetic data: train -> evaluate -> predict, help, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from animeai.cli import build_parser, main
from animeai.config import DetectorConfig, flag_name, iter_leaves

FAST = ["--image-size", "64", "--loader-workers", "0", "--model", "efficientnet_lite0", "--pretrained", "package",
        "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny detector trained through the CLI, shared by the tests below."""
    from animeai.data.synthetic import make_synthetic_dataset

    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "data"
    make_synthetic_dataset(data, num_classes=4, images_per_class=20, image_size=96, seed=3, val_fraction=0.25)
    model = tmp / "models" / "character_classifier.pth"
    rc = main(["train", "detector", "--data", str(data), "--out", str(model), "--run-dir", str(tmp / "run"),
               "--epochs", "3", *FAST])
    assert rc == 0
    return tmp, data, model


def test_train_writes_model_run_folder_and_metrics(trained, capsys):
    tmp, data, model = trained
    assert model.is_file()
    lines = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    assert "lr: 0.001" in (tmp / "run" / "config.yaml").read_text()
    assert main(["info", str(model)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["class_names"] == sorted(p.name for p in (data / "train").iterdir())
    assert meta["arch"] == "efficientnet_lite0" and meta["image_size"] == 64


def test_resume_flag_continues_the_run(trained, tmp_path):
    tmp, data, _ = trained
    out, run = tmp_path / "m.pth", tmp_path / "run"
    assert main(["train", "detector", "--data", str(data), "--out", str(out), "--run-dir", str(run), "--epochs", "1",
                 *FAST]) == 0
    assert main(["train", "detector", "--data", str(data), "--out", str(out), "--run-dir", str(run), "--epochs", "2",
                 "--resume", *FAST]) == 0
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _files(*roots):
    return {str(f): f.read_bytes() for r in roots for f in ([r] if r.is_file() else sorted(r.rglob("*")))
            if f.is_file() and f.name != ".lock"}


def test_resume_as_the_readme_shows_uses_the_saved_config(trained, tmp_path, monkeypatch, capsys):
    """`animeai train detector --out M --epochs N --resume` with no other flags continues the run as trained
    (other arch, image size, data than the defaults); an unsafe flag is refused and changes nothing."""
    _, data, _ = trained
    monkeypatch.chdir(tmp_path)
    out = "models/c.pth"
    assert main(["train", "detector", "--data", str(data), "--out", out, "--epochs", "1", *FAST]) == 0
    run = tmp_path / "runs" / "c"
    assert main(["train", "detector", "--out", out, "--epochs", "2", "--resume", "--no-progress"]) == 0
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    saved = (run / "config.yaml").read_text()
    assert "image_size: 64" in saved and "arch: efficientnet_lite0" in saved and "epochs: 2" in saved
    before = _files(run, tmp_path / out)
    capsys.readouterr()
    assert main(["train", "detector", "--out", out, "--epochs", "3", "--resume", "--image-size", "96"]) == 2
    err = capsys.readouterr().err
    assert "--image-size (run: 64, now: 96)" in err and "--overwrite" in err
    assert _files(run, tmp_path / out) == before
    # a new run over it without --resume is refused too, naming both ways out
    assert main(["train", "detector", "--data", str(data), "--out", out, "--epochs", "1", *FAST]) == 2
    assert "--resume" in (err := capsys.readouterr().err) and "--overwrite" in err
    assert _files(run, tmp_path / out) == before


@pytest.mark.parametrize("flags, named", [
    (["--grad-accum", "0"], "--grad-accum"),
    (["--grad-accum", "-2"], "--grad-accum"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--label-smoothing", "-0.1"], "--label-smoothing"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-3"], "--epochs"),
    (["--image-size", "0"], "--image-size"),
    (["--crop-scale", "0"], "--crop-scale"),
    (["--crop-scale", "1.5"], "--crop-scale"),
    (["--val-fraction", "1"], "--val-fraction"),
    (["--batch-size", "0"], "--batch-size"),
    (["--mixed-precision", "fp16", "--cpu"], "--mixed-precision"),
    (["--freeze-stages", "99"], "--freeze-stages"),
    (["--model", "resnet9000"], "--model"),
    (["--resume", "--overwrite"], "--overwrite"),
])
def test_bad_options_are_clear_errors_before_any_work(trained, tmp_path, capsys, flags, named):
    _, data, _ = trained
    out, run = tmp_path / "m.pth", tmp_path / "run"
    rc = main(["train", "detector", "--data", str(data), "--out", str(out), "--run-dir", str(run), *FAST, *flags])
    assert rc == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert "data:" not in err  # failed before the data scan
    assert not run.exists() and not out.exists()


def test_out_naming_a_folder_fails_before_any_work(trained, tmp_path, capsys):
    _, data, _ = trained
    (tmp_path / "models").mkdir()
    rc = main(["train", "detector", "--data", str(data), "--out", str(tmp_path / "models"),
               "--run-dir", str(tmp_path / "run"), *FAST])
    assert rc == 2 and "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_evaluate_writes_json_and_confusion_png(trained, tmp_path, capsys):
    _, data, model = trained
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    n = len(report["class_names"])
    assert report["data"].endswith("val")  # train/val layout: evaluates on val/
    assert report["num_images"] == sum(len(list(p.iterdir())) for p in (data / "val").iterdir())
    assert 0.25 < report["top1"] <= report["top5"] <= 1.0  # 4 classes: better than chance
    assert len(report["confusion_matrix"]) == n and all(len(r) == n for r in report["confusion_matrix"])
    assert sum(map(sum, report["confusion_matrix"])) == report["num_images"]
    diag = sum(report["confusion_matrix"][i][i] for i in range(n))
    assert diag / report["num_images"] == pytest.approx(report["top1"])
    assert set(report["per_class"]) == set(report["class_names"])
    png = tmp_path / "eval_confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_files_and_folders_with_a_bad_file(trained, tmp_path, capsys):
    _, data, model = trained
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    folder = data / "val" / sorted(p.name for p in (data / "val").iterdir())[0]
    one = next(iter(sorted(folder.iterdir())))
    rc = main(["predict", "--model", str(model), "--top-k", "3", str(one), str(folder), str(bad)])
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert rc == 1  # one input failed
    assert len(results) == 1 + len(list(folder.iterdir())) + 1
    assert results[-1]["path"] == str(bad) and "not a recognised image" in results[-1]["error"]
    assert "broken.jpg" in captured.err
    for r in results[:-1]:
        probs = [c["prob"] for c in r["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-5
        assert {c["class"] for c in r["top_k"]} <= set(p.name for p in (data / "train").iterdir())
    # most images of the folder's own class are predicted as that class
    hits = [r["top_k"][0]["class"] == folder.name for r in results[1:-1]]
    assert sum(hits) / len(hits) > 0.5


@pytest.mark.parametrize("device, says", [("cuda", "no CUDA GPU"), ("cuda:7", "no CUDA GPU"), ("tpu9", "not a device"),
                                          ("meta", "only auto, cpu")])
def test_a_device_this_machine_lacks_is_a_clear_error(trained, capsys, device, says):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _, data, model = trained
    assert main(["predict", "--model", str(model), "--device", device, str(data)]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and says in err and "Traceback" not in err


def test_every_config_option_has_a_flag_with_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "detector", "--help"])
    text = capsys.readouterr().out
    for dotted, f, _ in iter_leaves(DetectorConfig):
        assert f"--{flag_name(dotted, f)}" in text, dotted
        assert f.metadata["help"].split()[0] in text


def test_errors_are_clear_and_exit_2(tmp_path, capsys):
    assert main(["train", "detector", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m.pth"),
                 *FAST]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    evil = tmp_path / "model.pth"
    evil.write_bytes(b"\x80\x04K\x01.")  # a pickle
    assert main(["evaluate", "--model", str(evil), "--data", str(tmp_path)]) == 2
    assert "pickle" in capsys.readouterr().err
    assert main(["train", "detector", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_parser_lists_commands_and_console_script_runs():
    text = build_parser().format_help()
    for cmd in ("train", "evaluate", "predict", "models", "info", "synth"):
        assert cmd in text
    out = subprocess.run([sys.executable, "-m", "animeai.cli", "models"], capture_output=True, text=True, check=True)
    assert "efficientnet_lite0" in out.stdout and "efficientnet_b0" in out.stdout


@pytest.mark.parametrize("argv, flag", [
    (["predict", "--model", "m.pth", "--top-k", "0", "x.jpg"], "--top-k"),
    (["predict", "--model", "m.pth", "--batch-size", "-1", "x.jpg"], "--batch-size"),
    (["evaluate", "--model", "m.pth", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "--model", "m.pth", "--data", "d", "--num-workers", "-1"], "--num-workers"),
    (["evaluate", "--model", "m.pth", "--data", "d", "--num-workers", "two"], "--num-workers"),
])
def test_out_of_range_numbers_are_usage_errors(capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err
