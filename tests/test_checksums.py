"""File checksums of saved models and indexes (metaembed.checksums), against hashlib on the whole file."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from metaembed import checksums


def test_digests_match_hashlib_and_name_the_changed_file(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(checksums, "IO_BLOCK", 7)  # several blocks per file, the last one short
    files = {"a.bin": bytes(range(256)) * 3, "sub/b.json": b"{}", "sub/README.md": b"# card", "empty": b""}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    digests = checksums.file_digests(tmp_path, skip=("README.md",))
    assert digests == {n: hashlib.sha256(d).hexdigest() for n, d in sorted(files.items()) if n != "sub/README.md"}
    assert checksums.changed_files(tmp_path, digests, "x.json") == []
    (tmp_path / "sub/b.json").write_bytes(b"[]")  # same size, other bytes
    (tmp_path / "sub/README.md").write_bytes(b"# my card")
    assert checksums.changed_files(tmp_path, digests, "x.json") == ["sub/b.json"]
    upper = {n: d.upper() for n, d in digests.items()}
    assert checksums.changed_files(tmp_path, upper, "x.json") == ["sub/b.json"]


def test_bad_digest_records_are_named(tmp_path: Path):
    (tmp_path / "a").write_bytes(b"a")
    good = "0" * 64
    for bad in ([], {"a": 1}, {"a": "abc"}, {3: good}):
        with pytest.raises(ValueError, match="x.json: the saved sha256 checksums are not a mapping"):
            checksums.changed_files(tmp_path, bad, "x.json")
    for name in ("", "/a", "../a", "b/../../a", "b\\..\\a"):
        with pytest.raises(ValueError, match="x.json: the checksum entry .* names no file inside"):
            checksums.changed_files(tmp_path, {name: good}, "x.json")
    with pytest.raises(FileNotFoundError, match=r"missing \(the save wrote it; x.json lists it\)"):
        checksums.changed_files(tmp_path, {"b": good}, "x.json")


def test_a_large_check_shows_progress(tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "w").write_bytes(b"w" * 100)
    digests = checksums.file_digests(tmp_path)
    checksums.changed_files(tmp_path, digests, "x.json")
    assert "sha256 of" not in capsys.readouterr().err  # below PROGRESS_BYTES: no bar
    monkeypatch.setattr(checksums, "PROGRESS_BYTES", 100)
    checksums.changed_files(tmp_path, digests, "x.json")
    assert "sha256 of" in capsys.readouterr().err
    checksums.changed_files(tmp_path, digests, "x.json", progress=False)
    assert "sha256 of" not in capsys.readouterr().err
