"""Layered config: dataclass defaults -> YAML file -> overrides / command-line flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from animeai.config import (
    ConfigError,
    DataConfig,
    DetectorConfig,
    add_config_arguments,
    config_from_args,
    flag_name,
    iter_leaves,
    load_config,
    opt,
    save_config,
    section,
    to_dict,
    with_overrides,
)

YAML = """\
data:
  root: /data/chars
  image_size: 128
optim:
  lr: 0.0005
  batch_size: 8
run:
  epochs: 3
  progress: true
  run_dir: null
"""


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(YAML, encoding="utf-8")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    parser.add_argument("--config")
    add_config_arguments(parser, DetectorConfig)
    return parser


def _from_cli(argv: list[str]) -> DetectorConfig:
    args = _parser().parse_args(argv)
    return config_from_args(DetectorConfig, args, args.config)


# ------------------------------------------------------------------------------------------ precedence


def test_defaults():
    cfg = load_config(DetectorConfig)
    assert cfg == DetectorConfig()
    assert cfg.optim.lr == 1e-3
    assert cfg.data.image_size == 224
    assert cfg.run.progress is True
    assert cfg.run.run_dir is None


def test_yaml_overrides_defaults_and_keeps_the_rest(yaml_file):
    cfg = load_config(DetectorConfig, yaml_file)
    assert cfg.data.root == "/data/chars"
    assert cfg.data.image_size == 128
    assert cfg.optim.lr == pytest.approx(5e-4)
    assert cfg.optim.batch_size == 8
    assert cfg.run.epochs == 3
    # keys absent from the file keep their defaults
    assert cfg.data.val_fraction == DataConfig().val_fraction
    assert cfg.optim.weight_decay == DetectorConfig().optim.weight_decay
    assert cfg.model == DetectorConfig().model


def test_dotted_overrides_beat_yaml(yaml_file):
    over = {"optim.lr": 0.01, "run.progress": False, "model.arch": "mobilenetv2_100"}
    cfg = load_config(DetectorConfig, yaml_file, over)
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.run.progress is False
    assert cfg.model.arch == "mobilenetv2_100"
    assert cfg.optim.batch_size == 8  # from the YAML, untouched by the overrides
    assert cfg.data.image_size == 128


def test_overrides_are_coerced_to_the_field_type():
    cfg = load_config(DetectorConfig, None, {"optim.lr": "3e-4", "run.epochs": "5", "run.cpu": "yes"})
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.run.epochs == 5 and isinstance(cfg.run.epochs, int)
    assert cfg.run.cpu is True


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(DetectorConfig, None, {"optim.lrr": 1.0})
    with pytest.raises(ConfigError, match="nosection"):
        load_config(DetectorConfig, None, {"nosection.lr": 1.0})


def test_cli_flags_beat_yaml_and_unset_flags_keep_yaml(yaml_file):
    cfg = _from_cli(["--config", str(yaml_file), "--lr", "0.01", "--no-progress"])
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.run.progress is False
    # flags not given keep the YAML values (not the dataclass defaults)
    assert cfg.optim.batch_size == 8
    assert cfg.data.image_size == 128
    assert cfg.data.root == "/data/chars"
    assert cfg.run.epochs == 3
    # and fields in neither keep the defaults
    assert cfg.optim.weight_decay == DetectorConfig().optim.weight_decay


def test_cli_without_yaml_and_renamed_flags(tmp_path):
    cfg = _from_cli(["--data", str(tmp_path), "--model", "efficientnet_lite0", "--epochs", "2", "--cpu",
                     "--val-data", "v", "--mixed-precision", "no"])
    assert cfg.data.root == str(tmp_path)
    assert cfg.data.val_root == "v"
    assert cfg.model.arch == "efficientnet_lite0"
    assert cfg.run.epochs == 2
    assert cfg.run.cpu is True
    assert cfg.run.mixed_precision == "no"
    assert cfg.optim == DetectorConfig().optim  # nothing else changed
    assert _from_cli([]) == DetectorConfig()


def test_cli_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--lr", "abc"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["--mixed-precision", "fp8"])
    assert "fp8" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad files / values


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.1\n  learning_rate: 0.2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="optim.learning_rate") as info:
        load_config(DetectorConfig, path)
    assert str(path) in str(info.value)
    assert "optim.lr" in str(info.value)  # the known keys are listed


def test_unknown_yaml_section_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  lr: 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(DetectorConfig, path)


def test_wrong_type_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: abc\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(DetectorConfig, path)


@pytest.mark.parametrize(
    "text, key",
    [
        ("run:\n  epochs: 2.5\n", "run.epochs"),
        ("run:\n  cpu: maybe\n", "run.cpu"),
        ("data:\n  image_size: null\n", "data.image_size"),
        ("optim: 3\n", "optim"),
        ("data:\n  root: [a, b]\n", "data.root"),  # a list is not a path
        ("run:\n  epochs: true\n", "run.epochs"),  # a boolean is not a count
    ],
)
def test_other_bad_values(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=key):
        load_config(DetectorConfig, path)


def test_yaml_boolean_for_a_string_option_is_not_stringified(tmp_path):
    """YAML 1.1 reads an unquoted ``no`` as ``False``; it must not become the string "False"."""
    path = tmp_path / "mp.yaml"
    path.write_text("run:\n  mixed_precision: no\n", encoding="utf-8")
    try:
        cfg = load_config(DetectorConfig, path)
    except ConfigError as exc:
        assert "run.mixed_precision" in str(exc)
    else:
        assert cfg.run.mixed_precision in ("auto", "no", "fp16", "bf16")


def test_choices_are_checked_in_yaml_and_overrides(tmp_path):
    path = tmp_path / "mp.yaml"
    path.write_text("run:\n  mixed_precision: fp8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="run.mixed_precision"):
        load_config(DetectorConfig, path)
    with pytest.raises(ConfigError, match="run.mixed_precision"):
        load_config(DetectorConfig, None, {"run.mixed_precision": "fp8"})
    assert load_config(DetectorConfig, None, {"run.mixed_precision": "bf16"}).run.mixed_precision == "bf16"


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(DetectorConfig, path) == DetectorConfig()
    path.write_text("# only a comment\n", encoding="utf-8")
    assert load_config(DetectorConfig, path) == DetectorConfig()


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(DetectorConfig, path)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(DetectorConfig, path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(DetectorConfig, tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------ save / frozen / flags


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        DetectorConfig,
        None,
        {"data.root": str(tmp_path / "データ" / "ゆき"), "optim.lr": 3e-4, "run.run_dir": None, "run.cpu": True,
         "data.val_root": "val dir", "model.freeze_stages": 2, "augment.rotation": 0.0},
    )
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert path.is_file()
    assert "ゆき" in path.read_text(encoding="utf-8")  # unicode written as-is
    again = load_config(DetectorConfig, path)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)


def test_configs_are_frozen():
    cfg = DetectorConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim = None  # type: ignore[misc]


def test_overrides_do_not_mutate_the_base():
    base = DetectorConfig()
    changed = with_overrides(base, {"optim.lr": 0.5})
    assert changed.optim.lr == 0.5
    assert base.optim.lr == 1e-3


def test_every_leaf_has_help_and_a_unique_flag():
    leaves = list(iter_leaves(DetectorConfig))
    assert len(leaves) > 20
    flags = [flag_name(dotted, f) for dotted, f, _ in leaves]
    assert len(flags) == len(set(flags))
    for dotted, f, _ in leaves:
        assert f.metadata.get("help", "").strip(), f"{dotted} has no help text"
    _parser()  # add_config_arguments raises TypeError on a duplicate flag


def test_help_lists_every_flag():
    text = _parser().format_help()
    for dotted, f, _ in iter_leaves(DetectorConfig):
        assert f"--{flag_name(dotted, f)}" in text


@dataclasses.dataclass(frozen=True)
class _SectionA:
    lr: float = opt(0.1, "learning rate of A")


@dataclasses.dataclass(frozen=True)
class _SectionB:
    lr: float = opt(0.2, "learning rate of B")


@dataclasses.dataclass(frozen=True)
class _Clash:
    a: _SectionA = section(_SectionA)
    b: _SectionB = section(_SectionB)


def test_duplicate_flags_are_refused():
    with pytest.raises(TypeError, match="--lr"):
        add_config_arguments(argparse.ArgumentParser(), _Clash)


def test_config_path_that_is_a_folder_or_not_utf8_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}: is a folder"):
        load_config(DetectorConfig, tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("data:\n  root: /données\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{latin1}: not a UTF-8 text file"):
        load_config(DetectorConfig, latin1)


@pytest.mark.parametrize("over, named", [
    ({"run.epochs": 0}, "'run.epochs' (--epochs) must be >= 1"),
    ({"optim.lr": float("nan")}, "'optim.lr' (--lr) must be a finite number"),
    ({"optim.label_smoothing": 1.0}, "'optim.label_smoothing' (--label-smoothing) must be >= 0 and < 1"),
    ({"data.image_size": 0}, "'data.image_size' (--image-size) must be >= 16"),
    ({"run.grad_accum": 0}, "'run.grad_accum' (--grad-accum) must be >= 1"),
    ({"augment.crop_scale": 0.0}, "'augment.crop_scale' (--crop-scale) must be > 0"),
    ({"model.arch": "nope"}, "'model.arch' (--model) must be one of"),
])
def test_out_of_range_values_name_key_and_flag(over, named):
    with pytest.raises(ConfigError) as err:
        load_config(DetectorConfig, None, over)
    assert named in str(err.value)


def test_yaml_values_are_range_checked_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  epochs: -1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c.yaml: config key 'run.epochs' \(--epochs\) must be >= 1"):
        load_config(DetectorConfig, path)
