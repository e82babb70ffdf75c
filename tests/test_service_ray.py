"""The similarity service on Ray Serve (animeai.distributed.serve): 2 reader replicas + 1 writer on a local Ray;
an enrolment through any replica is seen by every replica; auth and errors are the one-process app's."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.ray

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from tests.test_service import AUTH, TOKEN, files, free_port, model_file, png  # noqa: E402,F401


@pytest.fixture
def served(model_file, tmp_path):  # noqa: F811
    from ray import serve

    from animeai.distributed import serve as rs

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2,
             log_to_driver=False)
    port = free_port()
    try:
        rs.run(str(model_file), str(tmp_path / "db"), port=port, replicas=2, blocking=False, token=TOKEN,
               poll_s=0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_one_writer(served):
    url = served
    role = "新角色 ray"  # a unicode name with a space: in paths it crosses the proxy and the reader percent-encoded
    with httpx.Client(base_url=url, timeout=60) as h:
        assert h.get("/readyz").json()["roles"] == 3
        assert h.post("/roles", data={"name": "x"}, files=files(png(1))).status_code == 401
        r = h.post("/roles", data={"name": role}, files=files(png(1), png(2)), headers=AUTH)
        assert r.status_code == 201, r.text
        assert h.post("/roles", data={"name": role}, files=files(png(1)), headers=AUTH).status_code == 409
        assert h.post("/identify", files=files(b"nope", names=["bad.txt"])).status_code == 400
        deadline = time.time() + 30
        seen = []
        while time.time() < deadline:  # every replica picks the new version up within a few polls
            seen = [[role in {x["name"] for x in h.get("/roles").json()["roles"]}] for _ in range(8)]
            if all(s[0] for s in seen):
                break
            time.sleep(0.5)
        assert all(s[0] for s in seen), seen
        res = h.post("/identify", params={"k": 4}, files=files(png(1))).json()["results"][0]["matches"]
        assert role in {m["role"] for m in res}
        assert h.get(f"/roles/{role}/thumbnail").status_code == 200
        assert h.delete(f"/roles/{role}", headers=AUTH).status_code == 200
        deadline = time.time() + 30
        while time.time() < deadline:
            names = [{x["name"] for x in h.get("/roles").json()["roles"]} for _ in range(8)]
            if not any(role in n for n in names):
                break
            time.sleep(0.5)
        assert not any(role in n for n in names)
