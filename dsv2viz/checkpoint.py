"""Read a safetensors checkpoint folder tensor by tensor, straight into each tensor's own memory.

DeepSeek-V2-Lite is 29 GiB of bf16 in four shards. Loading it with ``safetensors.safe_open`` / ``load_file``
maps each shard and copies out of the mapping, so the touched file pages count toward the process's RSS on
top of the copies: peak host memory approaches twice the checkpoint. Here we parse the (simple) format
ourselves and ``readinto`` each tensor's bytes from a plain file handle, so loading to CPU in the stored
dtype holds one copy only, and a cast or device move holds at most one stored-dtype temporary at a time.

Opening a checkpoint reads only the index and the shard headers and checks them thoroughly (offsets,
sizes, truncation, keys missing or duplicated across shards), so a broken download fails at once with a
``CheckpointError`` naming the file and key instead of minutes into a load. No pickle, no code execution.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .files import parse_json, read_json
from .text import visible_controls

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 2**20
READ_CHUNK_BYTES = 64 * 2**20  # progress granularity; also keeps each read() call well under OS limits

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

REDOWNLOAD = "re-download the shard"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, corrupt or inconsistent; the message says what to do."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: ``nbytes`` bytes from absolute offset ``start`` of ``file``."""

    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors file's header; every tensor must lie wholly inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: file is truncated ({size} bytes, not even a header length); {REDOWNLOAD}")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: header length {header_len} is absurd (over 100 MB or past the end of "
                f"this {size}-byte file): truncated, corrupt or not safetensors; {REDOWNLOAD}"
            )
        raw = f.read(header_len)
    try:
        header = parse_json(raw, f"{path}: header")
    except ValueError as e:  # not UTF-8, not JSON, or nested past the parser's recursion limit
        raise CheckpointError(f"{e}; {REDOWNLOAD}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; {REDOWNLOAD}")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for key, info in header.items():
        where = f"{path}: tensor {key!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{where}: header entry lacks dtype/shape/data_offsets; {REDOWNLOAD}")
        dtype = _DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise CheckpointError(
                f"{where}: unsupported dtype {info['dtype']!r} (supported: {', '.join(_DTYPES)}); "
                "convert the checkpoint to one of these"
            )
        shape, offsets = info["shape"], info["data_offsets"]
        if not (
            isinstance(shape, list)
            and all(_is_int(d) and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{where}: malformed shape {shape!r} or data_offsets {offsets!r}; {REDOWNLOAD}")
        nbytes = math.prod(shape) * dtype.itemsize  # a Python int: no overflow, however absurd the shape
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but shape "
                f"{shape} of {info['dtype']} needs {nbytes}; {REDOWNLOAD}"
            )
        entries[key] = TensorEntry(key, path, dtype, tuple(shape), data_start + offsets[0], nbytes)
    if entries:
        last = max(entries.values(), key=lambda e: e.start + e.nbytes)
        if last.start + last.nbytes > size:
            raise CheckpointError(
                f"{path}: file is truncated: expected at least {last.start + last.nbytes} bytes "
                f"(tensor {last.key!r} ends there), found {size}; {REDOWNLOAD}"
            )
    return entries


def _find_shards(folder: Path) -> tuple[list[str], dict[str, str] | None]:
    """The shard file names and the index's key -> shard map (None for a single file), checking the shards exist."""
    index = folder / INDEX_NAME
    if not index.is_file():
        if (folder / SINGLE_NAME).is_file():
            return [SINGLE_NAME], None
        found = sorted(p.name for p in folder.iterdir())
        hint = "download the checkpoint's *.safetensors files and its index"
        if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in found):
            hint = "pickle checkpoints (*.bin, *.pt) are not supported: convert to safetensors"
        elif any(n.endswith(".safetensors") for n in found):
            hint = f"shards without {INDEX_NAME}: re-download the index"
        raise CheckpointError(
            f"{folder}: neither {INDEX_NAME} nor {SINGLE_NAME} found "
            f"(found: {', '.join(found[:20]) or 'nothing'}); {hint}"
        )
    try:
        content = read_json(index, error=CheckpointError)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; re-download the index") from None
    if not isinstance(content, dict) or "weight_map" not in content:
        raise CheckpointError(f"{index}: malformed index, no 'weight_map'; re-download the index")
    weight_map = content["weight_map"]
    names_ok = isinstance(weight_map, dict) and all(
        isinstance(v, str) and Path(v).name == v for v in weight_map.values()
    )
    if not names_ok:
        raise CheckpointError(f"{index}: 'weight_map' must map keys to shard file names; re-download the index")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: shard named by {index.name} is missing; {REDOWNLOAD}")
    return names, weight_map


class Checkpoint:
    """A validated checkpoint folder: tensor names, shapes, dtypes and file locations; data is read on demand."""

    def __init__(self, folder: Path, entries: dict[str, TensorEntry], shards: list[Path]) -> None:
        self.folder = folder
        self.shards = shards
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """Tensor names in reading order (shard by shard, by file offset)."""
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        """Stored shape of ``key`` (KeyError if absent), for checking against a config before reading."""
        return self._entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of ``key``; ``iter_tensors`` casts only floating ones."""
        return self._entries[key].dtype

    def file_of(self, key: str) -> Path:
        """The shard holding ``key``, for error messages and diagnostics."""
        return self._entries[key].file

    @property
    def nbytes(self) -> int:
        """Total tensor data bytes (what loading to CPU in the stored dtypes allocates)."""
        return sum(e.nbytes for e in self._entries.values())

    def check_against(self, expected: Mapping[str, tuple[int, ...]], limit: int = 10) -> None:
        """Raise CheckpointError listing missing, unexpected and mis-shaped keys (``limit`` of each, with counts)."""
        missing = [k for k in expected if k not in self._entries]
        unexpected = [k for k in self._entries if k not in expected]
        mismatched = [k for k in self._entries if k in expected and self.shape(k) != tuple(expected[k])]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing: " + ", ".join(missing[:limit]))
        if unexpected:
            problems.append(
                f"{len(unexpected)} unexpected: "
                + ", ".join(f"{k} (in {self.file_of(k).name})" for k in unexpected[:limit])
            )
        if mismatched:
            problems.append(
                f"{len(mismatched)} with the wrong shape: "
                + ", ".join(
                    f"{k} (in {self.file_of(k).name}) found {self.shape(k)}, expected {tuple(expected[k])}"
                    for k in mismatched[:limit]
                )
            )
        if problems:
            raise CheckpointError(
                f"{self.folder}: checkpoint does not match the model config; "
                + "; ".join(problems)
                + ". Check that config.json belongs to these weights"
            )

    def iter_tensors(
        self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, progress: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` shard by shard; floating tensors become ``dtype`` (None: as stored).

        In the stored dtype on CPU the bytes land directly in the returned tensor; otherwise they land in
        one stored-dtype CPU temporary that is converted with ``.to`` and dropped before the next read.
        """
        from tqdm.auto import tqdm  # loaded when weights are read, not by `import dsv2viz`

        device = torch.device(device)
        for shard in self.shards:
            entries = [e for e in self._entries.values() if e.file == shard]
            with (
                open(shard, "rb", buffering=0) as f,
                tqdm(
                    total=sum(e.nbytes for e in entries),
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=visible_controls(shard.name),  # a file name: nothing in it may drive the terminal
                    disable=not progress,
                ) as bar,
            ):
                for e in entries:
                    target = dtype if dtype is not None and e.dtype.is_floating_point else e.dtype
                    tensor = torch.empty(e.shape, dtype=e.dtype)
                    _read_into(f, e, tensor, bar)
                    if target != e.dtype or device.type != "cpu":
                        tensor = tensor.to(device=device, dtype=target)
                    yield e.key, tensor


def _read_into(f: io.RawIOBase, e: TensorEntry, tensor: torch.Tensor, bar: Any) -> None:
    """Fill ``tensor``'s memory with the entry's bytes using plain reads; a short read means the file changed."""
    buf = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    f.seek(e.start)
    done = 0
    while done < e.nbytes:
        n = f.readinto(buf[done : done + READ_CHUNK_BYTES])
        if not n:
            raise CheckpointError(
                f"{e.file}: tensor {e.key!r}: file ended after {e.start + done} bytes, expected "
                f"{e.start + e.nbytes}; it changed or was truncated since opening; {REDOWNLOAD}"
            )
        done += n
        bar.update(n)


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """`path` as a Path, or CheckpointError when it is not a folder (missing, or a file)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise CheckpointError(f"{folder}: {what}; pass the folder that holds config.json and the *.safetensors shards")
    return folder


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Parse the index and every shard header of ``folder`` and validate them; no tensor data is read."""
    if sys.byteorder != "little":
        raise CheckpointError("safetensors data is little-endian and this host is big-endian; unsupported")
    folder = checkpoint_folder(folder)
    names, weight_map = _find_shards(folder)
    entries: dict[str, TensorEntry] = {}
    for name in names:
        for key, entry in sorted(_read_header(folder / name).items(), key=lambda item: item[1].start):
            if key in entries:
                raise CheckpointError(
                    f"{entry.file}: tensor {key!r} is also in {entries[key].file.name}; "
                    "the shards are inconsistent: re-download them"
                )
            entries[key] = entry
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in entries or entries[key].file.name != name:
                raise CheckpointError(
                    f"{folder / name}: tensor {key!r} listed in {INDEX_NAME} is not in this "
                    f"shard's header; {REDOWNLOAD}"
                )
        for key, entry in entries.items():
            if key not in weight_map:
                raise CheckpointError(
                    f"{entry.file}: tensor {key!r} is not listed in {INDEX_NAME}; the index and "
                    "shards are inconsistent: re-download them"
                )
    return Checkpoint(folder, entries, [folder / n for n in names])


#: Bytes hashed at each end of each shard's tensor data, and from the middle of every tensor, by the fingerprints.
FINGERPRINT_EDGE_BYTES = 64 * 2**10
FINGERPRINT_SAMPLE_BYTES = 1024


def checkpoint_fingerprint(folder: str | Path) -> str:
    """A hash that tells two checkpoints apart without reading them: one small read per tensor, a few MB in all.

    It covers each shard's name, size and whole header (every tensor's name, dtype, shape and offsets),
    the first and last FINGERPRINT_EDGE_BYTES of its tensor data and FINGERPRINT_SAMPLE_BYTES from the
    middle of every tensor: other weights of the same shapes (another seed, a fine-tune) change it.
    """
    ckpt = open_checkpoint(folder)
    digest = hashlib.sha256()
    for shard in ckpt.shards:
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            digest.update(f"{shard.name}\0{size}\0".encode() + f.read(header_len))
            data_start = 8 + header_len
            samples = [
                (data_start, FINGERPRINT_EDGE_BYTES),
                (max(data_start, size - FINGERPRINT_EDGE_BYTES), FINGERPRINT_EDGE_BYTES),
            ]
            samples += [_middle(e.start, e.nbytes) for e in ckpt._entries.values() if e.file == shard]
            for start, n in samples:
                f.seek(start)
                digest.update(f.read(n))
    return digest.hexdigest()


def _middle(start: int, nbytes: int) -> tuple[int, int]:
    """(offset, length) of the FINGERPRINT_SAMPLE_BYTES in the middle of `nbytes` bytes from `start` (all if fewer)."""
    n = min(nbytes, FINGERPRINT_SAMPLE_BYTES)
    return start + (nbytes - n) // 2, n


def tensors_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The same kind of hash for weights in memory (a model passed as an object): every tensor's name, dtype,
    shape and FINGERPRINT_SAMPLE_BYTES from its middle."""
    digest = hashlib.sha256()
    for name, t in tensors:
        data = t.detach().reshape(-1).view(torch.uint8)  # (numel * itemsize,) its bytes
        start, n = _middle(0, data.numel())
        digest.update(
            f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode() + data[start : start + n].cpu().numpy().tobytes()
        )
    return digest.hexdigest()
