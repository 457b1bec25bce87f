"""The decode store: files seen before skip decoding, changed files do not, and a broken store only costs speed."""
from __future__ import annotations

import os

import numpy as np
import pytest

import catdog.predict as predict_mod
from catdog.data import decode_image
from catdog.predict import Classifier, iter_inputs, predict_stream
from catdog.store import STORE_NAME, DecodeStore
from conftest import run_cli


def _rows(clf, folder, store):
    return [{k: r[k] for k in ("path", "class", "probabilities", "error")}
            for r in predict_stream(clf, iter_inputs([str(folder)]), chunk=5, store=store)]


def test_round_trip_and_what_invalidates_an_entry(tiny_data, tmp_path):
    src = sorted((tiny_data / "test" / "cats").glob("*.jpg"))[0]
    path = tmp_path / "a.jpg"
    path.write_bytes(src.read_bytes())
    store = DecodeStore(32, path=tmp_path / "s.sqlite")
    key = store.key(str(path))
    arr = decode_image(path, 32)
    assert store.get([key, None]) == [None, None]
    store.put([(key, arr)])
    got = store.get([key])[0]
    np.testing.assert_array_equal(got, arr)

    # another input size, or the same file rewritten (new mtime), are other entries
    assert DecodeStore(48, path=tmp_path / "s.sqlite").get([DecodeStore(48).key(str(path))]) == [None]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert store.key(str(path)) != key and store.get([store.key(str(path))]) == [None]
    assert store.key(str(tmp_path / "missing.jpg")) is None


def test_second_pass_reads_the_store_not_the_files(trained_runs, tiny_data, tmp_path, monkeypatch):
    clf = Classifier.load(trained_runs["seed"])
    folder = tiny_data / "test"
    plain = _rows(clf, folder, None)
    first = _rows(clf, folder, DecodeStore(clf.image_size, path=tmp_path / "s.sqlite"))
    assert first == plain

    def no_decoding(*a, **k):
        raise AssertionError("decoded a file the store holds")

    monkeypatch.setattr(predict_mod, "_decode_or_reason", no_decoding)
    again = _rows(clf, folder, DecodeStore(clf.image_size, path=tmp_path / "s.sqlite"))
    assert again == plain


def test_unreadable_files_are_not_stored_and_still_reported(trained_runs, tmp_path):
    clf = Classifier.load(trained_runs["seed"])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.jpg").write_text("not a picture")
    store = DecodeStore(clf.image_size, path=tmp_path / "s.sqlite")
    for _ in range(2):
        (row,) = _rows(clf, tmp_path / "in", store)
        assert row["class"] is None and "not an image" in row["error"]
    assert store.db.execute("SELECT COUNT(*) FROM decoded").fetchone() == (0,)


@pytest.mark.parametrize("damage", ["garbage file", "folder in the way"])
def test_a_broken_store_warns_and_predictions_go_on(trained_runs, tiny_data, tmp_path, damage):
    clf = Classifier.load(trained_runs["seed"])
    where = tmp_path / "s.sqlite"
    if damage == "garbage file":
        where.write_bytes(b"this is not a database" * 100)
    else:
        where.mkdir()
    warnings: list[str] = []
    store = DecodeStore(clf.image_size, path=where, warn=warnings.append)
    assert not store.active and len(warnings) == 1 and str(where) in warnings[0]
    assert _rows(clf, tiny_data / "test", store) == _rows(clf, tiny_data / "test", None)


def test_cli_fills_the_cache_unless_told_not_to(trained_runs, tiny_data, tmp_path):
    for flag, expect in (("--no-cache", False), (None, True)):
        cache = tmp_path / f"cache-{expect}"
        args = ["predict", str(trained_runs["seed"]), str(tiny_data / "test"), "--format", "csv", "--no-progress"]
        first = run_cli(*args, *([flag] if flag else []), env={"CATDOG_CACHE": str(cache)})
        assert (cache / STORE_NAME).exists() == expect
        second = run_cli(*args, *([flag] if flag else []), env={"CATDOG_CACHE": str(cache)})
        assert first.stdout == second.stdout and first.stdout.count("\n") == 17  # header + 16 images
