"""Exact text from token bytes: full texts, streamed pieces, token labels, and text safe for a terminal.

A byte-level BPE token (DeepSeek-V2's tokenizer) is a run of bytes, not of characters. A Chinese or
Japanese character is 3 bytes of UTF-8 and an emoji 4, and the tokenizer often splits them over two or
more tokens; decoded on its own, such a token is only U+FFFD. Every place dsv2viz shows text follows one
rule, built here on the tokens' exact bytes (``Tokenizer.token_bytes``, or a trace's ``token_bytes``):

* **Full text** (``Trace.text``, ``Generation.text``, the report's prompt and generated text, the CLI's
  output) is the whole sequence's bytes decoded as UTF-8 (:func:`decode`), each invalid sequence as one
  U+FFFD, exactly as ``bytes.decode("utf-8", "replace")`` and the `tokenizers` library's own decode do.
  It is never made by joining labels.
* **Streaming** (``Step.text``): :class:`TextStream` decodes incrementally. A character is emitted by the
  token that holds its last byte, an invalid sequence (as U+FFFD) by the token whose byte shows it
  invalid, and :meth:`TextStream.flush` ends a sequence with U+FFFD for bytes still waiting for the
  rest of a character. So the pieces of a sequence, joined, equal :func:`decode` of its bytes;
  :func:`pieces` splits a whole sequence the same way. A generation streams on from its prompt (a
  character the prompt's ids leave unfinished is finished by the first step; a text prompt always ends
  on a character) and flushes with its last step; one ended by ``stop()`` has no step left to carry
  that flush, and only its ``text`` ends with the U+FFFD.
* **Labels** (figures, the token strip, explorers, hover text, ``routing_df``): a token in a sequence
  shows the characters it completes, then, as hex in angle brackets, the bytes it holds of a character
  it does not complete (the start or middle of a character a later token completes) or of no character
  at all (bytes that are not valid UTF-8). 日 (e6 97 a5) split as ``e6 97 | a5`` labels ``⟨e6 97⟩``,
  ``日``; a token holding ``a5 e6`` after ``e6 97`` shows ``日⟨e6⟩``. A label depends only on its token
  and the ones before it, so a growing sequence never relabels earlier tokens. :func:`labels`.
  A token id shown alone (next-token candidates, top tokens per expert, corpus tables) shows its
  complete characters as text and any other bytes as hex: :func:`label`. Labels are plain text: figures
  escape them for HTML and make whitespace visible with ``plots._text.token_label``.
* **Terminal**: :func:`visible_controls` makes control characters visible before the CLI prints user
  or model text, as HTML escaping keeps markup from running in the report: C0 controls show as their
  Unicode control pictures (ESC ``␛``, BEL ``␇``, CR ``␍``, NUL ``␀``), line feed ``↵`` and tab ``⇥``
  (kept as real newlines and tabs for streamed text), DEL ``␡``; C1 controls (U+0080..U+009F) and the
  bidirectional embeddings, overrides and isolates (U+202A..U+202E, U+2066..U+2069) show as their code
  point, e.g. ``⟨U+202E⟩``. No escape sequence can then move the cursor, retitle the window or reorder
  the line. :func:`visible` adds what a label needs in a fixed-width cell: edge spaces as ``·``.

Pure Python on purpose (codecs only), so traces, widgets and the CLI share it without heavy imports.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from dataclasses import dataclass

REPLACEMENT = "\ufffd"

#: How each invisible or terminal-controlling character is shown (see the module docstring).
_CONTROLS = {c: 0x2400 + c for c in range(0x20)} | {0x0A: "↵", 0x09: "⇥", 0x7F: "␡"}
_CONTROLS |= {c: f"⟨U+{c:04X}⟩" for c in [*range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]}
_CONTROLS_KEEP_LINES = {c: shown for c, shown in _CONTROLS.items() if c not in (0x0A, 0x09)}


def decode(data: bytes | Iterable[bytes]) -> str:
    """The text of UTF-8 bytes (or of token byte runs, joined), each invalid sequence as one U+FFFD."""
    if not isinstance(data, (bytes, bytearray)):
        data = b"".join(data)
    return data.decode("utf-8", errors="replace")


def _units(data: bytes, final: bool) -> tuple[list[tuple[int, int, str | None]], int]:
    """Split UTF-8 `data` into (start, end, character) units; the character is None for an invalid sequence.

    Validity and the extent of each invalid sequence are CPython's own (the maximal subparts that
    ``errors="replace"`` turns into one U+FFFD each). Unless `final`, an incomplete character at the end
    is left out; the second value is how many bytes the units cover.
    """
    units: list[tuple[int, int, str | None]] = []
    view, i = memoryview(data), 0
    while True:
        try:
            text, _ = codecs.utf_8_decode(view[i:], "strict", final)
            bad = None
        except UnicodeDecodeError as e:  # e.start, e.end: the invalid sequence, relative to view[i:]
            text, _ = codecs.utf_8_decode(view[i : i + e.start], "strict", True)
            bad = (i + e.start, i + e.end)
        for char in text:
            n = len(char.encode("utf-8"))
            units.append((i, i + n, char))
            i += n
        if bad is None:
            return units, i
        units.append((*bad, None))
        i = bad[1]


def _hex(data: bytes) -> str:
    return "⟨" + data.hex(" ") + "⟩"


@dataclass(frozen=True)
class Piece:
    """What one token adds to a sequence's text."""

    text: str  # the characters it completes, as streamed (U+FFFD for invalid bytes it shows invalid)
    label: str  # how a view shows it: those characters, its other bytes in hex


class TextStream:
    """Incremental UTF-8 decoding of a token sequence, one token's bytes at a time (see the module docstring)."""

    def __init__(self) -> None:
        self.pending = b""  # the start of a character whose remaining bytes have not arrived (at most 3 bytes)

    def push(self, chunk: bytes) -> Piece:
        """Read one token's bytes: the text it completes and its label."""
        data, old = self.pending + chunk, len(self.pending)  # data[:old] belongs to earlier tokens
        units, used = _units(data, final=False)
        text, label, raw = [], [], bytearray()  # raw: this token's bytes shown in hex, not yet written
        for start, end, char in units:
            text.append(REPLACEMENT if char is None else char)
            if end <= old:
                continue  # an invalid sequence wholly in earlier tokens, already shown in their hex
            if char is None:
                raw += data[max(start, old) : end]
            else:
                if raw:
                    label.append(_hex(raw))
                    raw.clear()
                label.append(char)
        raw += data[max(used, old) :]  # the start of a character a later token may complete
        if raw:
            label.append(_hex(raw))
        self.pending = data[used:]
        return Piece("".join(text), "".join(label))

    def flush(self) -> str:
        """End the sequence: U+FFFD for the bytes of an unfinished character, as whole decoding makes them."""
        text = decode(self.pending)
        self.pending = b""
        return text


def pieces(chunks: Iterable[bytes]) -> list[str]:
    """Each token's streamed text (the last one's includes the final flush); they join to `decode(chunks)`."""
    stream = TextStream()
    out = [stream.push(chunk).text for chunk in chunks]
    if out:
        out[-1] += stream.flush()
    return out


def labels(chunks: Iterable[bytes]) -> list[str]:
    """The label of each token of a sequence, given each token's bytes."""
    stream = TextStream()
    return [stream.push(chunk).label for chunk in chunks]


def label(chunk: bytes) -> str:
    """The label of one token shown alone: its complete characters, its other bytes in hex."""
    return TextStream().push(chunk).label


def visible_controls(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with every control character visible, safe to print to a terminal (see the module docstring).

    `keep_newlines` keeps line feeds and tabs as they are, for running text such as a streamed generation.
    """
    return text.translate(_CONTROLS_KEEP_LINES if keep_newlines else _CONTROLS)


def visible(text: str, max_chars: int | None = None) -> str:
    """A label as one visible cell: edge spaces as ``·``, controls visible, ``∅`` for nothing.

    Spaces between other characters stay spaces (``" the"`` -> ``·the``, ``"  "`` -> ``··``). `max_chars`
    cuts the result to that many characters, the last one ``…``.
    """
    if not text:
        return "∅"
    body = text.strip(" ")
    start = text.index(body) if body else len(text)
    shown = visible_controls("·" * start + body + "·" * (len(text) - start - len(body)))
    if max_chars is not None and len(shown) > max_chars:
        shown = shown[: max(1, max_chars - 1)] + "…"
    return shown
