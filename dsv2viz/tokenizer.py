"""The DeepSeek-V2 tokenizer, read safely from a checkpoint folder, and a helper to write small ones.

A checkpoint folder holds ``tokenizer.json`` (a byte-level BPE that the `tokenizers` library loads
without any Python code from the checkpoint) and, optionally, ``tokenizer_config.json`` with the
BOS/EOS strings, ``add_bos_token`` and a Jinja ``chat_template``. We read those plain-data files
ourselves instead of going through transformers, so loading never runs checkpoint code, and we check
that the BOS/EOS ids in ``config.json`` are the ids this tokenizer really gives those tokens: a
mismatch would silently feed the model the wrong start token; given the model's vocab_size, we also
check that the tokenizer cannot produce an id the embedding lacks. Chat templates render in Jinja's
immutable sandbox, within limits on size and work (`dsv2viz.chat_template`). `byte_level_bpe` and
`write_tokenizer_files` build small tokenizers in the same format, for test checkpoints and demos.

Every token id has exact bytes (:meth:`Tokenizer.token_bytes`): a byte-level vocabulary string stands
for its bytes through GPT-2's byte<->unicode table (each of the 256 bytes is one printable character:
``Ġ`` is the space), which is what the `tokenizers` ByteLevel decoder inverts. A token with a character
outside that table (DeepSeek's BOS/EOS, with their ``｜`` and ``▁``) stands for its own UTF-8, again as
that decoder reads it, added tokens included. `dsv2viz.text` turns these bytes into full texts, streamed
pieces and labels; :class:`SequenceText` does it for a generation as it grows.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from .files import atomic_path, atomic_write, read_json
from .text import TextStream, decode, label

DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"

#: DeepSeek-V2's chat format, used when the folder gives no template; unknown roles are an error.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% else %}{{ raise_exception('unknown role ' ~ message['role'] ~ \" (expected system, user or assistant)\") }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer folder, its configuration or a chat conversation is unusable."""


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte<->unicode table, inverted: the byte each character of a byte-level vocabulary stands for.

    Printable bytes stand for themselves; the other 68 (controls, space, DEL, NBSP, soft hyphen) for
    the characters from U+0100 on, in byte order (so the space, byte 32, is ``Ġ`` U+0120).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


BYTE_OF_CHAR = _byte_of_char()


def _vocab_bytes(token: str) -> bytes:
    """The bytes a byte-level vocabulary string stands for; its UTF-8 when it is not made of table characters."""
    try:
        return bytes(BYTE_OF_CHAR[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _token_text(value: Any, where: str) -> str | None:
    """A token as tokenizer_config.json writes it: a plain string or an AddedToken dict (None: not given)."""
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise TokenizerError(f"{where} must be a string or an AddedToken object with a 'content' string")
    return text


def _uses_byte_level(pre_tokenizer: dict | None) -> bool:
    """Whether the model's tokens are spelled in byte-level symbols (one character per byte)."""
    if pre_tokenizer is None:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_uses_byte_level(p) for p in pre_tokenizer.get("pretokenizers", []))
    return pre_tokenizer.get("type") == "ByteLevel"


def _keeps_every_byte(pre_tokenizer: dict | None) -> bool:
    """Whether a pre-tokenizer (as tokenizer.json spells it) passes every byte of the text on to the model:
    splitting and byte mapping do, pre-tokenizers that drop whitespace or delimiters do not."""
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return all(_keeps_every_byte(p) for p in pre_tokenizer.get("pretokenizers", []))
    if kind in ("Split", "Punctuation"):
        return pre_tokenizer.get("behavior") != "Removed"
    return kind in ("ByteLevel", "Metaspace", "Digits", "UnicodeScripts")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _one_line(text: str) -> str:
    """An error message from a template (Jinja's name the line and quote it below) on one line."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class Tokenizer:
    """DeepSeek-V2's byte-level BPE tokenizer with its BOS/EOS handling and chat template."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str,
        eos_token: str,
        add_bos_token: bool = True,
        chat_template: str | None = None,
        source: str = "tokenizer",
    ):
        """Wrap a loaded `tokenizers.Tokenizer`; `source` names where it came from, for error messages."""
        self._tok = tokenizer
        self._bos_token, self._eos_token = bos_token, eos_token
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self._bos_id, self._eos_id = (self._id_of(t, source) for t in (bos_token, eos_token))

    def _id_of(self, token: str, source: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{source} has no token {token!r}")
        return token_id

    @classmethod
    def from_dir(
        cls,
        path: str | os.PathLike,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        vocab_size: int | None = None,
    ) -> Tokenizer:
        """Load ``tokenizer.json`` (+ optional ``tokenizer_config.json``) from a checkpoint folder.

        `bos_token_id` / `eos_token_id` are config.json's ids; when given they must match the ids the
        tokenizer gives the BOS/EOS strings. Without tokenizer_config.json, BOS/EOS are the tokens at
        those ids, or DeepSeek's strings when no ids are given. `vocab_size` is config.json's: when
        given, every id the tokenizer can produce must be below it (the embedding has that many rows).
        """
        folder = Path(path)
        tok_path, cfg_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
        if not tok_path.is_file():
            raise TokenizerError(
                f"{tok_path} not found: a tokenizer folder needs tokenizer.json "
                "(the `tokenizers` library's serialized tokenizer)"
            )
        read_json(tok_path, error=TokenizerError)  # bounded, and well-formed before the Rust parser sees it
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust library raises a bare Exception
            raise TokenizerError(f"{tok_path} is not a tokenizers tokenizer: {e}") from e
        cfg = read_json(cfg_path, error=TokenizerError) if cfg_path.is_file() else {}
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{cfg_path} must hold a JSON object")
        if vocab_size is not None:
            highest = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
            if highest >= vocab_size:
                raise TokenizerError(
                    f"{tok_path} has token ids up to {highest}, but config.json's vocab_size is {vocab_size}: "
                    f"the model has no embedding for ids {vocab_size} and up; this tokenizer belongs to another model"
                )
        add_bos = cfg.get("add_bos_token", True)
        if not isinstance(add_bos, bool):
            raise TokenizerError(f"{cfg_path}: add_bos_token must be true or false")
        template = cfg.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{cfg_path}: chat_template must be a string")
        specials = {}
        for name, given_id, fallback in (("bos", bos_token_id, DEEPSEEK_BOS), ("eos", eos_token_id, DEEPSEEK_EOS)):
            text = _token_text(cfg.get(f"{name}_token"), f"{cfg_path}: {name}_token")
            if text is None:
                text = tok.id_to_token(given_id) if given_id is not None else fallback
            actual = tok.token_to_id(text) if text is not None else None
            if given_id is not None and actual != given_id:
                raise TokenizerError(
                    f"config.json says {name}_token_id={given_id}, but {tok_path} gives "
                    f"{name} token {text!r} id {actual}"
                )
            specials[f"{name}_token"] = text
        return cls(tok, **specials, add_bos_token=add_bos, chat_template=template, source=str(tok_path))

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added tokens included (may be below the model's vocab_size)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_bytes(self) -> int | None:
        """The most bytes of text one token can stand for, added tokens included: a text of B UTF-8 bytes
        has at least ceil(B / max_token_bytes) tokens, which bounds a document's length before tokenizing it.

        None when that bound does not hold: a normalizer or a pre-tokenizer that drops text (whitespace,
        delimiters) can make a long text few tokens. DeepSeek's byte-level BPE has neither.
        """
        spec = json.loads(self._tok.to_str())
        pre = spec.get("pre_tokenizer")
        if spec.get("normalizer") not in (None, {"type": "Sequence", "normalizers": []}) or not _keeps_every_byte(pre):
            return None
        added = {t["content"] for t in spec.get("added_tokens", [])}  # matched in the text as they are spelled
        byte_level = _uses_byte_level(pre)
        # a byte-level token spells each byte with one character ('Ġ' is a space); any other token's UTF-8
        # spelling is never shorter than the bytes it stands for ('▁' is 3 bytes for a space)
        return max(
            (len(t) if byte_level and t not in added else len(t.encode("utf-8")) for t in self._tok.get_vocab(True)),
            default=1,
        )

    @property
    def bos_token(self) -> str:
        return self._bos_token

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def bos_token_id(self) -> int:
        return self._bos_id

    @property
    def eos_token_id(self) -> int:
        return self._eos_id

    def encode(self, text: str, *, add_bos: bool | None = None, max_tokens: int | None = None) -> list[int]:
        """Token ids for `text`; BOS first if `add_bos` (None: the config's add_bos_token), never twice.

        With `max_tokens`, a text too long to fit in that many tokens is refused before it is tokenized
        (when :attr:`max_token_bytes` bounds it; callers still check the ids' length).
        """
        longest = None if max_tokens is None else self.max_token_bytes
        if longest is not None and len(text) > max_tokens * longest:  # bytes >= characters
            raise ValueError(
                f"a text of {len(text):,} characters has more than {max_tokens:,} tokens, the model's context: shorten it"
            )
        ids = self._tok.encode(text, add_special_tokens=False).ids
        add = self.add_bos_token if add_bos is None else add_bos
        return [self._bos_id, *ids] if add and not text.startswith(self._bos_token) else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def _bytes(self) -> list[bytes]:
        """Every id's bytes, computed from the vocabulary once (see token_bytes)."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        table = [b""] * (max(vocab.values(), default=-1) + 1)
        if isinstance(self._tok.decoder, decoders.ByteLevel):
            for token, i in vocab.items():
                table[i] = _vocab_bytes(token)
        else:  # not byte-level: the best we can say is each token's own decoded text
            for i in vocab.values():
                table[i] = self._tok.decode([i], skip_special_tokens=False).encode("utf-8")
        return table

    def token_bytes(self, ids: Iterable[int]) -> list[bytes]:
        """The exact bytes of each token; they join to the UTF-8 that `decode` reads (see the module docstring).

        An id the tokenizer does not know (a model's vocab_size may exceed the tokenizer's) has no
        bytes, as `tokenizers` drops it when decoding.
        """
        table = self._bytes
        return [table[i] if 0 <= i < len(table) else b"" for i in ids]

    def token_labels(self, ids: Iterable[int]) -> list[str]:
        """Each token id shown alone: its complete characters as text, its other bytes in hex (`dsv2viz.text.label`)."""
        return id_labels(self, ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **limits: Any) -> str:
        """Render a conversation with the folder's chat template (DeepSeek-V2's by default), sandboxed and
        within limits on size and work (`limits`: max_chars, max_steps, max_seconds of
        `dsv2viz.chat_template.render_chat_template`); every failure is a one-line TokenizerError."""
        if not isinstance(messages, (list, tuple)):
            raise TokenizerError(
                f"messages must be a list of {{'role': ..., 'content': ...}} dicts, not {type(messages).__name__}"
            )
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise TokenizerError(f"message {i} needs a 'role' string: {_short(message)}")
            if not isinstance(message.get("content"), str):
                raise TokenizerError(f"message {i} ({_short(message['role'])}) needs a 'content' string")
        from .chat_template import ChatTemplateLimit, render_chat_template  # Jinja loads when a template is used

        variables = dict(
            messages=messages,
            bos_token=self._bos_token,
            eos_token=self._eos_token,
            add_generation_prompt=add_generation_prompt,
        )
        try:
            return render_chat_template(
                self.chat_template, variables, globals={"raise_exception": _raise_exception}, **limits
            )
        except ChatTemplateLimit as e:
            raise TokenizerError(f"chat template stopped: {e}") from e
        except Exception as e:  # the template is checkpoint data and may fail any way it likes
            raise TokenizerError(f"chat template failed: {type(e).__name__}: {_one_line(str(e))}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation; the template's BOS is not doubled."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


def id_labels(tokenizer: Tokenizer | None, ids: Iterable[int]) -> list[str]:
    """Each token id shown alone (`dsv2viz.text.label` of its bytes), or ``<id>`` for a model without a tokenizer."""
    return [f"<{i}>" for i in ids] if tokenizer is None else [label(b) for b in tokenizer.token_bytes(ids)]


class SequenceText:
    """The text of a token sequence as it grows (a generation's): each token's bytes and label, and its text.

    `append` returns the text the new tokens complete (`dsv2viz.text.TextStream`), `flush` the U+FFFD of a
    character left unfinished at the end; all of it joined is `text`. Without a tokenizer there are no
    bytes: every token shows and streams as ``<id>``.
    """

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.chunks: list[bytes] | None = None if tokenizer is None else []  # each token's bytes
        self.labels: list[str] = []  # each token's label in this sequence
        self._stream = TextStream()

    def append(self, ids: Iterable[int]) -> str:
        """Add tokens; returns the text they complete."""
        ids = list(ids)
        if self.tokenizer is None:
            shown = [f"<{i}>" for i in ids]
            self.labels += shown
            return "".join(shown)
        streamed = []
        for chunk in self.tokenizer.token_bytes(ids):
            piece = self._stream.push(chunk)
            self.chunks.append(chunk)
            self.labels.append(piece.label)
            streamed.append(piece.text)
        return "".join(streamed)

    def flush(self) -> str:
        """End the sequence: U+FFFD for the bytes of a character no later token will finish."""
        return self._stream.flush()

    @property
    def text(self) -> str:
        """The whole sequence decoded (a character still unfinished shows as U+FFFD)."""
        return "".join(self.labels) if self.chunks is None else decode(self.chunks)


def byte_level_bpe(
    texts: Iterable[str] | None, vocab_size: int, bos_token: str = DEEPSEEK_BOS, eos_token: str = DEEPSEEK_EOS
) -> tokenizers.Tokenizer:
    """A byte-level BPE like DeepSeek's, trained on `texts`, with at most `vocab_size` tokens in all.

    Ids 0..255 are the 256 byte symbols, then the merges learned from `texts` (none when `texts`
    is None or empty), then BOS and EOS, so an untrained one has BOS 256 and EOS 257.
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + BOS + EOS), got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts or [], trainer=trainer)
    tok.add_special_tokens([bos_token, eos_token])
    return tok


def write_tokenizer_files(
    folder: str | os.PathLike,
    tokenizer: tokenizers.Tokenizer,
    *,
    bos_token: str,
    eos_token: str,
    chat_template: str | None = None,
) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` shaped like DeepSeek's official one.

    Without `chat_template` the config has none, and readers fall back to DeepSeek-V2's format. Each
    file is written whole or not at all.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "tokenizer.json") as tmp:
        tokenizer.save(str(tmp))

    def added(content: str) -> dict:
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    cfg: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added(bos_token),
        "eos_token": added(eos_token),
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    atomic_write(folder / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
