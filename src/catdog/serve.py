"""HTTP API and web page: a FastAPI app factory; inference runs off the event loop; bad uploads get a 4xx JSON error.

Endpoints: POST /predict (multipart field `file`, or the raw image as the body; ?cam=1 adds a PNG overlay),
GET /healthz, GET /metadata, GET / (the page), /docs (Swagger UI served locally), /openapi.json.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import os
import sys
import time
from importlib import resources
from pathlib import Path

import anyio
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from catdog import __version__
from catdog.data import MAX_PIXELS, SkipImage
from catdog.predict import Classifier, cam_overlay_png

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and headers around the file itself
RAW_TYPES = ("application/octet-stream",)  # plus any image/*
BODY_IDLE_S = 30.0  # an upload that sends nothing for this long is answered 408, so it cannot hold a connection
log = logging.getLogger("catdog.serve")


def _run_metrics(source: Path, runner) -> dict:
    """What the run measured: its test-split results (results.json) and the checkpoint's validation score."""
    metrics: dict = {}
    meta = getattr(runner, "meta", {}) or {}
    for k in ("epoch", "val_acc"):
        if meta.get(k) not in (None, ""):
            metrics[k] = meta[k]
    results = source.parent / "results.json"
    if results.is_file():
        try:
            r = json.loads(results.read_text())
            # NaN (a metric undefined on a one-class split) is not JSON: it is reported as null
            metrics["test"] = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                               for k in ("n", "accuracy", "loss", "roc_auc") for v in [r.get(k)]}
        except (OSError, ValueError):
            pass  # a damaged results file only costs the metrics
    return metrics


def _error_status(reason: str) -> int:
    """400 for an empty upload, 413 for too many pixels, 422 for anything else that does not decode."""
    if reason.startswith("empty"):
        return 400
    if "too many pixels" in reason or "decompression bomb" in reason:
        return 413
    return 422


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` (header or bytes received)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise HTTPException(400, "invalid Content-Length header")
        if int(length) > limit:
            raise HTTPException(413, f"body of {int(length):,} bytes exceeds the limit of {limit:,} bytes")
    chunks, size = [], 0
    stream = request.stream()
    while True:
        with anyio.move_on_after(BODY_IDLE_S) as idle:
            chunk = await anext(stream, None)
        if idle.cancelled_caught:
            raise HTTPException(408, f"the upload stalled: no data for {BODY_IDLE_S:.0f} s")
        if chunk is None:
            break
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body exceeds the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _form_file(request: Request, body: bytes) -> tuple[bytes, str | None]:
    """The `file` field of a multipart body already read into memory."""
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except StarletteHTTPException as e:
        raise HTTPException(400, f"malformed multipart body: {e.detail}") from None
    except Exception as e:  # python-multipart raises several types for broken bodies
        raise HTTPException(400, f"malformed multipart body: {e}") from None
    try:
        upload = form.get("file")
        if upload is None and not form and body.strip():
            # python-multipart yields nothing for a body cut short of its closing boundary
            raise HTTPException(400, "malformed multipart body: no complete part (is the closing boundary missing?)")
        if upload is None:
            raise HTTPException(422, "the multipart form needs a 'file' field holding the image")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "the 'file' field must be a file upload (a part with a filename=\"...\"), "
                                     "not text")
        return await upload.read(), upload.filename
    finally:
        await form.close()


def create_app(run: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = MAX_PIXELS,
               threshold: float = 0.5, concurrency: int = 0, threads: int = 0) -> FastAPI:
    """The catdog app for a run folder, .pt or .onnx; uploads over max_bytes or max_pixels are refused.

    concurrency: inferences run at once (default: one per core); threads: per inference (0 = library default).
    """
    clf = Classifier.load(run, threshold, max_pixels=max_pixels, threads=threads)
    metrics = _run_metrics(clf.source, clf.runner)
    # Requests beyond this many wait for a free slot instead of oversubscribing the cores with torch threads.
    limiter = anyio.CapacityLimiter(concurrency or max(2, os.cpu_count() or 1))
    page = resources.files("catdog").joinpath("static/index.html").read_text(encoding="utf-8")

    app = FastAPIOffline(title="catdog", version=__version__, redoc_url=None,
                         description=f"Classifies photos as {' or '.join(clf.classes)}, with class activation maps.")

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect):  # the client hung up mid-upload: nobody to answer
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=499)  # nginx's "client closed request", for the access log

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, exc: RequestValidationError):  # one message, as every other 4xx
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or e['loc'][0]}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request parameter ({problems})"}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # last resort: log it, answer JSON, keep serving
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    def infer(data: bytes, cam: bool) -> dict:
        t0 = time.perf_counter()
        try:
            arr = clf.decode(data)  # (S, S, 3) uint8
        except SkipImage as e:
            raise HTTPException(_error_status(str(e)), f"cannot use this image: {e}") from None
        probs = clf.probs(arr[None])  # (1, 2)
        out = clf.to_prediction(probs[0]).to_dict()
        if cam:
            png = cam_overlay_png(data, clf.cams(arr[None], probs)[0], max_pixels=max_pixels)
            out["cam"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        out["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return out

    @app.post("/predict", summary="Classify one image",
              description="Send the image as multipart/form-data (field `file`) or as the raw body "
                          "(Content-Type image/* or application/octet-stream). `?cam=1` adds a PNG overlay "
                          "(a data: URL) of the class activation map.",
              responses={400: {"description": "empty or malformed body"}, 413: {"description": "too large"},
                         415: {"description": "unsupported content type"}, 422: {"description": "not a usable image"}},
              openapi_extra={"requestBody": {"content": {
                  "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                     "properties": {"file": {"type": "string", "format": "binary"}}}},
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def predict(request: Request, cam: bool = Query(False, description="add a class activation map overlay")):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        multipart = ctype == "multipart/form-data"
        if ctype and not (multipart or ctype.startswith("image/") or ctype in RAW_TYPES):
            raise HTTPException(415, f"unsupported content type {ctype!r}: send multipart/form-data with a "
                                     f"'file' field, or the raw image as image/* or application/octet-stream")
        if cam and clf.kind != "torch":
            raise HTTPException(400, "class activation maps need the PyTorch checkpoint; this server runs ONNX")
        body = await _read_body(request, max_bytes + (FORM_OVERHEAD if multipart else 0))
        filename = None
        if multipart:
            body, filename = await _form_file(request, body)
            if len(body) > max_bytes:
                raise HTTPException(413, f"file of {len(body):,} bytes exceeds the limit of {max_bytes:,} bytes")
        if not body:
            raise HTTPException(400, "empty upload: send an image as the multipart field 'file' or as the raw body")
        out = await anyio.to_thread.run_sync(infer, body, cam, limiter=limiter)
        return {"filename": filename, **out}

    @app.get("/healthz", summary="Liveness")
    async def healthz():
        return {"status": "ok"}

    @app.get("/metadata", summary="The model: classes, input size, kind and the run's metrics")
    async def metadata():
        return {**clf.info(), "cam": clf.kind == "torch", "max_bytes": max_bytes, "max_pixels": max_pixels,
                "metrics": metrics}

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    return app


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    if max_bytes < 1:
        raise ValueError("--max-mb must be positive")
    # One thread per inference and one inference per core: on 2 cores 92 req/s against 62 with torch's default
    # of all cores per inference, whose threads then fight over the same cores.
    app = create_app(run, max_bytes=max_bytes, threads=1)
    sock = _listening_socket(host, port)
    # a bounded graceful shutdown: a connection that never finishes its request cannot keep the server up
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=10)
    print(f"serving {run} on http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]} "
          f"(Ctrl-C to stop)", file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def _listening_socket(host: str, port: int):
    """The server's socket, bound here so that a taken port or an unknown host is one clear error, not a log."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"cannot serve on {host}:{port}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock
