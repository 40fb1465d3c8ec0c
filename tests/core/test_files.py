"""`atomic_write`: text, bytes or a writer land whole; a failing writer leaves the old file and no temp file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cambium.core.files import atomic_write


def test_text_is_written_as_utf8_and_parents_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "config.toml"
    atomic_write(path, "name = \"Zürich\"\n")
    assert path.read_bytes() == "name = \"Zürich\"\n".encode()
    assert os.listdir(path.parent) == ["config.toml"]


def test_bytes_replace_the_old_content(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(b"old, and longer than the new content")
    atomic_write(path, b"\x00new\xff")
    assert path.read_bytes() == b"\x00new\xff"
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_a_writer_fills_a_temp_path_next_to_the_target(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    seen: list[Path] = []

    def writer(tmp: Path) -> None:
        seen.append(tmp)
        assert not path.exists()  # nothing is visible under the final name while writing
        tmp.write_bytes(b"PAR1")

    atomic_write(path, writer)
    assert path.read_bytes() == b"PAR1"
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".data.parquet.") and not seen[0].exists()
    assert os.listdir(tmp_path) == ["data.parquet"]


@pytest.mark.parametrize("fails_after_writing", [True, False])
def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path: Path, fails_after_writing: bool) -> None:
    path = tmp_path / "provenance.json"
    path.write_text("old")

    def writer(tmp: Path) -> None:
        if fails_after_writing:
            tmp.write_text("half a fi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, writer)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["provenance.json"]


def test_the_new_file_gets_the_usual_permissions(tmp_path: Path) -> None:
    # A temp file from mkstemp would be 0600; run files must stay readable as if written with open().
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write(tmp_path / "x.txt", "x")
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o666 & ~umask
