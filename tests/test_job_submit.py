"""A real `ray job submit` round trip against a local head started here (dashboard + job server)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    ray_bin = shutil.which("ray", path=str(BIN)) or shutil.which("ray")
    dash = _free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "RAY_DASHBOARD_PORT": str(dash), "RAY_PORT": str(_free_port()), "RAY_CPUS": "2",
           "RAY_OBJECT_STORE_BYTES": str(100 * 1024**2), "RAY": ray_bin}
    subprocess.run([str(REPO / "cluster" / "local.sh"), "start"], env=env, check=True, capture_output=True,
                   timeout=120)
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
    env["RAY_AUTH_MODE"] = "token"  # `ray start` turns token auth on; the job CLI must send ~/.ray/auth_token
    env.pop("RAY_ADDRESS", None)
    try:
        yield env
    finally:
        subprocess.run([str(REPO / "cluster" / "local.sh"), "stop"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_smoke_test_writes_the_model(ray_head, tmp_path):
    out = tmp_path / "model.pth"
    proc = subprocess.run(
        [ray_head["RAY"], "job", "submit", "--working-dir", str(REPO), "--",
         "python", "jobs/train_detector.py", "--smoke-test", "--num-workers", "2", "--out", str(out),
         "--storage-path", str(tmp_path / "ray")],
        env=ray_head, capture_output=True, text=True, timeout=540, cwd=REPO,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower()
    # worker progress reaches the job log: one line per epoch (not one per print path or per rank), and
    # none of Ray Train's per-worker "Reporting training result ... TrainingReport(...)" lines
    assert [log.count(f"epoch {e}/2  ") for e in (1, 2)] == [1, 1], log[-4000:]
    assert "Reporting training result" not in log and "TrainingReport(" not in log
    assert f'"model": "{out}"' in log  # the final JSON names where the model really is
    from animeai.inference import Classifier

    clf = Classifier.from_file(out)
    assert len(clf.class_names) == 4

    # default (relative) --out / --storage-path would land in Ray's temporary copy of the working dir:
    # the job is refused with what to pass, and nothing is written there
    proc = subprocess.run(
        [ray_head["RAY"], "job", "submit", "--working-dir", str(REPO), "--",
         "python", "jobs/train_detector.py", "--smoke-test", "--num-workers", "2"],
        env=ray_head, capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "failed" in log.lower(), log[-4000:]
    assert "relative output path in a submitted Ray job (--out models/character_classifier.pth, " \
           "--storage-path runs/ray)" in log, log[-4000:]
    assert "working_dir_files" in log  # the entrypoint really ran inside Ray's unpacked copy


def test_unreachable_cluster_fails_fast():
    import time as _time

    import ray

    from animeai.distributed.trainer import DistributedError, connect

    if ray.is_initialized():
        pytest.skip("a Ray instance is already connected in this process")
    t0 = _time.perf_counter()
    with pytest.raises(DistributedError, match="no Ray cluster reachable at 127.0.0.1:1"):
        connect("127.0.0.1:1")
    assert _time.perf_counter() - t0 < 30
