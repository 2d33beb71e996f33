"""dsv2viz.files: bounded JSON reads with one-line errors, and writes that land whole or not at all."""

from __future__ import annotations

import pytest

from dsv2viz.files import (
    atomic_path,
    atomic_write,
    foreign_entries,
    is_temporary,
    read_json,
    remove_temporaries,
    temporary_name,
)


class MyError(ValueError):
    pass


def test_read_json_returns_the_content(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"名前": [1, 2.5, null], "emoji": "🙂"}', encoding="utf-8")
    assert read_json(path) == {"名前": [1, 2.5, None], "emoji": "🙂"}


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"a": "\xff\xfe"}', r"not UTF-8 text \(invalid start byte at byte 7\)"),
        (b'{"a": 1,}', r"not valid JSON \(Expecting property name enclosed in double quotes: line 1 column 9"),
        (b"[" * 100_000 + b"]" * 100_000, r"JSON nested too deeply to read"),
        (b"", r"not valid JSON"),
        (b"[" + b"9" * 5000 + b"]", r"not readable JSON \(Exceeds the limit \(4300 digits\)"),
    ],
)
def test_read_json_errors_are_one_line_of_the_callers_type(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(MyError, match=message) as error:
        read_json(path, error=MyError)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_read_json_checks_the_size_before_reading(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.truncate(10**12)  # sparse: a terabyte that costs no disk, and would cost everything if read
    with pytest.raises(MyError, match=r"1,000,000,000,000 bytes, over the 1,000 a JSON file may have here"):
        read_json(path, max_bytes=1000, error=MyError)
    path.write_text("[" + "1," * 600 + "1]")
    with pytest.raises(MyError, match="over the 1,000"):
        read_json(path, max_bytes=1000, error=MyError)
    assert len(read_json(path, max_bytes=2000)) == 601


def test_read_json_of_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    assert atomic_write(path, "nouveau 新しい") == path
    assert path.read_bytes() == "nouveau 新しい".encode()
    atomic_write(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_the_destination_keeps_its_old_content_until_the_block_succeeds(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with atomic_path(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # a reader during the write sees the old file whole
        assert tmp.parent == tmp_path and is_temporary(tmp.name)
    assert path.read_text() == "new"


def test_an_error_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_path(path) as tmp:
        tmp.write_text("half of the new conte")
        raise RuntimeError("writer failed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "new.txt") as tmp:  # no old file: none appears
        tmp.write_text("x")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_temporary_names_are_hidden_unique_and_beside_the_destination(tmp_path):
    names = {temporary_name(tmp_path / "a.json") for _ in range(100)}
    assert len(names) == 100
    for name in names:
        assert name.parent == tmp_path and name.name.startswith(".a.json.") and is_temporary(name.name)
    assert not is_temporary("a.tmp") and not is_temporary(".hidden")


def test_remove_temporaries_removes_only_the_named_destinations_leftovers(tmp_path):
    for name in ("trace.json", "trace.json", "tensors-1.safetensors", "other.txt"):
        temporary_name(tmp_path / name).write_text("left by a killed writer")
    (tmp_path / "trace.json").write_text("{}")
    (tmp_path / ".config.tmp").mkdir()  # a folder of that shape is not ours to delete
    remove_temporaries(tmp_path, "trace.json")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in left if n.startswith(".trace.json.")] == []
    assert sum(n.startswith(".tensors-1.safetensors.") for n in left) == 1
    remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".config.tmp", "trace.json"]


def test_foreign_entries_lists_what_is_not_the_writers(tmp_path):
    assert foreign_entries(tmp_path / "missing", lambda n: False) == []
    (tmp_path / "trace.json").write_text("{}")
    (tmp_path / "thesis.tex").write_text("keep")
    (tmp_path / "figures").mkdir()
    temporary_name(tmp_path / "trace.json").write_text("")
    assert foreign_entries(tmp_path, lambda n: n == "trace.json") == ["figures", "thesis.tex"]
