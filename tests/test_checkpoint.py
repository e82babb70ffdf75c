"""The animeai model file (safetensors + JSON metadata): round trip, atomic writes, refusals, no unpickling."""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import animeai
import animeai.checkpoint as checkpoint
from animeai.checkpoint import (
    CheckpointError,
    MetadataError,
    atomic_write,
    read_metadata,
    read_model_file,
    read_raw_metadata,
    register_metadata_schema,
    save_model_file,
)
from animeai.weights import WeightsError, read_state_dict

# torch's weights-only unpickler warns about the protocols of the hand-made pickles below
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")

META = {
    "arch": "efficientnet_lite0",
    "class_names": ["akari", "ゆき", "émilie", "名前 with space"],
    "image_size": 64,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "best": {"val_acc": 0.75, "epoch": 3},
    "note": None,
}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    return {
        "layer.weight": torch.randn(3, 4, 3, 3, generator=g),
        "layer.bias": torch.zeros(3),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.long),
        "half": torch.randn(5, generator=g).to(torch.float16),
        "transposed": base.t(),  # non-contiguous view
        "shared_a": base[:2],  # two views of one storage
        "shared_b": base[2:],
    }


@pytest.fixture
def model_file(tmp_path) -> Path:
    return save_model_file(tmp_path / "model.pth", _tensors(), META)


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip(model_file):
    tensors, meta = read_model_file(model_file)
    expected = _tensors()
    assert set(tensors) == set(expected)
    for k, v in expected.items():
        assert tensors[k].dtype == v.dtype, k
        assert tensors[k].shape == v.shape, k
        assert torch.equal(tensors[k], v), k
    assert meta["library_version"] == animeai.__version__
    assert {k: v for k, v in meta.items() if k != "library_version"} == META
    assert meta["class_names"][1] == "ゆき"


def test_library_version_is_not_overwritten(tmp_path):
    path = save_model_file(tmp_path / "m.safetensors", {"w": torch.ones(2)}, {**META, "library_version": "9.9"})
    assert read_metadata(path)["library_version"] == "9.9"


def test_save_does_not_modify_arguments(tmp_path):
    meta = {"a": 1}
    tensors = {"w": torch.ones(2, requires_grad=True)}
    save_model_file(tmp_path / "m.pth", tensors, meta)
    assert meta == {"a": 1}
    assert tensors["w"].requires_grad


def test_read_metadata_does_not_read_tensors(model_file, monkeypatch):
    real_safe_open = checkpoint.safe_open

    class NoTensors:
        """safe_open whose get_tensor fails: reading the metadata must not need it."""

        def __init__(self, *args, **kwargs):
            self._inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self._fh = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def metadata(self):
            return self._fh.metadata()

        def keys(self):
            return self._fh.keys()

        def get_tensor(self, key):
            raise AssertionError("tensors were read")

    monkeypatch.setattr(checkpoint, "safe_open", NoTensors)
    meta = read_metadata(model_file)
    assert meta["class_names"] == META["class_names"]
    with pytest.raises(AssertionError, match="tensors were read"):
        read_model_file(model_file)  # the control: a full read does call get_tensor


def test_metadata_is_json_in_the_header(model_file):
    from safetensors import safe_open

    with safe_open(str(model_file), framework="pt") as fh:
        header = fh.metadata()
    assert header["format"] == "animeai.model"
    assert json.loads(header["metadata"])["class_names"] == META["class_names"]


def _model_file_with_header_length(path: Path, length: int) -> Path:
    """A valid model file whose safetensors header is exactly ``length`` bytes (a multiple of 8) long."""
    save_model_file(path, {"w": torch.ones(3)}, {"kind": "test", "pad": ""})
    data = path.read_bytes()
    (padded,) = struct.unpack("<Q", data[:8])
    raw = len(data[8 : 8 + padded].rstrip(b" "))  # safetensors pads the JSON header with spaces to 8 bytes
    assert raw <= length, "header already longer than wanted"
    save_model_file(path, {"w": torch.ones(3)}, {"kind": "test", "pad": "x" * (length - raw)})  # one byte per character
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] == length
    return path


def test_valid_file_whose_header_length_looks_like_pickle_magic(tmp_path):
    """A safetensors file starts with its header length (u64 little-endian). A length of 0x280 = 640 bytes
    begins with the bytes 80 02, the pickle protocol-2 magic: the file is still a valid model file."""
    path = _model_file_with_header_length(tmp_path / "model.pth", 0x280)
    assert path.read_bytes()[:2] == b"\x80\x02"
    tensors, meta = read_model_file(path)
    assert torch.equal(tensors["w"], torch.ones(3))
    assert meta["pad"].startswith("x")


# ------------------------------------------------------------------------------------------ atomic write


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def test_failed_save_keeps_the_previous_file(model_file, monkeypatch):
    before = model_file.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_model_file(model_file, {"other": torch.zeros(1)}, {"arch": "x"})
    assert model_file.read_bytes() == before
    assert read_metadata(model_file)["class_names"] == META["class_names"]
    assert _leftovers(model_file.parent) == []


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def fail(tensors, filename, metadata=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(checkpoint, "save_file", fail)
    with pytest.raises(RuntimeError):
        save_model_file(tmp_path / "new" / "model.pth", {"w": torch.ones(1)}, {})
    assert list((tmp_path / "new").iterdir()) == []


def test_unserialisable_metadata_fails_before_touching_the_file(model_file):
    before = model_file.read_bytes()
    with pytest.raises(TypeError):
        save_model_file(model_file, {"w": torch.ones(1)}, {"bad": object()})
    assert model_file.read_bytes() == before
    assert _leftovers(model_file.parent) == []


def test_overwrite_replaces_the_file(model_file):
    save_model_file(model_file, {"w": torch.full((2,), 3.0)}, {"kind": "test", "arch": "second"})
    tensors, meta = read_model_file(model_file)
    assert list(tensors) == ["w"] and meta["arch"] == "second"
    assert _leftovers(model_file.parent) == []


# ------------------------------------------------------------------------------------------ refusals


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_model_file(tmp_path / "nope.pth")


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        read_model_file(tmp_path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(CheckpointError, match="empty"):
        read_model_file(path)


def test_random_bytes(tmp_path):
    rng = random.Random(1234)
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes([0x11]) + bytes(rng.randrange(256) for _ in range(4095)))
    with pytest.raises(CheckpointError, match="not an animeai model file"):
        read_model_file(path)


def test_text_file(tmp_path):
    path = tmp_path / "readme.pth"
    path.write_text("this is not a model\n" * 20, encoding="utf-8")
    with pytest.raises(CheckpointError, match="not an animeai model file"):
        read_model_file(path)


@pytest.mark.parametrize("keep", [0.5, 0.1, 4 / 1e9])
def test_truncated_model_file(model_file, tmp_path, keep):
    data = model_file.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="cut.pth"):
        read_model_file(cut)
    with pytest.raises(CheckpointError):
        read_metadata(cut)


def test_plain_safetensors_points_to_pretrained(tmp_path):
    path = tmp_path / "backbone.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match="--pretrained"):
        read_model_file(path)
    save_file({"w": torch.ones(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="--pretrained"):
        read_model_file(path)


def test_unsupported_format_version(tmp_path):
    path = tmp_path / "future.pth"
    save_file({"w": torch.ones(2)}, str(path),
              metadata={"format": "animeai.model", "format_version": "99", "metadata": "{}"})
    with pytest.raises(CheckpointError, match="version 99"):
        read_model_file(path)


def test_damaged_metadata(tmp_path):
    path = tmp_path / "damaged.pth"
    save_file({"w": torch.ones(2)}, str(path),
              metadata={"format": "animeai.model", "format_version": "1", "metadata": "{not json"})
    with pytest.raises(CheckpointError, match="metadata"):
        read_model_file(path)


def test_benign_torch_pickle_is_refused_too(tmp_path):
    path = tmp_path / "state.pth"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="pickle"):
        read_model_file(path)


# ------------------------------------------------------------------------------------------ malicious pickles


class _Evil:
    """Unpickling this creates (opens for writing) the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_evil(path: Path, marker: Path, how: str) -> Path:
    payload = {"state_dict": {"w": torch.ones(2), "evil": _Evil(marker)}}
    if how == "torch.save":
        torch.save(payload, path)
    elif how == "torch.save-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    elif how.startswith("pickle"):
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=int(how[-1]))
    else:  # pragma: no cover
        raise ValueError(how)
    return path


EVIL_KINDS = ["torch.save", "torch.save-legacy", "pickle2", "pickle4", "pickle5"]


def test_evil_pickle_really_runs_code_when_unpickled(tmp_path):
    """Control: the payload does create the marker when loaded unsafely (so the tests below can fail)."""
    marker = tmp_path / "pwned"
    path = _write_evil(tmp_path / "evil.pth", marker, "torch.save")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("how", EVIL_KINDS)
def test_read_model_file_refuses_malicious_pickle(tmp_path, how):
    marker = tmp_path / "pwned"
    path = _write_evil(tmp_path / "evil.pth", marker, how)
    with pytest.raises(CheckpointError, match="pickle"):
        read_model_file(path)
    with pytest.raises(CheckpointError, match="pickle"):
        read_metadata(path)
    assert not marker.exists()


def test_protocol0_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = _write_evil(tmp_path / "evil.pth", marker, "pickle0")
    with pytest.raises(CheckpointError):
        read_model_file(path)
    with pytest.raises(WeightsError):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle2"])
def test_classifier_from_file_refuses_malicious_pickle(tmp_path, how):
    from animeai.inference import Classifier

    marker = tmp_path / "pwned"
    path = _write_evil(tmp_path / "evil.pth", marker, how)
    with pytest.raises(CheckpointError, match="pickle"):
        Classifier.from_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("how", EVIL_KINDS)
def test_read_state_dict_refuses_malicious_pickle(tmp_path, how):
    marker = tmp_path / "pwned"
    path = _write_evil(tmp_path / "evil.pth", marker, how)
    with pytest.raises(WeightsError, match="refused"):
        read_state_dict(path)
    assert not marker.exists()


def test_create_model_refuses_malicious_pretrained(tmp_path):
    from animeai.models import create_model

    marker = tmp_path / "pwned"
    path = _write_evil(tmp_path / "evil.pth", marker, "torch.save")
    with pytest.raises(WeightsError):
        create_model("efficientnet_lite0", 3, pretrained=str(path))
    assert not marker.exists()


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "module."])
def test_read_state_dict_loads_benign_pth(tmp_path, wrap):
    sd = {"conv.weight": torch.randn(2, 3), "bn.num_batches_tracked": torch.tensor(3)}
    if wrap == "module.":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif wrap:
        obj = {wrap: sd, "epoch": 4}
    else:
        obj = sd
    path = tmp_path / "weights.pth"
    torch.save(obj, path)
    got = read_state_dict(path)
    assert set(got) == set(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k])


def test_read_state_dict_refuses_non_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.ones(1)], path)
    with pytest.raises(WeightsError, match="state dict"):
        read_state_dict(path)
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        read_state_dict(path)


def test_read_state_dict_accepts_model_files_whatever_their_header_length(tmp_path):
    """An animeai model file (default name ``*.pth``) used as --pretrained: the safetensors header length is a
    multiple of 8, so about one file in 32 starts with the byte 0x80, like a pickle. It must still load."""
    path = _model_file_with_header_length(tmp_path / "previous_run.pth", 0x180)
    assert path.read_bytes()[:2] == b"\x80\x01"
    assert read_metadata(path)["pad"].startswith("x")  # a valid model file
    got = read_state_dict(path)
    assert torch.equal(got["w"], torch.ones(3))


def test_files_are_closed_after_refusal(tmp_path):
    """On platforms that lock open files a refused file must be deletable at once."""
    path = tmp_path / "text.pth"
    path.write_text("x" * 100, encoding="utf-8")
    with pytest.raises(CheckpointError):
        read_model_file(path)
    os.remove(path)
    assert not path.exists()


# ------------------------------------------------------------------------------------------ metadata schema


def _write_raw(path: Path, metadata_json: str, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A model file written by hand, bypassing save_model_file: any metadata text at all."""
    save_file(tensors or {"w": torch.ones(2)}, str(path),
              metadata={"format": "animeai.model", "format_version": "1", "metadata": metadata_json})
    return path


def _refused(path: Path, *fields: str) -> str:
    """Both readers refuse ``path`` with a CheckpointError that names the file and every one of ``fields``."""
    for read in (read_model_file, read_metadata):
        with pytest.raises(CheckpointError) as info:
            read(path)
        message = str(info.value)
        assert str(path) in message, message
        for field in fields:
            assert f"'{field}'" in message, message
    return message


def test_null_metadata(tmp_path):
    message = _refused(_write_raw(tmp_path / "null.pth", "null"))
    assert "JSON object" in message and "null" in message


@pytest.mark.parametrize("value", [[], ["a", "b"], "abc", 3])
def test_metadata_that_is_not_an_object(tmp_path, value):
    assert "JSON object" in _refused(_write_raw(tmp_path / "list.pth", json.dumps(value)))


@pytest.mark.parametrize("field,value", [
    ("mean", [0.5, 0.5]), ("mean", [0.5, 0.5, 0.5, 0.5]), ("std", [0.5]), ("std", []), ("mean", "0.5"),
    ("mean", [0.5, "0.5", 0.5]), ("mean", [0.5, True, 0.5]), ("std", [0.5, 0.0, 0.5]), ("std", [0.5, -1, 0.5]),
    ("mean", None),
])
def test_wrong_mean_or_std(tmp_path, field, value):
    _refused(_write_raw(tmp_path / "norm.pth", json.dumps({**META, field: value})), field)


def test_non_finite_mean(tmp_path):
    text = json.dumps({**META, "mean": [0.5, float("nan"), 0.5]})  # Python writes the token NaN
    assert "NaN" in text
    _refused(_write_raw(tmp_path / "nan.pth", text), "mean")


@pytest.mark.parametrize("value", [0, -1, "224", True, 8193, 64.0, None, [64]])
def test_bad_image_size(tmp_path, value):
    message = _refused(_write_raw(tmp_path / "size.pth", json.dumps({**META, "image_size": value})), "image_size")
    assert json.dumps(value) in message  # the offending value is shown


def test_num_classes_disagrees_with_class_names(tmp_path):
    message = _refused(_write_raw(tmp_path / "n.pth", json.dumps({**META, "num_classes": 5})), "num_classes")
    assert "4 names" in message
    _refused(_write_raw(tmp_path / "n.pth", json.dumps({**META, "num_classes": "4"})), "num_classes")
    assert read_metadata(_write_raw(tmp_path / "ok.pth", json.dumps({**META, "num_classes": 4})))["num_classes"] == 4


def test_duplicate_class_names(tmp_path):
    names = ["akari", "ゆき", "akari", "ゆき", "emilie"]
    message = _refused(_write_raw(tmp_path / "dup.pth", json.dumps({**META, "class_names": names})), "class_names")
    assert "'akari'" in message and "'ゆき'" in message and "'emilie'" not in message


@pytest.mark.parametrize("value", [[], "akari", ["akari", ""], ["akari", 3], ["akari", None], {"akari": 0}])
def test_bad_class_names(tmp_path, value):
    _refused(_write_raw(tmp_path / "names.pth", json.dumps({**META, "class_names": value})), "class_names")


@pytest.mark.parametrize("field", ["arch", "class_names", "image_size", "mean", "std"])
def test_missing_classifier_field(tmp_path, field):
    meta = {k: v for k, v in META.items() if k != field}
    assert "missing" in _refused(_write_raw(tmp_path / "missing.pth", json.dumps(meta)), field)


@pytest.mark.parametrize("field,value", [
    ("kind", 3), ("kind", ""), ("kind", None), ("library_version", 1.0), ("config", "lr: 1"), ("config", []),
    ("metrics", [0.5]), ("epoch", "3"), ("epoch", 2.5), ("epoch", -1), ("epoch", False), ("arch", ""),
    ("arch", ["efficientnet_lite0"]),
])
def test_bad_common_and_classifier_fields(tmp_path, field, value):
    _refused(_write_raw(tmp_path / "bad.pth", json.dumps({**META, field: value})), field)


def test_valid_common_fields_load(tmp_path):
    meta = {**META, "kind": "classifier", "config": {"run": {"epochs": 2}}, "metrics": {"val_top1": float("nan")},
            "epoch": 2, "library_version": "1.2.3", "num_classes": 4}
    tensors, got = read_model_file(_write_raw(tmp_path / "ok.pth", json.dumps(meta)))
    assert got["epoch"] == 2 and got["config"] == {"run": {"epochs": 2}}


def test_unknown_kind_gets_the_common_checks_only(tmp_path):
    kind = "unregistered_kind"
    assert kind not in checkpoint._SCHEMAS
    path = _write_raw(tmp_path / "gen.pth", json.dumps({"kind": kind, "latent_dim": 128, "epoch": 3}))
    assert read_metadata(path)["latent_dim"] == 128  # no class_names needed for another kind
    _refused(_write_raw(tmp_path / "bad.pth", json.dumps({"kind": kind, "epoch": "3"})), "epoch")
    with pytest.raises(CheckpointError, match=f"'{kind}' model, not a classifier"):
        read_model_file(path, kind="classifier")
    with pytest.raises(CheckpointError, match=f"'{kind}' model, not a classifier"):
        from animeai.inference import Classifier

        Classifier.from_file(path)


def test_registered_schema_is_applied_on_every_read(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_SCHEMAS", dict(checkpoint._SCHEMAS))  # registrations end with the test
    calls = []

    def check_toy(meta, tensors):
        calls.append(None if tensors is None else sorted(tensors))
        if not isinstance(meta.get("latent_dim"), int):
            raise MetadataError("latent_dim", "must be an integer")

    register_metadata_schema("toy", check_toy)
    good = _write_raw(tmp_path / "good.pth", json.dumps({"kind": "toy", "latent_dim": 8}))
    assert read_metadata(good)["latent_dim"] == 8
    read_model_file(good, kind="toy")
    assert calls == [None, ["w"]]  # metadata-only reads pass no tensors, full reads pass them
    bad = _write_raw(tmp_path / "bad.pth", json.dumps({"kind": "toy", "latent_dim": "8"}))
    with pytest.raises(MetadataError) as info:
        read_metadata(bad)
    assert info.value.field == "latent_dim" and str(bad) in str(info.value)


def test_classifier_with_unknown_arch(tmp_path):
    from animeai.inference import Classifier

    path = save_model_file(tmp_path / "arch.pth", {"w": torch.ones(2)}, {**META, "arch": "no_such_net"})
    with pytest.raises(CheckpointError, match="'arch'.*no_such_net") as info:
        Classifier.from_file(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------ non-finite weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(tmp_path, dtype, bad):
    tensors = _tensors()
    tensors["head.weight"] = torch.tensor([[0.1, bad], [0.2, 0.3]], dtype=dtype)
    path = save_model_file(tmp_path / "diverged.pth", tensors, META)
    with pytest.raises(CheckpointError, match="non-finite") as info:
        read_model_file(path)
    assert str(path) in str(info.value) and "'head.weight'" in str(info.value)
    assert read_metadata(path)["arch"] == META["arch"]  # the metadata alone is fine (tensors are not read)


def test_classifier_from_file_refuses_non_finite_weights(tmp_path):
    from animeai.inference import Classifier

    tensors = {"conv.weight": torch.full((2, 2), float("nan"))}
    path = save_model_file(tmp_path / "nan.pth", tensors, META)
    with pytest.raises(CheckpointError, match="'conv.weight'.*non-finite"):
        Classifier.from_file(path)


def test_integer_and_float8_tensors_pass_the_finite_check(tmp_path):
    tensors = {"count": torch.tensor([7, -3]), "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn)}
    got, _ = read_model_file(save_model_file(tmp_path / "ints.pth", tensors, META))
    assert torch.equal(got["count"], tensors["count"])
    tensors["f8"] = torch.tensor([0.5, float("nan")]).to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match="'f8'"):
        read_model_file(save_model_file(tmp_path / "f8.pth", tensors, META))


# ------------------------------------------------------------------------------------------ file mode


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = save_model_file(tmp_path / "model.pth", _tensors(), META)
        assert path.stat().st_mode & 0o777 == mode
        path.chmod(0o600)  # overwriting gives a fresh file the same mode
        save_model_file(path, _tensors(), META)
        assert path.stat().st_mode & 0o777 == mode
        other = atomic_write(tmp_path / "x.txt", lambda tmp: tmp.write_text("x"))
        assert other.stat().st_mode & 0o777 == mode
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------ CLI: info, JSON output


def _strict_json(text: str):
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_strict_json_helper_can_fail():
    with pytest.raises(AssertionError, match="NaN"):
        _strict_json(json.dumps([float("nan")]))


def test_write_json_never_writes_nan(tmp_path, capsys):
    from animeai.cli import _write_json

    obj = {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": {"d": "NaN", "e": None, "f": 3}}
    _write_json(obj, None)
    assert _strict_json(capsys.readouterr().out) == {"a": None, "b": [1.5, None, [None, 2]],
                                                     "c": {"d": "NaN", "e": None, "f": 3}}
    _write_json(obj, str(tmp_path / "out" / "x.json"))
    assert _strict_json((tmp_path / "out" / "x.json").read_text(encoding="utf-8"))["a"] is None


def test_predict_prints_valid_json_when_the_model_outputs_nan(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from animeai.cli import main
    from animeai.inference import Classifier
    from animeai.models import create_model

    model = create_model("efficientnet_lite0", 4, pretrained="none")
    path = save_model_file(tmp_path / "clf.pth", model.state_dict(), META)
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    monkeypatch.setattr(Classifier, "logits", lambda self, batch: torch.full((len(batch), 4), float("nan")))
    assert main(["predict", "--model", str(path), "--top-k", "2", str(image)]) == 0
    out = _strict_json(capsys.readouterr().out)
    assert out[0]["path"] == str(image) and [p["prob"] for p in out[0]["top_k"]] == [None, None]


def test_info_flags_an_invalid_model_file(tmp_path, capsys):
    from animeai.cli import main

    path = _write_raw(tmp_path / "bad.pth", json.dumps({**META, "image_size": "224"}))
    assert main(["info", str(path)]) == 1
    captured = capsys.readouterr()
    assert _strict_json(captured.out)["image_size"] == "224"  # the raw metadata is still shown
    assert captured.err.startswith("invalid: ") and "'image_size'" in captured.err and str(path) in captured.err

    assert main(["info", str(_write_raw(tmp_path / "null.pth", "null"))]) == 1
    captured = capsys.readouterr()
    assert _strict_json(captured.out) is None and "JSON object" in captured.err

    path = save_model_file(tmp_path / "nan.pth", {"w": torch.tensor([float("nan")])}, META)
    assert main(["info", str(path)]) == 1
    assert "'w'" in capsys.readouterr().err


def test_info_valid_and_not_a_model_file(tmp_path, model_file, capsys):
    from animeai.cli import main

    assert main(["info", str(model_file)]) == 0
    captured = capsys.readouterr()
    assert _strict_json(captured.out)["class_names"] == META["class_names"] and "invalid" not in captured.err
    assert read_raw_metadata(model_file)["arch"] == META["arch"]
    text = tmp_path / "notes.pth"
    text.write_text("not a model\n" * 10, encoding="utf-8")
    assert main(["info", str(text)]) == 2
    assert "not an animeai model file" in capsys.readouterr().err
