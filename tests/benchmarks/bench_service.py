"""Load on the similarity service over loopback (issue 14): p50/p99 latency and throughput of /identify/embedding
and /identify (one 64 px or --image-size PNG per request) at 1, 10 and 50 concurrent clients, on one uvicorn process
or (--ray N) on a local Ray Serve with N reader replicas.

    python tests/benchmarks/bench_service.py [--model M --db D] [--requests 200] [--clients 1 10 50] [--ray 2]

Without --model it builds a tiny Lite0 (offline weights, 64 px, 3 classes + 2 enrolled roles) in a temp folder.
Bounded: each level sends --requests requests in all (split over the clients), to 127.0.0.1 only. Also prints where
an upload's time goes inside the server (decode, embed, search) measured in-process on the same image.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson


def tiny_model(folder: Path) -> Path:
    import torch

    from animeai.checkpoint import save_model_file
    from animeai.models import create_model, get_model_spec

    spec = get_model_spec("efficientnet_lite0")
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=3, pretrained="package")
    meta = {"kind": "classifier", "arch": "efficientnet_lite0", "num_classes": 3, "class_names": ["a", "b", "c"],
            "image_size": 64, "mean": list(spec.mean), "std": list(spec.std), "config": {}, "metrics": {}}
    path = folder / "model.pth"
    save_model_file(path, model.state_dict(), meta)
    return path


def png(seed: int, size: int) -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = (int(v) for v in rng.integers(0, size - size // 4, 2))
        d.ellipse([x, y, x + size // 4, y + size // 4], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def http_request(method: str, path: str, body: bytes = b"", content_type: str | None = None,
                 headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 keep-alive request, as bytes (built once, sent many times)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def multipart(field: str, filename: str, data: bytes, mime: str) -> tuple[bytes, str]:
    boundary = "benchboundary7f3a"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {mime}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def _read_response(reader) -> int:
    """Status of one response, its body read and dropped (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in fields:
        await reader.readexactly(int(fields["content-length"]))
    elif fields.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


def load(port: int, clients: int, total: int, request: bytes, timeout_s: float = 120.0) -> dict:
    """``clients`` keep-alive connections to 127.0.0.1:``port`` sending ``request`` back to back, ``total`` requests
    in all: latency percentiles, throughput and the load generator's own CPU per request. An asyncio client on raw
    sockets, so that on a 2-core machine the numbers describe the server more than the load generator (the httpx
    client in threads used before added about 2 ms a request at 1 client; README, "Measured")."""
    import asyncio

    per = max(1, total // clients)
    lat: list[float] = []
    errors: list[int] = []

    async def client():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(per):
                t = time.perf_counter()
                writer.write(request)
                status = await _read_response(reader)
                lat.append(time.perf_counter() - t)
                if status != 200:
                    errors.append(status)
        finally:
            writer.close()

    async def all_clients():
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), timeout_s)

    t0, cpu0 = time.perf_counter(), time.process_time()
    asyncio.run(all_clients())
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    lat.sort()
    return {"clients": clients, "requests": len(lat), "errors": len(errors),
            "client_cpu_ms_per_request": round(1000 * cpu / max(len(lat), 1), 3),
            "p50_ms": round(1000 * lat[len(lat) // 2], 2), "p99_ms": round(1000 * lat[min(len(lat) - 1,
                                                                                       int(0.99 * len(lat)))], 2),
            "throughput_rps": round(len(lat) / wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--db")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--endpoints", nargs="+", default=["identify_embedding", "identify_upload"],
                    choices=["identify_embedding", "identify_upload"])
    ap.add_argument("--out", help="write the report as JSON here")
    ap.add_argument("--ray", type=int, default=0, metavar="N", help="serve on a local Ray Serve with N replicas")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)  # internal: run the server on this port
    args = ap.parse_args()
    import socket
    import subprocess

    from animeai.online import OnlineLearningSystem

    if args.child:
        import uvicorn

        from animeai.online.service import create_app

        if args.ray:
            from animeai.distributed.serve import run

            run(args.model, args.db, port=args.child, replicas=args.ray, token="bench-token-xyz")
            return 0
        ol = OnlineLearningSystem(args.model, args.db, device="cpu")
        uvicorn.run(create_app(ol, token="bench-token-xyz"), host="127.0.0.1", port=args.child,
                    log_level="warning", access_log=False)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="bench-service-"))
    model = Path(args.model) if args.model else tiny_model(tmp)
    ol = OnlineLearningSystem(model, args.db or tmp / "db", device="cpu")
    if not args.model:
        from PIL import Image

        for i, name in enumerate(["new1", "new2"]):
            ol.add_new_role(name, [Image.open(io.BytesIO(png(10 * i + j, 64))) for j in range(4)])
    # where an upload's time goes, in-process (median of 30): decode, embed (transform + model), search (+ scoring)
    from animeai.data.images import load_image

    image = png(123, args.image_size)
    f = tmp / "x.png"
    f.write_bytes(image)
    parts = {"decode": [], "embed": [], "search": []}
    for _ in range(30):
        t0 = time.perf_counter()
        im = load_image(f, draft_size=ol.clf.image_size)
        t1 = time.perf_counter()
        feats = ol.embed([im])
        t2 = time.perf_counter()
        ol.identify_features(feats, 5)
        t3 = time.perf_counter()
        parts["decode"].append(t1 - t0)
        parts["embed"].append(t2 - t1)
        parts["search"].append(t3 - t2)
    breakdown = {k: round(1000 * statistics.median(v), 2) for k, v in parts.items()}  # before the server starts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the server in its own process (as `animeai serve` runs it), so the load generator does not share its GIL
    child = subprocess.Popen([sys.executable, __file__, "--child", str(port), "--model", str(model),
                              "--db", str(args.db or tmp / "db"), "--ray", str(args.ray)])
    import httpx

    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            if time.time() > deadline or child.poll() is not None:
                raise SystemExit("the server did not start") from None
            time.sleep(0.2)
    from PIL import Image

    emb = ol.embed([Image.open(io.BytesIO(image))])[0].tolist()
    report = {"server": f"ray serve, {args.ray} replicas" if args.ray else "one uvicorn process",
              "model": str(model), "dim": ol.dim, "roles": ol.db.num_roles, "vectors": ol.db.num_vectors,
              "image_bytes": len(image), "image_size": args.image_size, "results": []}
    body, ctype = multipart("images", "x.png", image, "image/png")
    requests = {"identify_embedding": http_request("POST", "/identify/embedding", orjson.dumps({"embedding": emb}),
                                                   "application/json"),
                "identify_upload": http_request("POST", "/identify", body, ctype)}
    for clients in args.clients:
        for name in args.endpoints:
            load(port, min(clients, 4), min(20, args.requests), requests[name])  # warm-up
            row = {"endpoint": name, **load(port, clients, args.requests, requests[name])}
            report["results"].append(row)
            print(json.dumps(row), flush=True)
    report["upload_breakdown_ms"] = breakdown
    single = [r for r in report["results"] if r["endpoint"] == "identify_upload" and r["clients"] == 1]
    if single:
        report["upload_breakdown_ms"]["http_and_rest"] = round(single[0]["p50_ms"] - sum(breakdown.values()), 2)
    print(json.dumps({"upload_breakdown_ms": report["upload_breakdown_ms"]}), flush=True)
    child.terminate()
    child.wait(30)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
