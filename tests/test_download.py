"""`catdog data download` against a local HTTP server on 127.0.0.1 serving an archive the test builds."""
import hashlib
import http.server
import shutil
import tarfile
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_data):
    """A zip (with a wrapper folder) and a tar.gz of the tiny set, served over HTTP on 127.0.0.1."""
    root = tmp_path_factory.mktemp("www")
    with zipfile.ZipFile(root / "set.zip", "w") as z:
        for f in sorted(tiny_data.rglob("*.jpg")):
            z.write(f, Path("cats_and_dogs_small") / f.relative_to(tiny_data))
    with tarfile.open(root / "set.tar.gz", "w:gz") as t:
        t.add(tiny_data / "train", arcname="train")
    (root / "notes.txt").write_text("not an archive")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def test_download_verifies_and_unpacks_folder_per_class(served, tmp_path):
    url, root = served
    digest = hashlib.sha256((root / "set.zip").read_bytes()).hexdigest()
    out = tmp_path / "data"
    proc = run_cli("data", "download", f"{url}/set.zip", "--out", str(out), "--sha256", digest)
    assert proc.stdout.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"], "the wrapper folder is dropped"
    assert len(list((out / "train" / "cats").glob("*.jpg"))) == 24
    assert "48 images" in proc.stderr and "16 images" in proc.stderr


def test_download_of_a_tarball_without_checksum_prints_the_digest(served, tmp_path):
    url, root = served
    proc = run_cli("data", "download", f"{url}/set.tar.gz", "--out", str(tmp_path / "d"))
    assert hashlib.sha256((root / "set.tar.gz").read_bytes()).hexdigest() in proc.stderr
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["cats", "dogs"]


@pytest.mark.parametrize("case, expect", [("checksum", "checksum mismatch"), ("missing", "cannot download"),
                                          ("not-archive", "neither a zip nor a tar"), ("exists", "not empty")])
def test_download_failures_are_clear_and_leave_nothing(served, tmp_path, case, expect):
    url, _ = served
    out = tmp_path / "d"
    args = {"checksum": [f"{url}/set.zip", "--sha256", "0" * 64], "missing": [f"{url}/nope.zip"],
            "not-archive": [f"{url}/notes.txt"], "exists": [f"{url}/set.zip"]}[case]
    if case == "exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    proc = run_cli("data", "download", *args, "--out", str(out), check=False)
    assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["d"] if case == "exists" else []), "no partial download or unpacked folder is left"
    if case == "exists":
        assert (out / "mine.txt").read_text() == "keep me"


def test_unsafe_zip_members_are_refused(tmp_path):
    from catdog.data import DataError
    from catdog.download import unpack

    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../../escape.txt", "x")
    (tmp_path / "into").mkdir()
    with pytest.raises(DataError, match="escapes"):
        unpack(bad, tmp_path / "into")
    assert not (tmp_path.parent / "escape.txt").exists()
    shutil.rmtree(tmp_path / "into")


def test_damaged_archives_are_clear_errors(tmp_path):
    from catdog.data import DataError
    from catdog.download import unpack

    good_zip = tmp_path / "good.zip"
    with zipfile.ZipFile(good_zip, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("cats/a.jpg", bytes(range(256)) * 64)
    data = bytearray(good_zip.read_bytes())
    data[60:80] = bytes(20)  # inside the member's compressed bytes: its CRC no longer matches
    (tmp_path / "badcrc.zip").write_bytes(bytes(data))
    good_tar = tmp_path / "good.tar.gz"
    with tarfile.open(good_tar, "w:gz") as t:
        member = tmp_path / "a.jpg"
        member.write_bytes(bytes(range(256)) * 256)
        t.add(member, "cats/a.jpg")
    (tmp_path / "trunc.tar.gz").write_bytes(good_tar.read_bytes()[: good_tar.stat().st_size // 2])
    for name in ("badcrc.zip", "trunc.tar.gz"):
        into = tmp_path / f"into-{name}"
        into.mkdir()
        with pytest.raises(DataError, match="damaged or truncated"):
            unpack(tmp_path / name, into)


def test_an_archive_larger_than_the_free_disk_is_refused_before_unpacking(tmp_path, monkeypatch):
    import collections

    from catdog import download
    from catdog.data import DataError

    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("cats/a.jpg", bytes(1 << 20))  # 1 MiB of zeros: a few KiB packed
    into = tmp_path / "into"
    into.mkdir()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - 4096, 4096))
    with pytest.raises(DataError, match="more than the"):
        download.unpack(archive, into)
    assert list(into.iterdir()) == []


def test_a_full_disk_while_unpacking_is_not_called_a_damaged_archive(tmp_path, monkeypatch):
    import errno

    from catdog import download

    archive = tmp_path / "ok.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("cats/a.jpg", b"x")
    (tmp_path / "into").mkdir()

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(zipfile.ZipFile, "extractall", full)
    with pytest.raises(OSError, match="No space left"):
        download.unpack(archive, tmp_path / "into")
