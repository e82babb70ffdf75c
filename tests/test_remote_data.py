"""Training data on object storage (issue 17): an S3 endpoint on loopback (moto's server), the synthetic characters
uploaded to it, then listing and splitting ``s3://`` roots, reading and decoding objects, bad objects reported by URL,
the detector trained from a bucket, and the Ray Data engine's decode tasks reading the objects themselves."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from animeai.data import remote  # noqa: E402
from animeai.data.folder import DatasetError, ImageFolderDataset, build_splits, has_train_val  # noqa: E402
from animeai.data.images import ImageError, load_image  # noqa: E402
from animeai.data.transforms import eval_transform  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def s3(synth_split_root):
    """A moto S3 server on 127.0.0.1, reached through fsspec's environment config (as a user would set
    ``FSSPEC_S3_ENDPOINT_URL`` for MinIO); the synthetic train/val characters uploaded to ``s3://animeai/chars``."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env["FSSPEC_S3_ENDPOINT_URL"] = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config

    fsspec.config.conf.clear()
    fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec reads FSSPEC_* once at import: re-read them
    fs, _ = remote.filesystem("s3://animeai")
    fs.mkdir("animeai")
    uploads = {f"animeai/chars/{p.relative_to(synth_split_root).as_posix()}": p.read_bytes()
               for p in sorted(synth_split_root.rglob("*")) if p.is_file() and not p.name.startswith(".")}
    fs.pipe(uploads)
    yield {"fs": fs, "url": "s3://animeai/chars", "local": synth_split_root, "count": len(uploads)}
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _put(s3, key: str, data: bytes) -> str:
    s3["fs"].pipe({f"animeai/{key}": data})
    s3["fs"].invalidate_cache()
    return f"s3://animeai/{key}"


def test_a_bucket_splits_like_the_same_folder(s3):
    local = build_splits(s3["local"], manifest="off")
    cloud = build_splits(s3["url"])
    assert has_train_val(s3["url"]) and cloud.layout == local.layout == "train/val folders"
    assert cloud.class_names == local.class_names
    assert len(cloud.train) == len(local.train) and len(cloud.val) == len(local.val)
    as_keys = sorted((Path(p).relative_to(s3["local"]).as_posix(), y) for p, y in local.train)
    assert sorted((u.split("/chars/", 1)[1], y) for u, y in cloud.train) == as_keys
    assert all(isinstance(u, str) and u.startswith("s3://animeai/chars/train/") for u, _ in cloud.train)


def test_objects_decode_like_the_files(s3):
    local = sorted(p for p in s3["local"].rglob("*.jpg"))[0]
    url = f"{s3['url']}/{local.relative_to(s3['local']).as_posix()}"
    assert torch.equal(torch.tensor(list(load_image(url).getdata())), torch.tensor(list(load_image(local).getdata())))


def test_bad_objects_are_named_by_url(s3):
    with pytest.raises(ImageError, match=r"s3://animeai/chars/nope\.png: no such object"):
        load_image("s3://animeai/chars/nope.png")
    bad = _put(s3, "odd/corrupt.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ImageError) as info:
        load_image(bad)
    assert str(info.value).startswith(bad + ": ") and info.value.path == bad
    big = _put(s3, "odd/big.png", b"x" * 2048)
    with pytest.raises(ImageError, match="larger than"):
        remote.read_object(big, max_bytes=1024)


def test_listing_skips_what_cannot_be_an_image_and_decoding_skips_what_does_not_decode(s3, capsys):
    root = "s3://animeai/listing"
    good = load_image(sorted(s3["local"].rglob("*.jpg"))[0])
    buf = io.BytesIO()
    good.save(buf, format="PNG")
    for c in ("ann", "bob"):
        for i in range(3):
            _put(s3, f"listing/{c}/{i}.png", buf.getvalue())
    _put(s3, "listing/ann/empty.jpg", b"")
    _put(s3, "listing/ann/notes.pdf", b"%PDF-1.4")
    _put(s3, "listing/ann/.hidden.png", b"x")
    _put(s3, "listing/bob/caption.txt", b"a caption")
    corrupt = _put(s3, "listing/bob/broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    splits = build_splits(root, val_fraction=0.25)
    reasons = {e.path: e.reason for e in splits.skipped}
    assert reasons == {f"{root}/ann/empty.jpg": "empty object (0 bytes)",
                       f"{root}/ann/notes.pdf": reasons[f"{root}/ann/notes.pdf"]}
    assert "not an image file name" in reasons[f"{root}/ann/notes.pdf"]
    with pytest.raises(DatasetError, match="strict"):
        build_splits(root, val_fraction=0.25, strict=True)
    # the corrupt object passes the listing; the dataset reports it when streamed and takes the next image
    samples = splits.train + splits.val
    assert corrupt in [u for u, _ in samples]
    ds = ImageFolderDataset([(corrupt, 1), samples[0]], eval_transform(32, (0.5,) * 3, (0.5,) * 3), on_error="skip")
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and label == samples[0][1]
    assert corrupt in capsys.readouterr().err
    with pytest.raises(ImageError, match="broken.png"):
        ImageFolderDataset([(corrupt, 1)], None, on_error="raise")[0]


def test_missing_prefix_and_unknown_protocol_are_clear_errors(s3):
    with pytest.raises(DatasetError, match="no character folders|no such bucket"):
        build_splits("s3://animeai/does-not-exist")
    with pytest.raises(DatasetError, match="no such bucket|cannot list"):
        build_splits("s3://no-such-bucket-here/chars")
    with pytest.raises(DatasetError, match=r"abfs://.*adlfs"):
        build_splits("abfs://container/chars")


def test_detector_trains_from_a_bucket(s3, tmp_path):
    from conftest import small_overrides

    from animeai.config import DetectorConfig, load_config
    from animeai.engine import train
    from animeai.inference import Classifier
    from animeai.tasks.detector import DetectorTask

    # one DataLoader worker: a forked process reads the objects too
    cfg = load_config(DetectorConfig, None, small_overrides(s3["url"], tmp_path, **{"run.epochs": 1,
                                                                                   "data.num_workers": 1}))
    result = train(cfg, DetectorTask(cfg))
    clf = Classifier.from_file(tmp_path / "model.pth", device="cpu")
    assert clf.class_names == build_splits(s3["local"], manifest="off").class_names
    assert result.best_metrics["val_top1"] >= 0.0 and (tmp_path / "run" / "split.json").read_text().count("s3://") > 0


@pytest.mark.ray
def test_ray_data_decode_tasks_read_the_objects(s3, local_ray):
    """Ray Data's decode tasks (other processes) read the objects themselves, with the driver's storage settings."""
    pytest.importorskip("ray")
    from animeai.distributed.ray_data import RayDataLoader, shard_order

    splits = build_splits(s3["url"])
    ds = ImageFolderDataset(splits.train, eval_transform(32, (0.5,) * 3, (0.5,) * 3), on_error="raise")
    loader = RayDataLoader(ds, 8, seed=1, rank=0, world=1, device="cpu", drop_last=True, cpus=1)
    loader.set_epoch(0)
    batches = list(loader)
    order = shard_order(len(ds), 1, 0, 0, 1)[: len(loader) * 8]
    assert torch.cat([b[1] for b in batches]).tolist() == [ds[i][1] for i in order]
    assert torch.equal(batches[0][0][:3], torch.stack([ds[i][0] for i in order[:3]]))


def test_ray_jobs_keep_data_urls_as_given():
    pytest.importorskip("ray")
    from animeai.config import DetectorConfig, load_config
    from animeai.distributed.trainer import _absolute_data_paths

    cfg = load_config(DetectorConfig, None, {"data.root": "s3://b/chars", "data.val_root": "gs://b/val"})
    out = _absolute_data_paths(cfg)
    assert (out.data.root, out.data.val_root) == ("s3://b/chars", "gs://b/val")
    local = _absolute_data_paths(load_config(DetectorConfig, None, {"data.root": "data/x"}))
    assert Path(local.data.root).is_absolute()


def test_online_enrolment_from_a_url_is_a_clear_error(tmp_path, synth_root):
    pytest.importorskip("faiss")
    from conftest import small_overrides

    from animeai.config import DetectorConfig, load_config
    from animeai.engine import train
    from animeai.online import OnlineLearningSystem
    from animeai.online.errors import OnlineError
    from animeai.tasks.detector import DetectorTask

    cfg = load_config(DetectorConfig, None, small_overrides(synth_root, tmp_path, **{"run.epochs": 1,
                                                                                      "run.max_steps_per_epoch": 1}))
    train(cfg, DetectorTask(cfg))
    with pytest.raises(OnlineError, match="s3://b/chars: enrolment reads a local folder"):
        OnlineLearningSystem(tmp_path / "model.pth", tmp_path / "db", data_root="s3://b/chars", device="cpu")
    assert not (tmp_path / "db").exists()


def test_data_check_of_a_url_says_there_is_no_manifest():
    from animeai.data.check import check_data

    with pytest.raises(DatasetError, match="s3://b/chars: `data check` builds the manifest of a local folder"):
        check_data("s3://b/chars")
