"""Reading a corpus: plain text files, JSONL and Parquet, planned into shards of documents.

A *record* is one document as the input holds it: a whole ``.txt``/``.md``/``.py`` file, one non-blank line
of a ``.jsonl`` file, one row of a ``.parquet`` file. Planning counts records without tokenizing (JSONL:
a scan for line starts; Parquet: its metadata) and cuts the corpus into shards of consecutive records.
A shard is the unit of work, of output and of resumption: a worker reads its records straight from the
inputs, so nothing but the small plan travels to workers.

A record that cannot be read (a line that is not JSON, an object without the text field, a text that is
not UTF-8) becomes a :class:`Document` carrying an ``error`` instead of a text: it is reported and
skipped, and never stops the job. So does a record too long to be routed: given the most bytes of text a
document may have (``max_text_bytes``, which the collection derives from ``max_tokens`` and the
tokenizer's longest token), a longer one is skipped unread, never loaded whole, let alone tokenized; no
record is ever read past ``MAX_RECORD_BYTES``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import parse_json

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")

#: The most bytes of one record read in any case: about 400 times the text of DeepSeek-V2's longest context.
MAX_RECORD_BYTES = 64 * 2**20
#: JSON spells one byte of text in at most 6 (``\u0001``); a JSONL line also holds the id and other fields.
JSON_BYTES_PER_TEXT_BYTE = 6
JSON_OTHER_FIELDS_BYTES = 2**16
_CHUNK = 2**20


class CollectError(ValueError):
    """The collection cannot start or continue: a missing or unreadable input, an output folder made
    with other settings. Problems with single documents are reported and skipped instead."""


@dataclass(frozen=True)
class InputFile:
    """One input file and how many records it holds."""

    path: str
    kind: str  # "text" | "jsonl" | "parquet"
    records: int
    size: int  # bytes; with mtime_ns, how a resumed run recognises the same input
    mtime_ns: int


@dataclass(frozen=True)
class Segment:
    """Records [start, stop) of one input file; for JSONL, record `start` begins at byte `offset`, line `line`."""

    file: int  # index into the plan's files
    start: int
    stop: int
    offset: int = 0
    line: int = 1


@dataclass(frozen=True)
class ShardSpec:
    """A shard: consecutive records, possibly across files. `first_doc` is its first record's global index."""

    index: int
    first_doc: int
    segments: tuple[Segment, ...]

    @property
    def name(self) -> str:
        return f"{self.index:05d}"

    def to_dict(self) -> dict:
        return {"index": self.index, "first_doc": self.first_doc, "segments": [asdict(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, d: dict) -> ShardSpec:
        return cls(d["index"], d["first_doc"], tuple(Segment(**s) for s in d["segments"]))


@dataclass(frozen=True)
class Document:
    """One record: its global index, an id for people (the input's id field, else ``path:line``/``path:row``)
    and its text, or the reason it could not be read."""

    index: int
    doc_id: str
    text: str | None
    error: str | None = None


def kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise CollectError(
        f"{path}: unknown input type {suffix!r}; give plain text ({', '.join(TEXT_SUFFIXES)}), .jsonl or .parquet"
    )


def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The input files: files as given, folders expanded to their readable files in sorted order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl", ".parquet")
            )
            if not found:
                raise CollectError(f"{p}: the folder holds no .txt, .jsonl or .parquet files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise CollectError(f"{p}: no such file or folder")
    if not out:
        raise CollectError("no input files given")
    return out


def _jsonl_line_starts(path: Path) -> list[tuple[int, int]]:
    """(byte offset, line number) of the non-blank lines of a JSONL file (one record each), read in chunks,
    so a huge line costs no more memory than a short one."""
    starts: list[tuple[int, int]] = []
    pos, number, line_start, blank = 0, 1, 0, True  # the current line: where it starts, and blank so far
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            begin = 0
            while (end := chunk.find(b"\n", begin)) >= 0:
                if not (blank and _blank(chunk[begin:end])):
                    starts.append((line_start, number))
                number, line_start, blank, begin = number + 1, pos + end + 1, True, end + 1
            blank = blank and _blank(chunk[begin:])
            pos += len(chunk)
    if not blank:
        starts.append((line_start, number))
    return starts


def _parquet_rows(path: Path, text_field: str) -> int:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise CollectError(f"{path}: not a readable Parquet file ({e})") from e
    if text_field not in pf.schema_arrow.names:
        raise CollectError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); pass --text-field")
    return pf.metadata.num_rows


def plan_shards(
    paths: Sequence[str | os.PathLike], docs_per_shard: int, text_field: str
) -> tuple[list[InputFile], list[ShardSpec]]:
    """Count the records of every input and cut them into shards of `docs_per_shard` consecutive records.

    Fails (CollectError) before any work for a missing file, an unknown type or a Parquet file that cannot
    be read; bad records inside a readable file are left for the workers to report.
    """
    if docs_per_shard < 1:
        raise CollectError("docs_per_shard must be at least 1")
    files: list[InputFile] = []
    starts: list[list[tuple[int, int]]] = []
    for path in expand_inputs(paths):
        kind = kind_of(path)
        st = path.stat()
        offsets: list[tuple[int, int]] = []
        if kind == "text":
            records = 1
        elif kind == "jsonl":
            offsets = _jsonl_line_starts(path)
            records = len(offsets)
        else:
            records = _parquet_rows(path, text_field)
        files.append(InputFile(str(path), kind, records, st.st_size, st.st_mtime_ns))
        starts.append(offsets)

    shards: list[ShardSpec] = []
    segments: list[Segment] = []
    first_doc = doc = 0
    for i, f in enumerate(files):
        start = 0
        while start < f.records:
            room = docs_per_shard - sum(s.stop - s.start for s in segments)
            stop = min(f.records, start + room)
            offset, line = starts[i][start] if f.kind == "jsonl" else (0, 1)
            segments.append(Segment(i, start, stop, offset, line))
            doc += stop - start
            start = stop
            if doc - first_doc == docs_per_shard:
                shards.append(ShardSpec(len(shards), first_doc, tuple(segments)))
                segments, first_doc = [], doc
    if segments:
        shards.append(ShardSpec(len(shards), first_doc, tuple(segments)))
    return files, shards


def _blank(data: bytes) -> bool:
    return not data.strip()


def _too_long(size: int, limit: int, what: str) -> str:
    return (
        f"{what} of {size:,} bytes, over the {limit:,} that any document within --max-tokens can have: "
        "raise --max-tokens or split the document; it was skipped unread, not truncated"
    )


def _text_file(path: str, index: int, max_text_bytes: int) -> Document:
    size = Path(path).stat().st_size
    if size > max_text_bytes:
        return Document(index, path, None, _too_long(size, max_text_bytes, "a text"))
    try:
        return Document(index, path, Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        return Document(index, path, None, f"not UTF-8 text ({e})")


def _skip_rest_of_line(f, blank: bool) -> tuple[int, bool]:
    """Read past the end of the current line in bounded chunks: (bytes skipped, whether the line is blank,
    given whether it was so far)."""
    skipped = 0
    while part := f.readline(_CHUNK):
        skipped += len(part)
        blank = blank and _blank(part)
        if part.endswith(b"\n"):
            break
    return skipped, blank


def _jsonl(
    path: str, seg: Segment, first: int, text_field: str, id_field: str, max_text_bytes: int
) -> Iterator[Document]:
    max_line = max_text_bytes * JSON_BYTES_PER_TEXT_BYTE + JSON_OTHER_FIELDS_BYTES
    with open(path, "rb") as f:
        f.seek(seg.offset)
        record, number = seg.start, seg.line - 1
        while record < seg.stop:
            raw = f.readline(max_line + 1)
            number += 1
            index = first + record - seg.start
            if not raw:
                yield Document(index, f"{path}:end", None, "the file ended early: it changed since the job was planned")
                record += 1
                continue
            line_no = f"{path}:{number}"
            if len(raw) > max_line and not raw.endswith(b"\n"):
                skipped, blank = _skip_rest_of_line(f, _blank(raw))
                if blank:  # as planning counted it: not a record
                    continue
                record += 1
                yield Document(index, line_no, None, _too_long(len(raw) + skipped, max_line, "a JSON line"))
                continue
            if not raw.strip():
                continue
            record += 1
            try:
                obj = parse_json(raw)
            except ValueError as e:
                yield Document(index, line_no, None, str(e))
                continue
            if not isinstance(obj, dict):
                yield Document(
                    index, line_no, None, f"a JSON {type(obj).__name__}, not an object with a {text_field!r} field"
                )
                continue
            doc_id = str(obj[id_field]) if obj.get(id_field) is not None else line_no
            text = obj.get(text_field)
            if not isinstance(text, str):
                what = "missing" if text_field not in obj else f"a {type(text).__name__}, not a string"
                yield Document(index, doc_id, None, f"field {text_field!r} is {what}")
                continue
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError as e:  # JSON can spell a lone surrogate, "\ud800"
                yield Document(index, doc_id, None, f"field {text_field!r} is not valid Unicode ({e.reason})")
                continue
            if size > max_text_bytes:
                yield Document(index, doc_id, None, _too_long(size, max_text_bytes, "a text"))
                continue
            yield Document(index, doc_id, text)


def _parquet(
    path: str, seg: Segment, first: int, text_field: str, id_field: str, max_text_bytes: int
) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    columns = [text_field] + ([id_field] if id_field in pf.schema_arrow.names else [])
    row = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(seg.start, row), min(seg.stop, row + n)
        if lo < hi:
            table = pf.read_row_group(g, columns=columns).slice(lo - row, hi - lo)
            column = table.column(text_field)
            is_text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            sizes = pc.binary_length(column).to_pylist() if is_text else [None] * len(column)
            ids = table.column(id_field).to_pylist() if len(columns) == 2 else [None] * len(column)
            for k, (size, doc_id) in enumerate(zip(sizes, ids)):
                r = lo + k
                name = str(doc_id) if doc_id is not None else f"{path}:row {r}"
                if size is not None and size > max_text_bytes:  # not even made a Python string
                    yield Document(first + r - seg.start, name, None, _too_long(size, max_text_bytes, "a text"))
                    continue
                text = column[k].as_py()
                if isinstance(text, str):
                    yield Document(first + r - seg.start, name, text)
                else:
                    yield Document(
                        first + r - seg.start,
                        name,
                        None,
                        f"column {text_field!r} is {'null' if text is None else type(text).__name__}",
                    )
        row += n


def read_shard(
    files: Sequence[InputFile],
    spec: ShardSpec,
    text_field: str = "text",
    id_field: str = "id",
    max_text_bytes: int | None = None,
) -> list[Document]:
    """The documents of one shard, in record order, bad records included as errors.

    A text of more than `max_text_bytes` UTF-8 bytes (at most MAX_RECORD_BYTES) is an error read no further
    than needed to know it; so is a JSONL line longer than any line holding such a text can be.
    """
    limit = min(max_text_bytes or MAX_RECORD_BYTES, MAX_RECORD_BYTES)
    docs: list[Document] = []
    first = spec.first_doc
    for seg in spec.segments:
        f = files[seg.file]
        if f.kind == "text":
            docs.append(_text_file(f.path, first, limit))
        elif f.kind == "jsonl":
            docs += _jsonl(f.path, seg, first, text_field, id_field, limit)
        else:
            docs += _parquet(f.path, seg, first, text_field, id_field, limit)
        first += seg.stop - seg.start
    return docs
