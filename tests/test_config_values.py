"""Numbers, booleans and lists as people write them, in recipe files and in `--set`; anything else
keeps the error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kpnet.config import load_recipe
from kpnet.errors import KpnetError


def recipe(tmp_path: Path, text: str, overrides: list[str] | None = None):  # type: ignore[no-untyped-def]
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(path, overrides)


@pytest.mark.parametrize("written,value", [("1e-3", 1e-3), ("5E-4", 5e-4), (".5", 0.5), ("2", 2.0), ("-1.5e+2", -150.0),
                                           ("'1e-3'", 1e-3), ("2.0e-3", 2e-3)])
def test_float_keys_take_numbers_as_written(tmp_path: Path, written: str, value: float) -> None:
    assert recipe(tmp_path, f"train:\n  lr: {written}\n").train.lr == value
    assert recipe(tmp_path, "", [f"train.lr={written}"]).train.lr == value


@pytest.mark.parametrize("written,value", [("yes", True), ("No", False), ("ON", True), ("off", False), ("True", True),
                                           ("'false'", False), ("y", True), ("N", False)])
def test_booleans_take_yamls_words(tmp_path: Path, written: str, value: bool) -> None:
    assert recipe(tmp_path, f"test:\n  flip: {written}\n").test.flip is value
    assert recipe(tmp_path, "", [f"test.flip={written}"]).test.flip is value


@pytest.mark.parametrize("written", ["[0.5,1]", "0.5,1", "[0.5, 1]", "'0.5, 1'", "[.5, 1e0]", "5e-1,1"])
def test_lists_take_brackets_or_commas(tmp_path: Path, written: str) -> None:
    assert recipe(tmp_path, f"test:\n  scales: {written}\n").test.scales == (0.5, 1.0)
    assert recipe(tmp_path, "", [f"test.scales={written}"]).test.scales == (0.5, 1.0)
    assert recipe(tmp_path, "", ["train.lr_steps=3,4"]).train.lr_steps == (3, 4)
    assert recipe(tmp_path, "", ["test.scales=0.75"]).test.scales == (0.75,)


@pytest.mark.parametrize("override,message", [
    ("train.lr=abc", "train.lr: expected a number, got 'abc'"),
    ("train.lr=1e", "train.lr: expected a number, got '1e'"),
    ("train.lr=1e-3x", "train.lr: expected a number, got '1e-3x'"),
    ("train.lr=true", "train.lr: expected a number, got True"),
    ("test.flip=1", "test.flip: expected true or false, got 1"),
    ("test.flip=maybe", "test.flip: expected true or false, got 'maybe'"),
    ("test.scales=0.5,big", "test.scales: expected a number, got 'big'"),
    ("test.scales=[0.5,1", "test.scales: expected a number, got '[0.5'"),
    ("train.lr_steps=1.5,2", "train.lr_steps: expected an integer, got 1.5"),
    ("train.batch_size=1e3", "train.batch_size: expected an integer, got '1e3'"),
])
def test_anything_else_keeps_the_error_naming_the_key(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(KpnetError) as e:
        recipe(tmp_path, "", [override])
    assert e.value.line() == f"{tmp_path / 'r.yaml'}: {message}"


def test_strings_are_left_as_written(tmp_path: Path) -> None:
    r = recipe(tmp_path, "", ["name=1e-3", "data.root=a,b"])
    assert (r.name, r.data.root) == ("1e-3", "a,b")
