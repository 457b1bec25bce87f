"""Load test of `catdog serve`: a real uvicorn on 127.0.0.1, a bounded number of POST /predict, N at a time.

    python benchmarks/load_test.py RUN [--requests 2000] [--concurrency 16] [--image PHOTO] [--cam] [--json]

Starts the server itself (or uses --url of one already running on this machine), waits for /healthz, sends
--requests uploads of one photo with --concurrency in flight, and prints p50/p90/p99 latency, requests per second
and errors. Traffic only ever goes to the loopback address; the loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO / "data" / "cats_and_dogs" / "test" / "cats" / "cat.4001.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(run: str | Path, port: int | None = None, timeout: float = 120.0, extra: tuple[str, ...] = ()):
    """`catdog serve RUN` in a subprocess on 127.0.0.1; yields its base URL once /healthz answers."""
    port = port or free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "catdog", "serve", str(run), "--host", "127.0.0.1",
                             "--port", str(port), *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _load(url: str, image: bytes, n: int, concurrency: int, cam: bool, time_limit: float) -> dict:
    latencies, server_ms, errors = [], [], []
    todo = iter(range(n))
    deadline = time.monotonic() + time_limit
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def worker():
            for i in todo:
                if time.monotonic() > deadline:
                    errors.append("time limit reached")
                    return
                t0 = time.perf_counter()
                try:
                    r = await client.post("/predict" + ("?cam=1" if cam else ""),
                                          files={"file": (f"photo-{i}.jpg", image, "image/jpeg")})
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                        continue
                    server_ms.append(r.json()["latency_ms"])
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.zeros(1)
    return {"requests": n, "concurrency": concurrency, "cam": cam, "ok": len(latencies), "errors": len(errors),
            "error_samples": errors[:5], "wall_s": round(wall, 2), "req_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p90_ms": round(float(np.percentile(lat, 90)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "max_ms": round(float(lat.max()), 1),
            "server_p50_ms": round(float(np.median(server_ms)), 2) if server_ms else None}


def load_test(url: str, image: bytes, requests: int = 2000, concurrency: int = 16, cam: bool = False,
              time_limit: float = 600.0) -> dict:
    """Send `requests` uploads of `image`, `concurrency` at a time; latency percentiles, rate and errors."""
    host = httpx.URL(url).host
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"load tests only target this machine's loopback address, not {host}")
    return asyncio.run(_load(url, image, requests, concurrency, cam, time_limit))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", help="run folder, .pt or .onnx to serve (omit with --url)")
    ap.add_argument("--url", help="an already running server on 127.0.0.1")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--image", default=str(DEFAULT_IMAGE), help="photo to upload")
    ap.add_argument("--cam", action="store_true", help="ask for the CAM overlay too")
    ap.add_argument("--warmup", type=int, default=20, help="requests sent first and not counted")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.run and not args.url:
        ap.error("give a RUN to serve or the --url of a running server")
    image = Path(args.image).read_bytes()
    with (contextlib.nullcontext(args.url) if args.url else running_server(args.run)) as url:
        if args.warmup:
            load_test(url, image, args.warmup, min(args.concurrency, args.warmup), args.cam)
        result = load_test(url, image, args.requests, args.concurrency, args.cam)
    result["image"] = args.image
    result["cpu_cores"] = os.cpu_count()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['ok']}/{result['requests']} ok, {result['errors']} errors, {result['concurrency']} concurrent"
              f"{' (with CAM)' if args.cam else ''}: p50 {result['p50_ms']} ms, p90 {result['p90_ms']} ms, "
              f"p99 {result['p99_ms']} ms, {result['req_per_s']} req/s "
              f"(server-side p50 {result['server_p50_ms']} ms, {result['cpu_cores']} cores)")
        for e in result["error_samples"]:
            print("  error:", e)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
