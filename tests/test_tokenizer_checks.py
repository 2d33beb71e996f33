"""Tokenizer folders checked before use: ids that fit the embedding, typed config values, bounded JSON, and the
longest token in bytes that lets collect skip an over-long document without tokenizing it."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import tokenizers
from tokenizers import normalizers, pre_tokenizers

from dsv2viz.tokenizer import (
    DEEPSEEK_BOS,
    DEEPSEEK_EOS,
    Tokenizer,
    TokenizerError,
    byte_level_bpe,
    write_tokenizer_files,
)

CORPUS = ["def fibonacci(n):\n    return n", "    " * 12 + "indented", "你好，世界 🙂 naïve café"] * 30


def folder_with(tmp_path: Path, tok: tokenizers.Tokenizer | None = None, **config_changes) -> Path:
    write_tokenizer_files(tmp_path, tok or byte_level_bpe(CORPUS, 400), bos_token=DEEPSEEK_BOS, eos_token=DEEPSEEK_EOS)
    if config_changes:
        path = tmp_path / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return tmp_path


def test_every_id_the_tokenizer_can_produce_must_fit_the_embedding(tmp_path):
    folder = folder_with(tmp_path)
    highest = max(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab().values())
    assert Tokenizer.from_dir(folder, vocab_size=highest + 1).vocab_size == highest + 1
    with pytest.raises(TokenizerError, match=f"ids up to {highest}, but config.json's vocab_size is {highest}"):
        Tokenizer.from_dir(folder, vocab_size=highest)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"add_bos_token": "yes"}, "add_bos_token must be true or false"),
        ({"chat_template": ["{{ bos_token }}"]}, "chat_template must be a string"),
        ({"bos_token": 100000}, "bos_token must be a string or an AddedToken object with a 'content' string"),
        (
            {"eos_token": {"__type": "AddedToken", "content": 7}},
            "eos_token must be a string or an AddedToken object with a 'content' string",
        ),
    ],
)
def test_config_values_of_the_wrong_type_are_one_line_errors(tmp_path, change, message):
    folder = folder_with(tmp_path, **change)
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(folder)
    assert str(err.value) == f"{folder / 'tokenizer_config.json'}: {message}"


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
@pytest.mark.parametrize(
    "content, message",
    [
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b"{", "not valid JSON"),
    ],
)
def test_unreadable_json_is_one_line_error(tmp_path, name, content, message):
    folder = folder_with(tmp_path)
    (folder / name).write_bytes(content)
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(folder)
    assert str(err.value).startswith(f"{folder / name}: {message}") and "\n" not in str(err.value)


def test_longest_token_of_an_untrained_byte_level_tokenizer_is_its_bos():
    tok = Tokenizer(byte_level_bpe(None, 258), bos_token=DEEPSEEK_BOS, eos_token=DEEPSEEK_EOS)
    assert tok.max_token_bytes == len(DEEPSEEK_BOS.encode()) == 29  # byte tokens are 1 byte; BOS is 29


def test_no_text_has_fewer_tokens_than_its_bytes_over_the_longest_token():
    tok = Tokenizer(byte_level_bpe(CORPUS, 400), bos_token=DEEPSEEK_BOS, eos_token=DEEPSEEK_EOS)
    longest = tok.max_token_bytes
    pieces = ["    ", "\n", "def ", "fibonacci", "你好", "🙂", "é", "return n", DEEPSEEK_BOS, " ", "x"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 60)))
        assert len(tok.encode(text, add_bos=False)) >= math.ceil(len(text.encode()) / longest), text
    # exact, not just safe: the longest token's own text is that many bytes, and one token
    texts = [tok.decode([i]) for i in range(tok.vocab_size)]
    text = max(texts, key=lambda t: len(t.encode()))
    assert len(text.encode()) == longest and len(tok.encode(text, add_bos=False)) == 1


@pytest.mark.parametrize(
    "change",
    [
        lambda t: setattr(t, "normalizer", normalizers.NFKC()),  # 'ｆ' (3 bytes) becomes 'f' (1)
        lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Whitespace()),  # spaces are dropped
        lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Split(" ", "removed")),
    ],
    ids=["nfkc", "whitespace", "split-removed"],
)
def test_no_byte_bound_for_tokenizers_that_drop_text(change):
    raw = byte_level_bpe(CORPUS, 400)
    change(raw)
    assert Tokenizer(raw, bos_token=DEEPSEEK_BOS, eos_token=DEEPSEEK_EOS).max_token_bytes is None


def test_why_dropping_text_voids_the_bound():
    raw = byte_level_bpe(CORPUS, 400)
    longest = Tokenizer(raw, bos_token=DEEPSEEK_BOS, eos_token=DEEPSEEK_EOS).max_token_bytes
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    text = " " * 1000 + "x"  # 1,001 bytes: at least 35 tokens if every byte reached the model
    assert len(raw.encode(text, add_special_tokens=False).ids) == 1 < math.ceil(len(text) / longest)
