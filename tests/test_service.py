"""The similarity service (animeai.online.service, issue 14): every endpoint and error code over HTTP, auth, hostile
uploads never reaching the 500 handler, durability across kill -9 + restart of `animeai serve`, concurrent identify +
enrol. A Lite0 at 64 px (offline weights) whose database holds the classifier rows as prototypes."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")
faiss.omp_set_num_threads(1)

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from animeai.checkpoint import save_model_file  # noqa: E402
from animeai.online import OnlineLearningSystem  # noqa: E402
from animeai.online.service import check_auth_config, create_app, is_loopback, load_token  # noqa: E402

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLASSES = ["akari", "kyoko", "yui"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from animeai.models import create_model, get_model_spec

    spec = get_model_spec("efficientnet_lite0")
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=len(CLASSES), pretrained="package")
    meta = {"kind": "classifier", "arch": "efficientnet_lite0", "num_classes": len(CLASSES), "class_names": CLASSES,
            "image_size": 64, "mean": list(spec.mean), "std": list(spec.std), "config": {}, "metrics": {}}
    path = tmp_path_factory.mktemp("service") / "model.pth"
    save_model_file(path, model.state_dict(), meta)
    return path


def png(seed: int, size: int = 64, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(0, size - 16, 2))
        draw.ellipse([x, y, x + 16, y + 16], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def files(*blobs, names=None):
    names = names or [f"img{i}.png" for i in range(len(blobs))]
    return [("images", (n, b, "image/png")) for n, b in zip(names, blobs)]


@pytest.fixture
def system(model_file, tmp_path):
    return OnlineLearningSystem(model_file, tmp_path / "db", device="cpu")


@pytest.fixture
def client(system):
    app = create_app(system, token=TOKEN)
    with TestClient(app) as c:  # raise_server_exceptions: a bug in a handler fails the test
        c.app_state = app.state
        yield c
    assert app.state.metrics.unhandled == 0


def db_files(db: Path) -> dict[str, bytes]:
    return {str(p.relative_to(db)): p.read_bytes() for p in sorted(db.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ endpoints


def test_probes_docs_page_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["roles"] == 3 and ready["dim"] > 0
    schema = client.get("/openapi.json").json()
    for path in ["/identify", "/identify/embedding", "/roles", "/roles/{name}", "/roles/{name}/images", "/healthz",
                 "/readyz", "/metrics", "/roles/{name}/thumbnail"]:
        assert path in schema["paths"], path
    assert "multipart/form-data" in schema["paths"]["/roles"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/identify" in page.text
    client.get("/roles")
    client.get("/nope")
    text = client.get("/metrics").text
    assert 'animeai_requests_total{method="GET",route="/roles",status="200"} 1' in text
    assert 'route="unmatched",status="404"' in text
    assert 'animeai_request_duration_seconds_bucket{route="/roles",le="+Inf"} 1' in text
    assert "animeai_index_vectors 0" in text and "animeai_roles 3" in text


def test_enrol_identify_add_delete(client, system):
    roles = client.get("/roles").json()["roles"]
    assert [(r["id"], r["name"], r["exemplars"]) for r in roles] == [(0, "akari", 0), (1, "kyoko", 0), (2, "yui", 0)]
    r = client.post("/roles", data={"name": "新角色"}, files=files(png(1), png(2), png(3)), headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["id"] == 3 and r.json()["exemplars"] == 3 and r.json()["thumbnails"] == 3
    assert [x["name"] for x in client.get("/roles").json()["roles"]][-1] == "新角色"
    thumb = client.get("/roles/新角色/thumbnail", params={"i": 2})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size[0] <= 128
    assert client.get("/roles/新角色/thumbnail", params={"i": 3}).status_code == 404
    assert client.get("/roles/akari/thumbnail").status_code == 404  # not enrolled over HTTP: no thumbnail
    # identify: two uploads, k=2
    r = client.post("/identify", params={"k": 2}, files=files(png(1), png(7), names=["a.png", "b.png"]))
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["filename"] for x in res] == ["a.png", "b.png"] and all(len(x["matches"]) == 2 for x in res)
    m = res[0]["matches"]
    assert m[0]["score"] >= m[1]["score"]
    assert {"id", "role", "score", "classifier", "database", "thumbnails"} <= set(m[0])
    assert len(client.post("/identify", params={"k": 50}, files=files(png(1))).json()["results"][0]["matches"]) == 4
    # the same answer from the embedding endpoint
    emb = system.embed([Image.open(io.BytesIO(png(1))).convert("RGB")])[0]
    e = client.post("/identify/embedding", params={"k": 2}, json={"embedding": emb.tolist()})
    assert e.status_code == 200 and [x["role"] for x in e.json()["results"][0]["matches"]] == [x["role"] for x in m]
    # more images
    r = client.post("/roles/新角色/images", files=files(png(4), png(5)), headers=AUTH)
    assert r.status_code == 200 and r.json()["exemplars"] == 5
    assert client.post("/roles/nobody/images", files=files(png(4)), headers=AUTH).status_code == 404
    # delete
    assert client.delete("/roles/nobody", headers=AUTH).status_code == 404
    r = client.delete("/roles/新角色", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"removed": "新角色", "roles": 3}
    assert client.get("/roles/新角色/thumbnail").status_code == 404
    assert "新角色" not in {x["name"] for x in client.get("/roles").json()["roles"]}


def test_auth_required_for_changes(client, system, tmp_path):
    before = db_files(system.db_path)
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}]:
        r = client.post("/roles", data={"name": "x"}, files=files(png(1)), headers=headers)
        assert r.status_code == 401 and "token" in r.json()["detail"], headers
        assert r.headers["www-authenticate"] == "Bearer"
        assert client.post("/roles/akari/images", files=files(png(1)), headers=headers).status_code == 401
        assert client.delete("/roles/akari", headers=headers).status_code == 401
    assert db_files(system.db_path) == before and len(system.list_roles()) == 3
    # reads are open by default, protected on request
    assert client.get("/roles").status_code == 200
    with TestClient(create_app(system, token=TOKEN, protect_reads=True)) as c:
        assert c.get("/roles").status_code == 401
        assert c.post("/identify", files=files(png(1))).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/roles", headers=AUTH).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_duplicate_and_bad_names(client):
    assert client.post("/roles", data={"name": "yui"}, files=files(png(1)), headers=AUTH).status_code == 409
    assert client.post("/roles", data={"name": "ｙｕｉ"}, files=files(png(1)), headers=AUTH).status_code == 201
    for bad in ["", " padded", "a/b", "x" * 300, "tab\there"]:
        r = client.post("/roles", data={"name": bad}, files=files(png(1)), headers=AUTH)
        assert r.status_code == 400, (bad, r.text)
    r = client.post("/roles", files=files(png(1)), headers=AUTH)
    assert r.status_code == 400 and "name" in r.json()["detail"]
    r = client.post("/roles", files={"name": (None, "nobody")}, headers=AUTH)  # multipart without a file
    assert r.status_code == 400 and "no image" in r.json()["detail"]
    r = client.post("/roles", data={"name": "nobody"}, headers=AUTH)  # urlencoded
    assert r.status_code == 400 and "multipart" in r.json()["detail"]
    r = client.post("/roles", json={"name": "x"}, headers=AUTH)
    assert r.status_code == 400 and "multipart" in r.json()["detail"]


def test_bad_uploads_are_400_naming_the_file_and_change_nothing(model_file, tmp_path):
    system = OnlineLearningSystem(model_file, tmp_path / "db", device="cpu")
    app = create_app(system, token=TOKEN, max_pixels=1_000_000)
    good = png(1)
    bomb = io.BytesIO()
    Image.new("1", (4000, 4000)).save(bomb, format="PNG")  # 16 M pixels in a few kB
    cases = {"notes.txt": b"this is not an image", "cut.png": good[: len(good) // 2], "empty.png": b"",
             "bomb.png": bomb.getvalue(), "garbage.jpg": b"\xff\xd8\xff\xe0" + os.urandom(500)}
    with TestClient(app) as c:
        before_roles, before_files = c.get("/roles").json(), db_files(system.db_path)
        for name, blob in cases.items():
            for url, data in [("/roles", {"name": "new"}), ("/roles/akari/images", None), ("/identify", None)]:
                r = c.post(url, data=data, files=files(good, blob, names=["fine.png", name]), headers=AUTH)
                assert r.status_code == 400, (name, url, r.text)
                body = r.json()
                assert name in body["detail"] and [e["filename"] for e in body["errors"]] == [name]
        assert "too large" in c.post("/identify", files=files(bomb.getvalue(), names=["b.png"])).json()["detail"]
        assert "truncated" in c.post("/identify", files=files(good[:200], names=["t.png"])).json()["detail"]
        # a hostile file name is shown, printable, and never breaks the JSON
        r = c.post("/identify", files=files(b"x", names=["\x1b[31mevil\n.png"]))
        assert r.status_code == 400 and "evil" in r.json()["detail"]
        assert c.get("/roles").json() == before_roles and db_files(system.db_path) == before_files
        assert not (Path(str(system.db_path) + ".thumbnails") / "x").exists()
    assert app.state.metrics.unhandled == 0


def test_upload_too_large_is_413_while_streaming(model_file, tmp_path):
    system = OnlineLearningSystem(model_file, tmp_path / "db", device="cpu")
    app = create_app(system, token=TOKEN, max_upload_bytes=100_000)
    big = os.urandom(150_000)
    with TestClient(app) as c:
        r = c.post("/identify", files=files(big))  # Content-Length over the limit: refused before reading
        assert r.status_code == 413 and "too large" in r.json()["detail"]

        def chunks():  # no Content-Length (chunked): counted as it streams in (TestClient buffers it, uvicorn not)
            boundary = b"--xyz\r\n"
            yield boundary + b'Content-Disposition: form-data; name="images"; filename="big.png"\r\n\r\n'
            for _ in range(100):
                yield os.urandom(10_000)

        r = c.post("/roles/akari/images", content=chunks(), headers={**AUTH, "Content-Type":
                                                                       "multipart/form-data; boundary=xyz"})
        assert r.status_code == 413
        r = c.post("/identify/embedding", content=b"[" + b"1.0," * 40_000 + b"1.0]",
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert c.post("/identify", files=files(png(1))).status_code == 200  # under the limit: fine
        text = c.get("/metrics").text
        assert 'route="/identify",status="413"' in text
    assert app.state.metrics.unhandled == 0


def test_embedding_validation(client, system):
    dim = system.dim
    ok = client.post("/identify/embedding", json={"embeddings": [[0.5] * dim, [1.0] * dim]}, params={"k": 3})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2 and len(ok.json()["results"][0]["matches"]) == 3
    bad = {
        "short": {"embedding": [1.0] * (dim - 1)},
        "long": {"embeddings": [[1.0] * dim, [1.0] * (dim + 1)]},
        "zero": {"embedding": [0.0] * dim},
        "none": {},
        "both": {"embedding": [1.0] * dim, "embeddings": [[1.0] * dim]},
        "empty": {"embeddings": []},
        "strings": {"embedding": ["a"] * dim},
        "huge": {"embedding": [3e38] * dim},
        "booleans": {"embedding": [True] * dim},
        "nulls": {"embedding": [None] + [1.0] * (dim - 1)},
        "nested": {"embedding": [[1.0]] * dim},
        "not a list": {"embeddings": {"a": [1.0] * dim}},
    }
    for what, body in bad.items():
        r = client.post("/identify/embedding", json=body)
        assert r.status_code == 422, (what, r.text)
    for token in [b"NaN", b"Infinity", b"-Infinity", b"1e400"]:
        raw = b'{"embedding": [' + b", ".join([token] + [b"1.0"] * (dim - 1)) + b"]}"
        r = client.post("/identify/embedding", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and ("NaN" in r.text or "finite" in r.text or "infinity" in r.text), token
    for raw in [b"{not json", b"[1.0, 2.0]", b"", "{\"embedding\": [1.0]}".encode("utf-16"), b"[" * 200_000,
                b'{"embedding": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"]:
        r = client.post("/identify/embedding", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"], raw
    # the schema still documents the body, though the handler parses it itself (orjson)
    body = client.get("/openapi.json").json()["paths"]["/identify/embedding"]["post"]["requestBody"]
    assert set(body["content"]["application/json"]["schema"]["properties"]) == {"embedding", "embeddings"}
    assert client.post("/identify/embedding", json={"embedding": [1.0] * dim}, params={"k": 0}).status_code == 422
    assert client.post("/identify", params={"k": "x"}, files=files(png(1))).status_code == 422


def test_malformed_requests_are_4xx(client, system):
    bad = [
        {"content": b"--xyz\r\nnot a header\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}},
        {"content": b"whatever", "headers": {"Content-Type": "multipart/form-data"}},  # no boundary
        {"content": b"", "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}},
        {"files": files(*[png(1)] * 65)},  # over the 64-file limit
        {"files": files(png(1), names=["../../../etc/passwd"])},  # the name is only ever shown, never a path
    ]
    for req in bad:
        for url, headers in [("/identify", {}), ("/roles/akari/images", AUTH)]:
            r = client.post(url, headers={**headers, **req.get("headers", {})},
                            **{k: v for k, v in req.items() if k != "headers"})
            assert 400 <= r.status_code < 500 or (r.status_code == 200 and req is bad[-1]), (url, r.text)
    assert client.post("/identify", params={"k": 10_000}, files=files(png(1))).status_code == 422
    assert client.get("/roles/akari/thumbnail", params={"i": -1}).status_code == 422
    assert client.get("/roles/%00/thumbnail").status_code == 404
    assert client.delete("/roles/" + "x" * 5000, headers=AUTH).status_code == 404


def test_auth_policy_and_cli_refusals(tmp_path, monkeypatch, capsys):
    from animeai.cli import main

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    with pytest.raises(ValueError, match="no token"):
        check_auth_config("127.0.0.1", None, False)
    with pytest.raises(ValueError, match="loopback"):
        check_auth_config("0.0.0.0", None, True)
    check_auth_config("127.0.0.1", None, True)
    check_auth_config("0.0.0.0", TOKEN, False)
    (tmp_path / "tok").write_text(TOKEN + "\n")
    (tmp_path / "empty").write_text("\n")
    assert load_token(tmp_path / "tok") == TOKEN and load_token(environ={"ANIMEAI_TOKEN": " t "}) == "t"
    assert load_token(environ={}) is None
    monkeypatch.delenv("ANIMEAI_TOKEN", raising=False)
    base = ["serve", "--model", "m.pth", "--db", "db"]
    for extra, msg in [([], "no token"), (["--no-auth", "--host", "0.0.0.0"], "loopback"),
                       (["--token-file", str(tmp_path / "empty")], "empty"),
                       (["--token-file", str(tmp_path / "missing")], "cannot read")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and TOKEN not in err


def test_failed_enrolment_changes_nothing_on_disk(client, system, monkeypatch):
    before = db_files(system.db_path), client.get("/roles").json()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(system.db), "save", boom)
    with pytest.raises(OSError):  # a real failure is a 500 (raised by TestClient here), never a half change
        client.post("/roles", data={"name": "new"}, files=files(png(1)), headers=AUTH)
    monkeypatch.undo()
    assert (db_files(system.db_path), client.get("/roles").json()) == before
    client.app_state.metrics.unhandled = 0  # that one was provoked on purpose


# ------------------------------------------------------------------------------------------ live servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_concurrent_identify_and_enrol(system):
    import uvicorn

    app = create_app(system, token=TOKEN, max_upload_bytes=1_000_000)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}"
    errors, statuses = [], []
    emb = system.embed([Image.open(io.BytesIO(png(9))).convert("RGB")])[0].tolist()

    def reader(i):
        with httpx.Client(base_url=url, timeout=60) as h:
            for j in range(4):
                try:
                    if j % 2:
                        r = h.post("/identify", files=files(png(i * 10 + j)))
                    else:
                        r = h.post("/identify/embedding", json={"embedding": emb})
                    statuses.append(r.status_code)
                except Exception as exc:  # noqa: BLE001
                    errors.append(repr(exc))

    def writer(i):
        with httpx.Client(base_url=url, timeout=60, headers=AUTH) as h:
            try:
                statuses.append(h.post("/roles", data={"name": f"role{i}"}, files=files(png(100 + i), png(200 + i)))
                                .status_code)
                statuses.append(h.post(f"/roles/role{i}/images", files=files(png(300 + i))).status_code)
                if i == 0:
                    statuses.append(h.delete("/roles/role0").status_code)
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    def chunked():  # over the limit, no Content-Length: uvicorn answers 413 without taking the rest
        yield b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="big.png"\r\n\r\n'
        for _ in range(400):
            yield b"\0" * 10_000

    try:
        try:
            r = httpx.post(url + "/identify", content=chunked(), timeout=30,
                           headers={"Content-Type": "multipart/form-data; boundary=xyz"})
            assert r.status_code == 413
        except httpx.WriteError:  # the server closed the connection before the client finished sending: fine
            pass
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        threads += [threading.Thread(target=writer, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        server.should_exit = True
        thread.join(20)
    assert not errors and set(statuses) <= {200, 201} and len(statuses) == 4 * 4 + 3 * 2 + 1, (errors, statuses)
    assert [r["name"] for r in system.list_roles()] == CLASSES + ["role1", "role2"] or \
        sorted(r["name"] for r in system.list_roles()) == sorted(CLASSES + ["role1", "role2"])
    assert [r["exemplars"] for r in system.list_roles()][3:] == [3, 3]
    assert app.state.metrics.unhandled == 0


def test_enrolment_survives_kill_and_restart(model_file, tmp_path):
    db, port = tmp_path / "db", free_port()
    env = {**os.environ, "ANIMEAI_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "animeai.cli", "serve", "--model", str(model_file), "--db", str(db),
           "--port", str(port), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"

    def start():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read().decode())
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                time.sleep(0.2)
        proc.kill()
        raise AssertionError("server did not become ready")

    proc = start()
    try:
        r = httpx.post(url + "/roles", data={"name": "durable"}, files=files(png(1), png(2)), headers=AUTH,
                       timeout=60)
        assert r.status_code == 201, r.text
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        err = proc.stderr.read().decode()
    assert TOKEN not in err
    proc = start()
    try:
        roles = httpx.get(url + "/roles", timeout=10).json()["roles"]
        assert roles[-1]["name"] == "durable" and roles[-1]["exemplars"] == 2 and roles[-1]["thumbnails"] == 2
        assert httpx.get(url + "/roles/durable/thumbnail", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(20)
    assert json.loads(json.dumps(roles))  # plain JSON throughout


def test_search_threads(system):
    """The service runs FAISS one thread per query by default (no OpenMP team per request); an explicit count is
    applied, None leaves it as it is, a negative one is refused."""
    from animeai.online.feature_db import set_search_threads

    try:
        create_app(system, token=TOKEN, search_threads=3)
        assert faiss.omp_get_max_threads() == 3
        create_app(system, token=TOKEN)
        assert faiss.omp_get_max_threads() == 1
        set_search_threads(2)
        create_app(system, token=TOKEN, search_threads=None)
        assert faiss.omp_get_max_threads() == 2
        with pytest.raises(ValueError, match=">= 0"):
            set_search_threads(-1)
    finally:
        faiss.omp_set_num_threads(1)
