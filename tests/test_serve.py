"""The HTTP API and page: predictions, CAM overlays, every bad upload a 4xx, off-loop inference, a real server."""
from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import os
import re
import struct
import time
import warnings
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from catdog.export import export_onnx

with warnings.catch_warnings():  # starlette suggests another httpx package; the one installed works
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient
from catdog.predict import Classifier
from catdog.serve import DEFAULT_MAX_BYTES, create_app
from conftest import REPO, launch_chromium, unimplemented_dds

PHOTOS = REPO / "data" / "cats_and_dogs" / "test"
CAT, DOG = PHOTOS / "cats" / "cat.4001.jpg", PHOTOS / "dogs" / "dog.4001.jpg"
ARTIFACTS = REPO / "test-artifacts"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("load_test", REPO / "benchmarks" / "load_test.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A valid 40000x40000 1-bit PNG (1.6 gigapixels, 4.8 GB as RGB) that compresses to ~200 KB."""
    side = 40_000
    row = b"\x00" + bytes(side // 8)  # filter byte + one bit per pixel
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def run(trained_runs) -> Path:
    return trained_runs["resnet"]


@pytest.fixture(scope="module")
def client(run) -> TestClient:
    return TestClient(create_app(run), raise_server_exceptions=False)


def _assert_still_serving(client: TestClient) -> None:
    r = client.post("/predict", files={"file": ("cat.jpg", CAT.read_bytes(), "image/jpeg")})
    assert r.status_code == 200 and r.json()["class"] in ("cats", "dogs")


def test_multipart_and_raw_bodies_give_the_classifiers_answer(client, run):
    photo = CAT.read_bytes()
    expected = Classifier.load(run).predict(photo)[0]
    r = client.post("/predict", files={"file": ("cat.jpg", photo, "image/jpeg")})
    body = r.json()
    assert r.status_code == 200 and body["filename"] == "cat.jpg"
    assert body["class"] == expected.label and body["probabilities"] == expected.probabilities
    assert body["latency_ms"] > 0 and "cam" not in body
    for headers in ({"content-type": "image/jpeg"}, {"content-type": "application/octet-stream"}, {}):
        raw = client.post("/predict", content=photo, headers=headers)
        assert raw.status_code == 200 and raw.json()["probabilities"] == expected.probabilities, headers


def test_cam_overlay_is_a_png_of_the_photo(client):
    photo = Image.open(DOG)
    r = client.post("/predict?cam=1", files={"file": ("dog.jpg", DOG.read_bytes(), "image/jpeg")})
    cam_url = r.json()["cam"]
    assert cam_url.startswith("data:image/png;base64,")
    cam = Image.open(io.BytesIO(base64.b64decode(cam_url.split(",", 1)[1])))
    scale = min(1, 320 / max(photo.size))
    assert cam.format == "PNG" and cam.size == (round(photo.width * scale), round(photo.height * scale))
    diff = np.abs(np.asarray(cam.convert("RGB"), np.int16) - np.asarray(photo.convert("RGB").resize(cam.size), np.int16))
    assert diff.mean() > 10, "the heatmap is blended in"


@pytest.mark.parametrize("name", ["chat_été_🐱.jpg", "猫の写真.jpg", "Ünïcödé name with spaces.jpeg"])
def test_unicode_file_names(client, name):
    r = client.post("/predict", files={"file": (name, CAT.read_bytes(), "image/jpeg")})
    assert r.status_code == 200 and r.json()["filename"] == name


def _icon() -> bytes:
    """An .ico file: Pillow decodes the pixels of such files while opening them, before any size check."""
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 30, 30)).save(buf, "ICO", sizes=[(256, 256)])
    return buf.getvalue()


def _bad_requests(bomb: bytes) -> dict:
    photo = CAT.read_bytes()
    over = bytes(DEFAULT_MAX_BYTES + 1)
    return {
        "empty raw body": (dict(content=b"", headers={"content-type": "image/jpeg"}), 400, "empty"),
        "empty file field": (dict(files={"file": ("a.jpg", b"", "image/jpeg")}), 400, "empty"),
        "text as an image": (dict(content=b"hello, not a picture", headers={"content-type": "image/png"}), 422, "not an image"),
        "text file upload": (dict(files={"file": ("notes.jpg", b"just text", "image/jpeg")}), 422, "not an image"),
        "truncated JPEG": (dict(content=photo[: len(photo) // 2], headers={"content-type": "image/jpeg"}), 422, "truncated"),
        "a format catdog does not read (DDS)": (dict(content=unimplemented_dds(), headers={"content-type": "image/jpeg"}),
                                                422, "unrecognised format"),
        "an icon (decoded while opening)": (dict(content=_icon(), headers={"content-type": "image/x-icon"}), 422,
                                         "unrecognised format"),
        "decompression bomb": (dict(files={"file": ("bomb.png", bomb, "image/png")}), 413, "too many pixels"),
        "raw body over 10 MB": (dict(content=over, headers={"content-type": "image/jpeg"}), 413, "exceeds the limit"),
        "chunked body over 10 MB": (dict(content=(bytes(1 << 20) for _ in range(11)), headers={"content-type": "image/jpeg"}),
                                    413, "exceeds the limit"),
        "file over 10 MB": (dict(files={"file": ("big.jpg", over, "image/jpeg")}), 413, "exceeds the limit"),
        "text/plain": (dict(content=photo, headers={"content-type": "text/plain"}), 415, "unsupported content type"),
        "JSON": (dict(json={"file": "cat.jpg"}), 415, "unsupported content type"),
        "form without file": (dict(files={"photo": ("cat.jpg", photo, "image/jpeg")}), 422, "needs a 'file' field"),
        "file as text field": (dict(files={"other": ("x", b"x")}, data={"file": "cat.jpg"}), 422, "must be a file upload"),
        "multipart without boundary": (dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}), 400, "malformed"),
        "multipart cut before its closing boundary": (dict(
            content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n' + photo[:100],
            headers={"content-type": "multipart/form-data; boundary=xyz"}), 400, "closing boundary"),
        "bad Content-Length": (dict(content=photo, headers={"content-type": "image/jpeg", "content-length": "abc"}), 400, "Content-Length"),
    }


@pytest.mark.parametrize("case", list(_bad_requests(b"")))
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(client, bomb, case):
    kwargs, status, fragment = _bad_requests(bomb)[case]
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, (case, r.text)
    assert fragment in r.json()["detail"], r.json()
    _assert_still_serving(client)


def test_bad_query_parameter_is_a_422_with_one_message(client):
    r = client.post("/predict?cam=perhaps", content=CAT.read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 422 and isinstance(r.json()["detail"], str) and "cam" in r.json()["detail"], r.json()


def test_a_jpeg_only_libjpeg_turbo_reads_gets_its_cam_overlay(client):
    """A short Adobe segment makes Pillow refuse a JPEG that libjpeg-turbo decodes: the overlay is decoded the way
    the model's input was, so the photo that was classified also gets its map."""
    photo = CAT.read_bytes()
    odd = photo[:2] + b"\xff\xee\x00\x07Adobe" + photo[2:]
    r = client.post("/predict?cam=1", content=odd, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    png = base64.b64decode(r.json()["cam"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == Image.open(CAT).size  # the 154x128 photo, under the 320 px cap


def test_the_page_answers_head_requests(client):
    assert client.head("/").status_code == 200


def test_metrics_that_are_not_numbers_are_null_in_metadata(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    results = json.loads((copy / "results.json").read_text())
    (copy / "results.json").write_text(json.dumps({**results, "roc_auc": float("nan")}))  # one class in the split
    meta = TestClient(create_app(copy), raise_server_exceptions=False).get("/metadata")
    assert meta.status_code == 200 and meta.json()["metrics"]["test"]["roc_auc"] is None


def _asgi_post(app, receive_messages) -> list[dict]:
    """POST /predict straight through the ASGI interface, the request body coming from `receive_messages`
    (an async function), so a test can stall or hang up the way a network client can."""
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"image/jpeg"), (b"content-length", b"100000")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive_messages, send))
    return sent


def test_a_stalled_upload_is_answered_408(run, monkeypatch):
    import catdog.serve as serve

    monkeypatch.setattr(serve, "BODY_IDLE_S", 0.3)
    first = [{"type": "http.request", "body": CAT.read_bytes()[:500], "more_body": True}]

    async def receive():
        if first:
            return first.pop()
        await asyncio.sleep(3600)  # the client sends nothing more and keeps the connection open

    t0 = time.perf_counter()
    sent = _asgi_post(create_app(run), receive)
    assert sent[0]["status"] == 408 and b"stalled" in sent[1]["body"] and time.perf_counter() - t0 < 30


def test_a_client_hanging_up_mid_upload_is_not_a_server_error(run, caplog):
    async def receive():
        return {"type": "http.disconnect"}

    with caplog.at_level("INFO", logger="catdog.serve"):
        sent = _asgi_post(create_app(run), receive)
    assert sent[0]["status"] == 499
    assert "client disconnected" in caplog.text and "unexpected error" not in caplog.text


def test_the_size_limit_is_configurable(run):
    small = TestClient(create_app(run, max_bytes=2000), raise_server_exceptions=False)
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(buf, "PNG")
    assert len(buf.getvalue()) < 2000 < len(CAT.read_bytes())
    assert small.post("/predict", content=buf.getvalue(), headers={"content-type": "image/png"}).status_code == 200
    r = small.post("/predict", files={"file": ("cat.jpg", CAT.read_bytes(), "image/jpeg")})
    assert r.status_code == 413 and "2,000" in r.json()["detail"]
    assert small.get("/metadata").json()["max_bytes"] == 2000


def test_healthz_and_metadata(client, run):
    assert client.get("/healthz").json() == {"status": "ok"}
    meta = client.get("/metadata").json()
    results = json.loads((run / "results.json").read_text())
    assert meta["classes"] == ["cats", "dogs"] and meta["image_size"] == 32 and meta["model"] == "resnet"
    assert meta["kind"] == "torch" and meta["tta"] is True and meta["cam"] is True
    assert meta["metrics"]["test"]["accuracy"] == results["accuracy"] and meta["metrics"]["epoch"] == 1


def test_openapi_and_docs_are_served_locally(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/octet-stream"} <= set(body)
    assert {"/healthz", "/metadata"} <= set(spec["paths"])
    docs = client.get("/docs").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs)
    assert assets and not [a for a in assets if "//" in a], f"external assets: {assets}"
    for a in assets:
        r = client.get(a)
        assert r.status_code == 200 and len(r.content) > 1000, a


def test_the_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "//" not in " ".join(re.findall(r'(?:src|href)="([^"]+)"', page.text))
    assert not re.search(r"https?://", page.text), "nothing fetched from outside"
    assert 'type="file"' in page.text and "predict?cam=1" in page.text


def test_an_onnx_model_is_served_without_cams(run, tmp_path):
    onnx_path = export_onnx(run, tmp_path / "model.onnx")["out"]
    c = TestClient(create_app(onnx_path), raise_server_exceptions=False)
    meta = c.get("/metadata").json()
    assert meta["kind"] == "onnx" and meta["cam"] is False
    r = c.post("/predict", content=CAT.read_bytes(), headers={"content-type": "image/jpeg"})
    expected = Classifier.load(run).predict(CAT)[0].probabilities["dogs"]
    assert r.status_code == 200 and r.json()["probabilities"]["dogs"] == pytest.approx(expected, abs=1e-5)
    r = c.post("/predict?cam=1", content=CAT.read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 400 and "PyTorch checkpoint" in r.json()["detail"]


def test_inference_runs_off_the_event_loop(run, monkeypatch):
    real = Classifier.probs

    def slow(self, batch):
        time.sleep(0.5)  # stands in for a slow model; sleeping releases the GIL as torch does
        return real(self, batch)

    monkeypatch.setattr(Classifier, "probs", slow)
    app = create_app(run, concurrency=4)
    photo = CAT.read_bytes()

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            t0 = time.perf_counter()
            preds = [asyncio.create_task(c.post("/predict", content=photo, headers={"content-type": "image/jpeg"}))
                     for _ in range(4)]
            await asyncio.sleep(0.1)  # the four requests are in flight
            health = await c.get("/healthz")
            health_s = time.perf_counter() - t0
            results = await asyncio.gather(*preds)
            return results, health, health_s, time.perf_counter() - t0

    results, health, health_s, total_s = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in results) and health.status_code == 200
    assert health_s < 0.45, f"/healthz answered after {health_s:.2f} s, before any 0.5 s inference could end"
    assert total_s < 1.5, f"four 0.5 s inferences overlapped ({total_s:.2f} s in all, 2 s one after another)"


def test_an_unexpected_error_is_a_json_500_and_the_server_goes_on(run, monkeypatch):
    real = Classifier.probs
    calls = []

    def broken_once(self, batch):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("model failed")
        return real(self, batch)

    monkeypatch.setattr(Classifier, "probs", broken_once)
    client = TestClient(create_app(run), raise_server_exceptions=False)
    r = client.post("/predict", content=CAT.read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 500 and r.json() == {"detail": "internal error: RuntimeError"}
    _assert_still_serving(client)


# --- a real uvicorn on 127.0.0.1 ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(run):
    bench = _load_benchmark()
    with bench.running_server(run) as url:
        yield url, bench


def test_load_smoke_against_real_uvicorn(server, bomb):
    url, bench = server
    with httpx.Client(base_url=url, timeout=30) as c:  # a few bad requests first: the server must shrug them off
        assert c.post("/predict", files={"file": ("bomb.png", bomb, "image/png")}).status_code == 413
        assert c.post("/predict", content=b"junk", headers={"content-type": "image/jpeg"}).status_code == 422
        r = c.post("/predict", content=bytes(DEFAULT_MAX_BYTES + 10), headers={"content-type": "image/jpeg"})
        assert r.status_code == 413
    result = bench.load_test(url, CAT.read_bytes(), requests=50, concurrency=16, time_limit=120)
    print(f"load smoke: {result}")
    assert result["errors"] == 0 and result["ok"] == 50, result["error_samples"]
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["req_per_s"] > 0


@pytest.mark.browser
def test_the_page_in_a_real_browser(server):
    from playwright.sync_api import sync_playwright

    url, _ = server
    external = []
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})

            def guard(route):
                if route.request.url.startswith(url) or route.request.url.startswith(("data:", "blob:")):
                    route.continue_()
                else:
                    external.append(route.request.url)
                    route.abort()

            page.route("**/*", guard)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('resnet')")
            page.set_input_files("#files", [str(CAT), str(DOG)])
            page.wait_for_function("document.querySelectorAll('.label[data-cls]').length === 2", timeout=60_000)
            page.wait_for_function("[...document.querySelectorAll('img.cam')].every(i => i.complete && i.naturalWidth > 0)")
            labels = page.locator(".label").all_text_contents()
            assert sorted(set(labels) | {"cats", "dogs"}) == ["cats", "dogs"], labels
            assert page.locator(".row .bar span").count() == 4
            assert page.locator("img.cam").first.get_attribute("src").startswith("data:image/png;base64,")
            assert page.locator(".error").count() == 0
            # dropping a file works as picking one does
            page.evaluate("""(b64) => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
                document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
            }""", base64.b64encode(CAT.read_bytes()).decode())
            page.wait_for_function("document.querySelectorAll('.label[data-cls]').length === 3", timeout=60_000)
            assert page.locator(".card .name").first.text_content() == "dropped.jpg"
            page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)

            page.goto(url + "/docs")  # Swagger UI, from the app's own static files
            page.wait_for_selector("[data-path='/predict']", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "docs.png"))
        finally:
            browser.close()
    assert external == [], f"the page tried to fetch from outside: {external}"
    assert (ARTIFACTS / "serve.png").stat().st_size > 10_000


def test_serve_cli_refuses_a_missing_model(tmp_path):
    from conftest import run_cli

    proc = run_cli("serve", str(tmp_path / "no-run"), "--port", "0", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("catdog: error: model not found") and "Traceback" not in proc.stderr


def test_serve_cli_on_a_taken_port_or_unknown_host_is_one_line(run):
    import socket

    from conftest import run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = run_cli("serve", str(run), "--port", port, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"catdog: error: cannot listen on 127.0.0.1:{port}: " \
                                                           f"Address already in use", proc.stderr
    proc = run_cli("serve", str(run), "--host", "no-such-host.invalid", "--port", port, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("catdog: error: cannot serve on no-such-host.invalid")
