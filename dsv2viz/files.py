"""Reading and writing files safely: bounded JSON, and writes that land whole or not at all.

Everything dsv2viz reads from disk is JSON or safetensors. :func:`read_json` checks a file's size
before reading it and turns every way a JSON file can be broken (not UTF-8, not JSON, nested deeper
than the parser's recursion allows) into one error naming the file, never a traceback.

Everything dsv2viz writes goes through :func:`atomic_path` or :func:`atomic_write`: the bytes are
written under a temporary name in the destination's folder, flushed to disk, then renamed over the
destination in one step (``os.replace``). A reader, or a process killed mid-write, sees either the old
file or the new one, never half of it; the temporary file of a killed writer is left under a name that
starts with ``.`` and ends with ``.tmp``, which readers ignore and :func:`remove_temporaries` clears.

A write of several files (a trace, a collection) is made whole the same way: each file is written
atomically and one small file written last (the commit point) says which of them belong together.

Writers never write into a folder the user did not give them: :func:`foreign_entries` lists what in a
folder is not the writer's own, and a writer refuses a folder where it finds anything.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Largest JSON file read by default: far above any config, trace header or tokenizer (4.4 MB for V2-Lite).
MAX_JSON_BYTES = 64 * 2**20

TMP_SUFFIX = ".tmp"


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES, error: type[Exception] = ValueError) -> Any:
    """The parsed content of a JSON file, or `error` with one line naming the file and what is wrong.

    The size is checked before anything is read, so a huge file costs nothing; a missing file raises
    FileNotFoundError for the caller to phrase.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path}: {size:,} bytes, over the {max_bytes:,} a JSON file may have here; is it the right file?")
    return parse_json(path.read_bytes(), str(path), error=error)


def parse_json(data: bytes, source: str = "", *, error: type[Exception] = ValueError) -> Any:
    """The parsed value of JSON bytes already read (a safetensors header, a JSONL line), or `error` with one
    line saying what is wrong, after ``source: `` when a source (what the bytes are) is given."""
    prefix = f"{source}: " if source else ""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{prefix}not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{prefix}not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{prefix}JSON nested too deeply to read") from None
    except ValueError as e:  # a number past Python's limit on integer digits
        raise error(f"{prefix}not readable JSON ({e})") from None


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside `path` (same folder, so the final rename never crosses file systems)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; on success it replaces `path` in one step.

    If the block raises, the temporary file is removed and `path` is untouched. On success, temporary files
    that killed writers of `path` left are removed too. The parent folder must exist.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may not have flushed to disk: a rename must not outrun the data
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_folder(path.parent)
    remove_temporaries(path.parent, glob.escape(path.name), running=False)  # what killed writers of `path` left


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (str is written as UTF-8) to `path` whole or not at all; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def is_temporary(name: str) -> bool:
    """Whether a file name is one :func:`temporary_name` gives (a write in progress, or a killed one's leftover)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def remove_temporaries(folder: str | os.PathLike, name: str = "*", *, running: bool = True) -> None:
    """Delete the temporary files that writers left in `folder` for destinations matching `name` (a glob).

    With ``running=False`` those of writers still running on this machine are spared (their process id is
    in the name); by default all go, for callers that know no other writer is at work in `folder`.
    """
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        parts = tmp.name[1 : -len(TMP_SUFFIX)].rsplit(".", 2)  # destination, writer's pid, random part
        if len(parts) != 3 or not parts[1].isdigit() or not fnmatch.fnmatchcase(parts[0], name):
            continue
        if tmp.is_file() and (running or not _is_running(int(parts[1]))):
            tmp.unlink(missing_ok=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, the call only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def foreign_entries(folder: str | os.PathLike, is_own: Callable[[str], bool]) -> list[str]:
    """Names in `folder` (sorted) that are neither the writer's own (`is_own`) nor temporary files; [] if absent."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not (is_own(p.name) or is_temporary(p.name)))


def name_list(names: list[str], limit: int = 3) -> str:
    """Names for a message: the first `limit` of them, then how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
