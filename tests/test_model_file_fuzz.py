"""Property-style fuzzing of the model-file loader: whatever bytes it is given, it either loads them as a valid model
file or raises CheckpointError; never another exception, never a crash. Seeded and bounded (a few hundred cases)."""

from __future__ import annotations

import argparse
import json
import math
import random
import struct
from pathlib import Path

import pytest
import torch

from animeai.checkpoint import CheckpointError, read_metadata, read_model_file, save_model_file
from animeai.cli import cmd_info

META = {
    "kind": "classifier",
    "arch": "efficientnet_lite0",
    "class_names": ["akari", "ゆき", "émilie"],
    "num_classes": 3,
    "image_size": 64,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "config": {"run": {"epochs": 2}, "optim": {"lr": 0.001}},
    "metrics": {"val_top1": 0.5},
    "epoch": 2,
}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "head.weight": torch.randn(3, 4, generator=g).to(torch.float16),
        "head.bias": torch.zeros(3, dtype=torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(5, dtype=torch.long),
    }


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> bytes:
    path = save_model_file(tmp_path_factory.mktemp("fuzz") / "valid.pth", _tensors(), META)
    read_model_file(path)  # the base case is valid
    return path.read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _usable(tensors: dict[str, torch.Tensor], meta, label: str) -> None:
    """What consumers rely on in a file the loader accepted, checked here independently of the schema code."""
    assert isinstance(meta, dict), f"{label}: accepted metadata {meta!r}"
    for name, t in tensors.items():
        assert not t.is_floating_point() or bool(torch.isfinite(t.float()).all()), f"{label}: non-finite {name}"
    if meta.get("kind", "classifier") != "classifier":
        return
    names, size = meta.get("class_names"), meta.get("image_size")
    assert isinstance(meta.get("arch"), str) and meta["arch"], f"{label}: arch {meta.get('arch')!r}"
    assert isinstance(names, list) and names and all(isinstance(n, str) and n for n in names), f"{label}: {names!r}"
    assert len(set(names)) == len(names) == meta.get("num_classes", len(names)), f"{label}: {names!r}"
    assert type(size) is int and 1 <= size <= 8192, f"{label}: image_size {size!r}"
    for key in ("mean", "std"):
        v = meta.get(key)
        assert isinstance(v, list) and len(v) == 3, f"{label}: {key} {v!r}"
        assert all(type(x) in (int, float) and math.isfinite(x) for x in v), f"{label}: {key} {v!r}"
    assert min(meta["std"]) > 0, f"{label}: std {meta['std']!r}"
    for key in ("config", "metrics"):
        assert isinstance(meta.get(key, {}), dict), f"{label}: {key} {meta.get(key)!r}"
    assert type(meta.get("epoch", 0)) is int, f"{label}: epoch {meta.get('epoch')!r}"


def _outcome(path: Path, label: str) -> str:
    """'ok' (and then usable) or 'refused'; anything else fails the test with the case that caused it."""
    try:
        read_metadata(path)
        tensors, meta = read_model_file(path)
    except CheckpointError as exc:
        assert str(path) in str(exc), f"{label}: message does not name the file: {exc}"
        return "refused"
    except BaseException as exc:  # noqa: BLE001 - the property: nothing but CheckpointError escapes
        pytest.fail(f"{label}: {type(exc).__name__} escaped the loader: {exc}")
    _usable(tensors, meta, label)
    return "ok"


def _random_json(rng: random.Random, depth: int = 0):
    choice = rng.randrange(11 if depth < 2 else 8)
    if choice == 0:
        return None
    if choice == 1:
        return rng.random() < 0.5
    if choice == 2:
        return rng.choice([0, -1, 1, 3, 224, 8193, 2**63, -(2**70), 10**30])
    if choice == 3:
        return rng.choice([0.0, -0.5, 0.5, 1e308, float("nan"), float("inf"), float("-inf")])
    if choice == 4:
        return rng.choice(["", " ", "224", "akari", "ゆき", "\x00", "\ud800x"[1:], "a" * 300])
    if choice == 5:
        return rng.uniform(-10, 10)
    if choice == 6:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(6)))
    if choice == 7:
        return rng.randrange(-5, 10)
    if choice == 8:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    if choice == 9:
        return [rng.choice(["akari", "ゆき", "akari", ""]) for _ in range(rng.randrange(1, 5))]
    return {rng.choice(["a", "kind", "epoch", "x"]): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_random_bytes(tmp_path):
    rng = random.Random(20240611)
    outcomes = []
    for i in range(120):
        n = rng.choice([0, 1, 7, 8, 9, 16, 64, 300, 4096])
        body = bytes(rng.randrange(256) for _ in range(n))
        kind = i % 4
        if kind == 1:  # a plausible safetensors start: a header length that fits, then "{"
            body = struct.pack("<Q", max(2, n - 8)) + b"{" + body[9:]
        elif kind == 2:  # a claimed header far larger than the file (up to 2**64 - 1)
            body = struct.pack("<Q", rng.choice([2**64 - 1, 2**63, 2**40, 10**8, n + 1])) + b"{" + body
        elif kind == 3:  # a header that is not valid UTF-8 / not JSON
            junk = b"{\xff\xfe\"__metadata__\":" + body
            body = struct.pack("<Q", len(junk)) + junk
        path = tmp_path / f"bytes{i}.pth"
        path.write_bytes(body)
        outcomes.append(_outcome(path, f"random bytes case {i} ({body[:24]!r}...)"))
    assert set(outcomes) == {"refused"}


def test_random_byte_edits_and_truncations(valid, tmp_path):
    rng = random.Random(7)
    (header_len,) = struct.unpack("<Q", valid[:8])
    outcomes = []
    for i in range(160):
        data = bytearray(valid)
        op = i % 4
        if op == 0:  # truncate anywhere
            data = data[: rng.randrange(len(data))]
        elif op == 1:  # flip a few bytes, mostly in the length + header
            for _ in range(rng.randrange(1, 6)):
                pos = rng.randrange(8 + header_len) if rng.random() < 0.8 else rng.randrange(len(data))
                data[pos] = rng.randrange(256)
        elif op == 2:  # insert or delete a chunk
            pos = rng.randrange(len(data))
            if rng.random() < 0.5:
                del data[pos : pos + rng.randrange(1, 32)]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32)))
        else:  # overwrite the tensor bytes with garbage (may create NaN/Inf or stay finite)
            start = 8 + header_len + rng.randrange(len(valid) - 8 - header_len)
            data[start : start + 16] = bytes(rng.randrange(256) for _ in range(16))
            data = data[: len(valid)]
        path = tmp_path / f"edit{i}.pth"
        path.write_bytes(bytes(data))
        outcomes.append(_outcome(path, f"byte edit case {i} (op {op})"))
    assert "refused" in outcomes and "ok" in outcomes  # both paths are exercised


def test_random_json_edits_of_the_metadata(valid, tmp_path):
    rng = random.Random(99)
    header, body = _split(valid)
    base = json.loads(header["__metadata__"]["metadata"])
    outcomes = []
    for i in range(200):
        meta = json.loads(json.dumps(base))
        h = json.loads(json.dumps(header))
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(10)
            key = rng.choice(sorted(meta) + ["extra"]) if isinstance(meta, dict) else None
            if op == 0:
                meta = _random_json(rng)  # the whole metadata replaced
            elif not isinstance(meta, dict):
                continue
            elif op in (1, 2):
                meta.pop(key, None)
            elif op == 3 and isinstance(meta.get(key), list) and meta[key]:
                meta[key][rng.randrange(len(meta[key]))] = _random_json(rng)
            elif op == 4:  # edit the safetensors header around the metadata
                field = rng.choice(["format", "format_version"])
                h["__metadata__"][field] = rng.choice(["", "1", "2", "animeai.model", "pt", "ゆき"])
            elif op == 5:  # a tensor entry of the safetensors header
                entry = h[rng.choice([k for k in h if k != "__metadata__"])]
                field = rng.choice(["dtype", "shape", "data_offsets"])
                entry[field] = rng.choice([None, "F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "X9", [], [3],
                                           [2, 2], [0, 10**12], [-1, 4], "abc"])
            else:
                meta[key] = _random_json(rng)
        h["__metadata__"]["metadata"] = json.dumps(meta, ensure_ascii=rng.random() < 0.5)
        path = tmp_path / f"json{i}.pth"
        path.write_bytes(_join(h, body))
        outcomes.append(_outcome(path, f"json edit case {i}: {json.dumps(meta)[:200]}"))
    assert outcomes.count("refused") > 20 and outcomes.count("ok") > 5  # both paths are exercised


def test_info_never_crashes_on_damaged_files(valid, tmp_path, capsys):
    rng = random.Random(3)
    (header_len,) = struct.unpack("<Q", valid[:8])
    codes = []
    for i in range(40):
        data = bytearray(valid)
        if i % 3 == 0:  # truncated
            data = data[: rng.randrange(len(data))]
        elif i % 3 == 1:  # a few bytes changed anywhere
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:  # a float32 NaN written into the tensor bytes
            pos = rng.randrange(8 + header_len, len(data) - 4)
            data[pos : pos + 4] = struct.pack("<f", float("nan"))
        path = tmp_path / f"info{i}.pth"
        path.write_bytes(bytes(data))
        try:  # cmd_info itself, not main: main maps CheckpointError to 2 but would hide any other exception too
            codes.append(cmd_info(argparse.Namespace(model=str(path))))
        except CheckpointError:
            codes.append(2)
        capsys.readouterr()
    assert set(codes) <= {0, 1, 2} and 2 in codes and 1 in codes
