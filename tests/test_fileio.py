"""Atomic writes keep the permissions a plain write would give, cope with long and undecodable names."""
from __future__ import annotations

import os
import stat

from catdog import fileio


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_file_gets_the_umask_permissions_and_a_replaced_one_keeps_its_own(tmp_path):
    new = tmp_path / "report.html"
    fileio.write_text(new, "x")
    assert _mode(new) == 0o666 & ~fileio.UMASK
    kept = tmp_path / "preds.csv"
    kept.write_text("old")
    kept.chmod(0o640)
    fileio.write_text(kept, "new")
    assert kept.read_text() == "new" and _mode(kept) == 0o640


def test_a_name_near_the_length_limit_can_be_written(tmp_path):
    for name in ("a" * 250 + ".png", "猫" * 80 + ".png"):  # 254 and 244 bytes: the temp name must not add to them
        fileio.write_bytes(tmp_path / name, b"png")
        assert (tmp_path / name).read_bytes() == b"png"
    assert sorted(os.listdir(tmp_path)) == sorted(["a" * 250 + ".png", "猫" * 80 + ".png"]), "no temp file left"


def test_text_keeps_the_bytes_of_an_undecodable_file_name(tmp_path):
    name = os.fsdecode(b"chat_\xe9.jpg")  # Latin-1 bytes: a surrogate escape in Python's str
    out = tmp_path / "rows.csv"
    fileio.write_text(out, f"{name},cats\n")
    assert out.read_bytes() == b"chat_\xe9.jpg,cats\n"


def test_cut_name_keeps_whole_characters_within_the_byte_limit():
    assert fileio.cut_name("short.png", 200) == "short.png"
    assert fileio.cut_name("a" * 300, 200) == "a" * 200
    cut = fileio.cut_name("猫" * 100, 200)  # 3 bytes each: 66 whole characters fit
    assert cut == "猫" * 66 and len(cut.encode()) == 198
    latin1 = os.fsdecode(b"\xe9" * 300)  # never UTF-8: kept byte for byte up to the limit
    assert os.fsencode(fileio.cut_name(latin1, 200)) == b"\xe9" * 200


def test_a_private_file_stays_readable_by_its_owner_only(tmp_path):
    with fileio.atomic_open(tmp_path / "cache.npz", "wb", private=True) as f:
        f.write(b"decoded photos")
    assert _mode(tmp_path / "cache.npz") == 0o600
