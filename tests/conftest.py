"""Shared fixtures: synthetic character data made in code, small fast configs, offline hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never wait on the network: hub look-ups fail at once instead of retrying for ~45 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HOLO20 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "holo20"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """6 synthetic characters x 24 images at 96 px, flat layout (split by the loader)."""
    from animeai.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synth") / "chars"
    make_synthetic_dataset(root, num_classes=6, images_per_class=24, image_size=96, seed=0)
    return root


@pytest.fixture(scope="session")
def synth_split_root(tmp_path_factory) -> Path:
    """4 synthetic characters with train/ and val/ folders."""
    from animeai.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synth_split") / "chars"
    make_synthetic_dataset(root, num_classes=4, images_per_class=20, image_size=96, seed=1, val_fraction=0.25)
    return root


def small_overrides(data_root: Path, tmp_path: Path, **extra) -> dict:
    """A detector config that trains in seconds on CPU: Lite0 (offline weights) at 64 px."""
    over = {
        "data.root": str(data_root),
        "data.image_size": 64,
        "data.num_workers": 0,
        "model.arch": "efficientnet_lite0",
        "model.pretrained": "package",
        "optim.batch_size": 16,
        "run.epochs": 2,
        "run.out": str(tmp_path / "model.pth"),
        "run.run_dir": str(tmp_path / "run"),
        "run.progress": False,
    }
    over.update(extra)
    return over


@pytest.fixture
def small_cfg(synth_root, tmp_path):
    from animeai.config import DetectorConfig, load_config

    def make(**extra):
        return load_config(DetectorConfig, None, small_overrides(synth_root, tmp_path, **extra))

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is much faster than two fighting threads.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on 2 CPUs for one test module (workers import the tests' helpers, never reach the hub)."""
    import ray

    tests_dir = str(Path(__file__).resolve().parent)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2,
             runtime_env={"env_vars": {"PYTHONPATH": tests_dir, "HF_HUB_OFFLINE": "1"}}, log_to_driver=True)
    yield
    ray.shutdown()
