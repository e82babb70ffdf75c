"""The similarity service on Ray Serve (issue 14): ``animeai serve --ray --replicas N``.

* ``Reader`` (N replicas, the HTTP ingress): each holds its own :class:`OnlineLearningSystem` and the same FastAPI
  app as one process (:func:`animeai.online.service.create_app`), so identification, listing, thumbnails, probes,
  the page and the docs are answered by any replica.
* ``Writer`` (1 replica, no HTTP): the one owner of changes. A reader forwards every mutating request
  (POST /roles, POST /roles/{name}/images, DELETE /roles/{name}) to it, unchanged (auth, limits and errors are
  the same code). After a change the writer saves the database (the library saves atomically) and the extended
  classifier next to it (``<db>.serve-model.pth``).
* **New versions**: a reader checks the database's ``CURRENT`` pointer at most every ``poll_s`` seconds (and at
  once after forwarding a write, so a client reads its own writes on that replica) and, when it changed, opens the
  new version in the background and swaps it in; a pair caught mid-write (model and database of different
  changes) is retried at the next check. The database folder must be on storage all replicas see (one machine,
  or a shared file system on a cluster).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger("animeai.serve.ray")

WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _model_copy(db: str | Path) -> Path:
    return Path(str(db) + ".serve-model.pth")


def _version(db: str | Path) -> str:
    try:
        return (Path(db) / "CURRENT").read_text().strip()
    except OSError:
        return ""


def _open_system(model: str, db: str):
    from animeai.online import OnlineLearningSystem

    copy = _model_copy(db)
    return OnlineLearningSystem(copy if copy.is_file() else model, db, device="cpu")


def _is_write(method: str, path: str) -> bool:
    return method in WRITE_METHODS and path != "/identify" and not path.startswith("/identify/")


async def _forward(app, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Run one request through an ASGI app in this process: a plain ASGI call (no client library, no socket),
    the body handed over at once, the client "disconnects" only after the whole response is sent."""
    drop = {b"host", b"content-length", b"transfer-encoding", b"connection"}
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": quote(path).encode("ascii"), "root_path": "",
        "query_string": query, "client": ("127.0.0.1", 0), "server": ("replica", 80),
        "headers": [(k.lower(), v) for k, v in headers if k.lower() not in drop]
        + [(b"host", b"replica"), (b"content-length", str(len(body)).encode("ascii"))],
    }
    done = asyncio.Event()
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    status, out_headers, chunks = 500, [], []

    async def receive():
        if pending:
            return pending.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status, out_headers
        if message["type"] == "http.response.start":
            status = int(message["status"])
            out_headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in drop]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    done.set()
    return status, out_headers, b"".join(chunks)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
class Writer:
    def __init__(self, model: str, db: str, options: dict[str, Any]):
        from animeai.online.service import create_app

        self.model, self.db = model, db
        self.system = _open_system(model, db)
        self.app = create_app(self.system, **options)

    async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        status, out_headers, content = await _forward(self.app, method, path, query, headers, body)
        if status < 300:
            await asyncio.to_thread(self.system.save_model, _model_copy(self.db))
        return status, out_headers, content


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Reader:
    def __init__(self, writer, model: str, db: str, options: dict[str, Any], poll_s: float = 1.0):
        from animeai.online.service import create_app

        self.writer, self.model, self.db, self.options, self.poll_s = writer, model, db, options, poll_s
        self.max_body = int(options.get("max_upload_bytes") or 20 * 1024 * 1024)
        self.version = _version(db)
        self.app = create_app(_open_system(model, db), **options)
        self._checked = time.monotonic()
        self._reloading = threading.Lock()

    def _reload(self) -> None:
        from animeai.online.service import create_app

        if not self._reloading.acquire(blocking=False):
            return
        try:
            version = _version(self.db)
            if version == self.version:
                return
            try:
                system = _open_system(self.model, self.db)
            except Exception as exc:  # a model/database pair caught mid-change: next check
                log.info("database %s not reloadable yet: %s", version, exc)
                return
            if _version(self.db) == version:
                self.app, self.version = create_app(system, **self.options), version
        finally:
            self._reloading.release()

    async def __call__(self, request: Request) -> Response:
        now = time.monotonic()
        if now - self._checked > self.poll_s:
            self._checked = now
            threading.Thread(target=self._reload, daemon=True).start()
        method, path = request.method, request.url.path
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            return Response(b'{"detail":"request body too large (limit %d bytes)"}' % self.max_body, 413,
                            media_type="application/json")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                return Response(b'{"detail":"request body too large (limit %d bytes)"}' % self.max_body, 413,
                                media_type="application/json")
        args = (method, path, request.url.query.encode("latin-1"), list(request.headers.raw), bytes(body))
        if _is_write(method, path):
            status, headers, content = await self.writer.handle.remote(*args)
            if status < 300:
                await asyncio.to_thread(self._reload)  # read your own write on this replica
        else:
            status, headers, content = await _forward(self.app, *args)
        return Response(content, status, headers={k.decode("latin-1"): v.decode("latin-1") for k, v in headers})


def build(model: str, db: str, *, replicas: int = 2, token: str | None = None, protect_reads: bool = False,
          max_upload_bytes: int = 20 * 1024 * 1024, poll_s: float = 1.0, search_threads: int | None = 1):
    """The Serve application (bind graph): ``replicas`` readers as ingress, one writer."""
    options = {"token": token, "protect_reads": protect_reads, "max_upload_bytes": max_upload_bytes,
               "search_threads": search_threads}
    writer = Writer.bind(model, db, options)
    return Reader.options(num_replicas=replicas).bind(writer, model, db, options, poll_s)


def run(model: str, db: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 2,
        blocking: bool = True, **options) -> None:
    """Start Ray (or join ``RAY_ADDRESS``), deploy, and serve HTTP on ``host:port``."""
    import ray

    if not ray.is_initialized():
        ray.init(address="auto" if _has_cluster() else None, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    _ensure_db(model, db)
    serve.run(build(model, db, replicas=replicas, **options), name="animeai", route_prefix="/",
              blocking=blocking)


def _has_cluster() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))


def _ensure_db(model: str, db: str) -> None:
    """Create the database once, before the replicas open it (they must not race to build it)."""
    if not (Path(db) / "CURRENT").exists():
        _open_system(model, db)
