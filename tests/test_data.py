"""Robust decoding of the odd files real photo folders hold, skipping with reasons, caching, splitting."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catdog import data as D
from conftest import run_cli, unimplemented_dds

RED, BLUE = (220, 20, 20), (20, 20, 220)


def _halves(w=40, h=20) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", (w, h), RED)
    img.paste(Image.new("RGB", (w // 2, h), BLUE), (w // 2, 0))
    return img


def _bomb_png(w=40000, h=40000) -> bytes:
    """A valid PNG header claiming w x h pixels, with almost no data behind it."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def odd_folder(tmp_path) -> Path:
    """One class folder holding every kind of odd file; returns the dataset root."""
    d = tmp_path / "odd" / "things"
    d.mkdir(parents=True)
    base = _halves()
    base.convert("L").save(d / "gray.jpg")
    base.convert("CMYK").save(d / "cmyk.jpg")
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must come out white
    rgba.save(d / "clear.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(d / "palette.png")
    Image.fromarray((np.full((20, 40), 40000, np.uint16))).save(d / "sixteen.png")
    base.save(d / "photo.webp")
    base.save(d / "photo.bmp")
    base.save(d / "photo.tiff")
    frames = [Image.new("RGB", (40, 20), RED), Image.new("RGB", (40, 20), BLUE)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    base.save(d / "chat_été_猫.jpg")
    # files to skip, each with a reason
    (d / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    base.resize((400, 200)).save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "notes.jpg").write_text("this is not an image")
    (d / "bomb.png").write_bytes(_bomb_png())
    (d / "odd_format.jpg").write_bytes(unimplemented_dds())
    # files to ignore without a word
    (d / "readme.txt").write_text("ignored")
    base.save(d / ".hidden.jpg")
    return tmp_path / "odd"


def test_odd_files_load_as_rgb_and_broken_ones_are_skipped_with_reasons(odd_folder):
    os.mkfifo(odd_folder / "things" / "pipe.jpg")  # opening it would wait forever for a writer
    ds = D.load_folder(odd_folder, image_size=16, cache=False, workers=1)
    loaded = {Path(p).name for p in ds.paths}
    assert loaded == {"gray.jpg", "cmyk.jpg", "clear.png", "palette.png", "sixteen.png", "photo.webp",
                      "photo.bmp", "photo.tiff", "anim.gif", "chat_été_猫.jpg"}
    assert ds.images.shape == (10, 16, 16, 3) and ds.images.dtype == np.uint8
    reasons = {Path(s["path"]).name: s["reason"] for s in ds.skipped}
    assert set(reasons) == {"empty.jpg", "truncated.jpg", "notes.jpg", "bomb.png", "odd_format.jpg", "pipe.jpg"}
    assert reasons["pipe.jpg"] == "not a regular file"
    assert reasons["odd_format.jpg"] == "not an image (unrecognised format)"  # DDS: not a format catdog reads
    assert reasons["empty.jpg"] == "empty file"
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["notes.jpg"]
    assert "decompression bomb" in reasons["bomb.png"] and "40000x40000" in reasons["bomb.png"]
    by_name = dict(zip((Path(p).name for p in ds.paths), ds.images))
    assert (by_name["clear.png"] == 255).all(), "transparent pixels are composited on white"
    assert by_name["sixteen.png"].mean() == pytest.approx(40000 / 257, abs=1), "16-bit scaled to 8-bit"
    left, right = by_name["photo.webp"][:, :6], by_name["photo.webp"][:, -6:]
    assert left[..., 0].mean() > 150 and right[..., 2].mean() > 150
    assert by_name["anim.gif"][..., 0].mean() > 150, "first GIF frame (red)"


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to display upright
    path = tmp_path / "rotated.jpg"
    _halves(40, 20).save(path, exif=exif, quality=95)
    arr = D.decode_image(path, 16)
    top, bottom = arr[:5].reshape(-1, 3).mean(0), arr[-5:].reshape(-1, 3).mean(0)
    # rotating clockwise puts the left (red) half on top and the right (blue) half at the bottom
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]


def test_jpeg_draft_mode_matches_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    big = Image.fromarray(np.kron(rng.integers(0, 255, (12, 16, 3)), np.ones((40, 40, 1))).astype(np.uint8))
    path = tmp_path / "big.jpg"
    big.save(path, quality=95)
    fast = D.decode_image(path, 32).astype(float)
    full = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), float)
    assert np.abs(fast - full).mean() < 6


@pytest.mark.parametrize("size", [16, 32, 64])
def test_plain_jpegs_skip_pillow_and_give_its_pixels(tmp_path, size):
    rng = np.random.default_rng(size)
    photo = Image.fromarray(np.kron(rng.integers(0, 255, (25, 33, 3)), np.ones((10, 10, 1))).astype(np.uint8))
    photo = photo.resize((333, 250))
    variants = {"420.jpg": dict(quality=80), "444.jpg": dict(quality=90, subsampling=0),
                "progressive.jpg": dict(quality=85, progressive=True), "gray.jpg": dict(quality=85, mode="L"),
                "small.jpg": dict(quality=85, box=(0, 0, 21, 13))}
    for name, opts in variants.items():
        img = photo.convert(opts.pop("mode", "RGB")).crop(opts.pop("box", (0, 0, 333, 250)))
        path = tmp_path / name
        img.save(path, **opts)
        fast = D._decode_jpeg_scaled(path.read_bytes(), size, D.MAX_PIXELS)
        assert fast is not None, f"{name} goes through libjpeg-turbo directly"
        pillow = D.resize_square(D.open_image(path, draft_size=size), size)
        assert np.array_equal(D.decode_image(path, size), pillow), name
        assert np.array_equal(D.decode_image(path.read_bytes(), size), pillow), name


XMP_ROTATED = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
               b'</x:xmpmeta>')


def test_jpegs_the_fast_path_cannot_read_right_go_to_pillow(odd_folder, tmp_path):
    d = odd_folder / "things"
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves(40, 20).save(tmp_path / "rotated.jpg", exif=exif)
    _halves(40, 20).save(tmp_path / "xmp.jpg", xmp=XMP_ROTATED)
    _halves(400, 200).save(tmp_path / "mpo.jpg", "MPO", save_all=True, append_images=[_halves(400, 200)])
    _halves(7, 7).save(tmp_path / "tiny.jpg")
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8" + bytes(range(256)) * 4)
    for path in (tmp_path / "rotated.jpg", tmp_path / "xmp.jpg", tmp_path / "mpo.jpg", tmp_path / "tiny.jpg",
                 tmp_path / "garbage.jpg", d / "cmyk.jpg", d / "truncated.jpg"):
        assert D._decode_jpeg_scaled(path.read_bytes(), 16, D.MAX_PIXELS) is None, path.name
    for name in ("xmp.jpg", "mpo.jpg", "tiny.jpg"):  # what Pillow makes of them, as before the fast path
        path = tmp_path / name
        assert np.array_equal(D.decode_image(path, 4), D.resize_square(D.open_image(path, draft_size=4), 4)), name
    assert D.open_image(tmp_path / "xmp.jpg").size == (20, 40), "the XMP orientation turned the 40x20 image upright"
    with pytest.raises(D.SkipImage, match="not an image|truncated"):
        D.decode_image(tmp_path / "garbage.jpg", 8)
    big = io.BytesIO()
    _halves(400, 200).save(big, "JPEG")
    assert D._decode_jpeg_scaled(big.getvalue(), 16, 400 * 200) is not None
    assert D._decode_jpeg_scaled(big.getvalue(), 16, 400 * 200 - 1) is None, "over the pixel limit: Pillow explains"
    with pytest.raises(D.SkipImage, match="decompression bomb"):
        D.decode_image(big.getvalue(), 16, max_pixels=400 * 200 - 1)


def test_decode_accepts_bytes_and_refuses_empty_bytes():
    buf = io.BytesIO()
    _halves().save(buf, "PNG")
    assert D.decode_image(buf.getvalue(), 8).shape == (8, 8, 3)
    with pytest.raises(D.SkipImage, match="empty"):
        D.decode_image(b"", 8)


def test_scan_errors_are_clear(tmp_path):
    with pytest.raises(D.DataError, match="not found"):
        D.scan_folder(tmp_path / "missing")
    with pytest.raises(D.DataError, match="no class sub-folders"):
        D.scan_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(D.DataError, match="no image files"):
        D.scan_folder(tmp_path)


def test_cache_is_reused(tiny_data, monkeypatch, tmp_path):
    first = D.load_folder(tiny_data / "train", 16, cache=tmp_path)
    monkeypatch.setattr(D, "decode_files", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    second = D.load_folder(tiny_data / "train", 16, cache=tmp_path)
    assert np.array_equal(first.images, second.images) and first.paths == second.paths


def test_a_cached_set_reached_by_another_path_keeps_its_own_paths(odd_folder, monkeypatch, tmp_path):
    import shutil

    first = D.load_folder(odd_folder, 16, cache=tmp_path / "cache", workers=1)
    moved = shutil.copytree(odd_folder, tmp_path / "moved", copy_function=shutil.copy2)  # same names, sizes, mtimes
    monkeypatch.setattr(D, "decode_files", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    second = D.load_folder(moved, 16, cache=tmp_path / "cache")
    assert np.array_equal(first.images, second.images) and len(second.paths) == len(first.paths)
    assert all(p.startswith(str(moved)) and Path(p).is_file() for p in second.paths)
    assert [Path(p).relative_to(moved) for p in second.paths] == [Path(p).relative_to(odd_folder) for p in first.paths]
    assert first.skipped and [Path(s["path"]).relative_to(moved) for s in second.skipped] == [
        Path(s["path"]).relative_to(odd_folder) for s in first.skipped]
    assert [s["reason"] for s in second.skipped] == [s["reason"] for s in first.skipped]


def test_parallel_decode_equals_serial(tiny_data):
    serial = D.load_folder(tiny_data / "train", 16, cache=False, workers=1)
    parallel = D.load_folder(tiny_data / "train", 16, cache=False, workers=2)
    assert np.array_equal(serial.images, parallel.images)


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.array([0] * 50 + [1] * 30)
    tr, va = D.split_indices(labels, 0.1, seed=3)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == 80
    assert (labels[va] == 0).sum() == 5 and (labels[va] == 1).sum() == 3
    assert np.array_equal(va, D.split_indices(labels, 0.1, seed=3)[1])
    assert not np.array_equal(va, D.split_indices(labels, 0.1, seed=4)[1])


def test_data_check_cli_json(odd_folder):
    out = json.loads(run_cli("data", "check", str(odd_folder), "--json").stdout)
    assert out["loaded"] == 10 and out["classes"] == ["things"]
    assert {Path(s["path"]).name for s in out["skipped"]} == {"empty.jpg", "truncated.jpg", "notes.jpg", "bomb.png",
                                                             "odd_format.jpg"}
    assert all(s["reason"] for s in out["skipped"])


def test_a_missing_embedded_set_says_how_to_get_one(tmp_path, monkeypatch):
    from catdog import config

    missing = tmp_path / "site-packages-like" / "data" / "cats_and_dogs"  # as a non-editable install would see it
    monkeypatch.delenv("CATDOG_DATA", raising=False)
    monkeypatch.setattr(config, "default_data_dir", lambda: missing)
    with pytest.raises(D.DataError, match=r"not found: .*embedded set comes with a source checkout.*CATDOG_DATA"):
        D.split_dir(missing, "train")
    with pytest.raises(D.DataError) as other:
        D.split_dir(tmp_path / "elsewhere", "train")
    assert "source checkout" not in str(other.value)


def test_data_check_cli_missing_folder_is_a_clear_error(tmp_path):
    proc = run_cli("data", "check", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_data_check_of_a_dataset_root_checks_each_split(tiny_data):
    out = json.loads(run_cli("data", "check", str(tiny_data), "--json").stdout)
    assert set(out["splits"]) == {"train", "test"} and out["classes"] == ["cats", "dogs"]
    assert out["splits"]["train"]["loaded"] == 48 and out["splits"]["test"]["loaded"] == 16 and out["loaded"] == 64
    text = run_cli("data", "check", str(tiny_data)).stdout
    assert "train: 48 images load (cats: 24, dogs: 24)" in text and "test: 16 images load (cats: 8, dogs: 8)" in text
