"""dsv2viz.tokenizer: loading a tokenizer folder safely, BOS handling, chat templates, small tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError

from dsv2viz.tokenizer import (
    DEEPSEEK_BOS,
    DEEPSEEK_EOS,
    Tokenizer,
    TokenizerError,
    byte_level_bpe,
    write_tokenizer_files,
)

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "你好，世界 🙂"] * 20
MIXED = "Hello, world!  naïve café — 你好，世界 🙂🚀\ttabs\nand newlines"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
]


def make_folder(folder: Path, bos: str = DEEPSEEK_BOS, eos: str = DEEPSEEK_EOS, **config_changes) -> Path:
    """A trained tokenizer written with write_tokenizer_files, then tokenizer_config.json edited."""
    write_tokenizer_files(folder, byte_level_bpe(CORPUS, 320, bos, eos), bos_token=bos, eos_token=eos)
    if config_changes:
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config.update(config_changes)
        path.write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture
def tok(tmp_path: Path) -> Tokenizer:
    return Tokenizer.from_dir(make_folder(tmp_path))


def test_round_trip_of_mixed_unicode_text(tok):
    ids = tok.encode(MIXED, add_bos=False)
    assert tok.decode(ids) == MIXED
    assert tok.decode(tok.encode(MIXED)) == DEEPSEEK_BOS + MIXED
    assert tok.decode(tok.encode(MIXED), skip_special_tokens=True) == MIXED
    assert len(ids) < len(MIXED.encode()), "the trained merges should compress the text"


def test_bos_added_once(tok):
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[1:] == tok.encode("hello", add_bos=False)
    assert tok.encode(DEEPSEEK_BOS + "hello") == ids
    assert tok.encode(DEEPSEEK_BOS + "hello", add_bos=True) == ids


def test_add_bos_token_false_in_config(tmp_path):
    tok = Tokenizer.from_dir(make_folder(tmp_path, add_bos_token=False))
    assert tok.bos_token_id not in tok.encode("hello")
    assert tok.encode("hello", add_bos=True)[0] == tok.bos_token_id


def test_string_and_added_token_forms_read_the_same(tmp_path):
    # Non-DeepSeek strings, so passing proves the config was read rather than the defaults used.
    as_dicts = Tokenizer.from_dir(make_folder(tmp_path / "dicts", "<s>", "</s>"))
    as_strings = Tokenizer.from_dir(make_folder(tmp_path / "strings", "<s>", "</s>", bos_token="<s>", eos_token="</s>"))
    config = json.loads((tmp_path / "dicts" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"]["__type"] == "AddedToken" and config["bos_token"]["content"] == "<s>"
    for tok in as_dicts, as_strings:
        assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
        assert tok.token_labels([tok.bos_token_id, tok.eos_token_id]) == ["<s>", "</s>"]
        assert tok.decode(tok.encode("hi")) == "<s>hi"


def test_config_ids_must_match_the_tokenizer(tmp_path):
    folder = make_folder(tmp_path)
    good = Tokenizer.from_dir(folder)
    bos, eos = good.bos_token_id, good.eos_token_id
    assert Tokenizer.from_dir(folder, bos_token_id=bos, eos_token_id=eos).bos_token_id == bos
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(folder, bos_token_id=100000, eos_token_id=eos)
    assert "100000" in str(err.value) and str(bos) in str(err.value) and DEEPSEEK_BOS in str(err.value)
    assert "tokenizer.json" in str(err.value)
    with pytest.raises(TokenizerError, match=f"eos_token_id=7.*{eos}"):
        Tokenizer.from_dir(folder, bos_token_id=bos, eos_token_id=7)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_malformed_json_names_the_file(tmp_path, name):
    folder = make_folder(tmp_path)
    (folder / name).write_text('{"truncated": ', encoding="utf-8")
    with pytest.raises(TokenizerError, match=name):
        Tokenizer.from_dir(folder)


def test_default_chat_template(tok):
    expected = (
        "<｜begin▁of▁sentence｜>You are terse.\n\nUser: hi\n\nAssistant: hello<｜end▁of▁sentence｜>"
        "User: bye\n\nAssistant:"
    )
    assert tok.apply_chat_template(CHAT) == expected
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == expected.removesuffix("Assistant:")
    ids = tok.encode_chat(CHAT)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids.count(tok.eos_token_id) == 1
    assert tok.decode(ids) == expected


@pytest.mark.parametrize(
    "messages, complaint",
    [
        ([{"role": "robot", "content": "beep"}], "unknown role robot"),
        ([{"role": "user"}], "content"),
        ([{"content": "hi"}], "role"),
    ],
)
def test_bad_messages(tok, messages, complaint):
    with pytest.raises(TokenizerError, match=complaint):
        tok.apply_chat_template(messages)


def test_custom_template_from_config(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}|{{ m['content'] }}]{% endfor %}{{ eos_token }}"
    tok = Tokenizer.from_dir(make_folder(tmp_path, chat_template=template))
    assert tok.apply_chat_template(CHAT[1:3]) == f"[user|hi][assistant|hello]{DEEPSEEK_EOS}"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.__class__() }}",
        "{{ messages.append(1) }}",
    ],
)
def test_unsafe_template_is_blocked(tmp_path, template):
    tok = Tokenizer.from_dir(make_folder(tmp_path, chat_template=template))
    with pytest.raises(TokenizerError) as err:
        tok.apply_chat_template(CHAT)
    assert isinstance(err.value.__cause__, SecurityError)
    assert "<class" not in str(err.value)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for m in messages %}", "end of template"),
        ("{{ raise_exception('no tools here') }}", "no tools here"),
    ],
)
def test_failing_template(tmp_path, template, message):
    tok = Tokenizer.from_dir(make_folder(tmp_path, chat_template=template))
    with pytest.raises(TokenizerError, match=message):
        tok.apply_chat_template(CHAT)


def test_token_labels_are_readable(tok):
    text = "the quick brown fox, hello world"
    ids = tok.encode(text, add_bos=False)
    texts = tok.token_labels(ids)
    assert len(texts) == len(ids) and "".join(texts) == text
    assert any(t.startswith(" ") and len(t) > 1 for t in texts) and not any("Ġ" in t for t in texts)
    assert tok.token_labels([tok.bos_token_id]) == [DEEPSEEK_BOS]
    assert tok.token_bytes([tok.bos_token_id]) == [DEEPSEEK_BOS.encode()]  # an added token: its UTF-8


def test_untrained_byte_level_tokenizer(tmp_path):
    for texts in (None, []):
        write_tokenizer_files(
            tmp_path,
            byte_level_bpe(texts, 258, DEEPSEEK_BOS, DEEPSEEK_EOS),
            bos_token=DEEPSEEK_BOS,
            eos_token=DEEPSEEK_EOS,
        )
        tok = Tokenizer.from_dir(tmp_path, bos_token_id=256, eos_token_id=257)
        assert tok.vocab_size == 258
        ids = tok.encode(MIXED, add_bos=False)
        assert len(ids) == len(MIXED.encode()) and max(ids) < 256  # one token per byte
        assert tok.decode(ids) == MIXED
        # a token that is part of a multi-byte character shows its byte, not U+FFFD
        ids = tok.encode("🙂", add_bos=False)
        assert tok.token_bytes(ids) == [b"\xf0", b"\x9f", b"\x99", b"\x82"]
        assert tok.token_labels(ids) == ["⟨f0⟩", "⟨9f⟩", "⟨99⟩", "⟨82⟩"]
    with pytest.raises(ValueError, match="258"):
        byte_level_bpe(None, 257, DEEPSEEK_BOS, DEEPSEEK_EOS)


def test_written_config_matches_the_official_shape(tmp_path):
    write_tokenizer_files(
        tmp_path,
        byte_level_bpe(None, 258, DEEPSEEK_BOS, DEEPSEEK_EOS),
        bos_token=DEEPSEEK_BOS,
        eos_token=DEEPSEEK_EOS,
        chat_template="{{ bos_token }}",
    )
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] is True and config["chat_template"] == "{{ bos_token }}"
    assert config["eos_token"] == {
        "__type": "AddedToken",
        "content": DEEPSEEK_EOS,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }
