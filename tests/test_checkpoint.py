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
from animeai.checkpoint import CheckpointError, read_metadata, read_model_file, require_keys, save_model_file
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
    path = save_model_file(tmp_path / "m.safetensors", {"w": torch.ones(2)}, {"library_version": "9.9"})
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


def test_require_keys(model_file):
    meta = read_metadata(model_file)
    require_keys(meta, ("arch", "class_names"), model_file)
    with pytest.raises(CheckpointError, match="lacks missing_key"):
        require_keys(meta, ("arch", "missing_key"), model_file)


def _model_file_with_header_length(path: Path, length: int) -> Path:
    """A valid model file whose safetensors header is exactly ``length`` bytes (a multiple of 8) long."""
    save_model_file(path, {"w": torch.ones(3)}, {"pad": ""})
    data = path.read_bytes()
    (padded,) = struct.unpack("<Q", data[:8])
    raw = len(data[8 : 8 + padded].rstrip(b" "))  # safetensors pads the JSON header with spaces to 8 bytes
    assert raw <= length, "header already longer than wanted"
    save_model_file(path, {"w": torch.ones(3)}, {"pad": "x" * (length - raw)})  # one byte per character
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
    save_model_file(model_file, {"w": torch.full((2,), 3.0)}, {"arch": "second"})
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
