"""Atomic output: the target appears whole or not at all, with the mode a plain open() would give."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kpnet.io import atomic_write, atomic_write_json


def test_atomic_write_honours_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    atomic_write_json(target, {"v": 1})

    def broken(tmp: Path) -> None:
        tmp.write_text('{"v": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == '{"v": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
