"""Exact text (dsv2viz.text): streamed pieces, labels and full texts from token bytes, and text safe for a terminal.

The rules are checked against references written here independently of the code (CPython's whole-text
decoder with an error handler that records each invalid sequence, and the rule read literally), on
Chinese, Japanese, emoji sequences, combining marks, accented and mixed text, tabs and CRLF, and invalid
bytes, split every way a tokenizer could split them.
"""

from __future__ import annotations

import codecs
import html
import itertools
import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field

import pandas as pd
import pytest
import tokenizers

import dsv2viz
from dsv2viz import text as T
from dsv2viz.generation import Generation, Sampling
from dsv2viz.html_report import report
from dsv2viz.plots._text import token_label
from dsv2viz.tokenizer import BYTE_OF_CHAR, DEEPSEEK_BOS, DEEPSEEK_EOS, Tokenizer, byte_level_bpe, id_labels
from dsv2viz.traces import Recording, Trace

TEXTS = {
    "chinese": "深度求索：混合专家模型，多头潜在注意力。",
    "japanese": "日本語のテキスト、カタカナとひらがな。",
    "emoji": "👨\u200d👩\u200d👧\u200d👦 🇨🇳🇯🇵 👍🏽 🙂",  # a ZWJ family, two flags, a skin tone
    "combining": "e\u0301 n\u0303 a\u0308\u0304 Z\u0351\u0323",  # base letters with combining marks
    "accented": "naïve café crème brûlée Ångström",
    "mixed": "DeepSeek-V2 是一个 MoE 模型 — café 🙂 ok",
    "whitespace": "a\tb\r\nc\n\n\td ",
}
INVALID = [
    b"\x80",  # a lone continuation byte
    b"\xbf\x80A",
    b"\xc0\xaf",  # overlong
    b"\xe0\x80\x80",  # overlong
    b"\xed\xa0\x80",  # a surrogate
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xf5\xff\xfe",
    b"\xe6\x97",  # truncated at the end
    b"\xf0\x9f\x98",
    b"\xe6\x97A\xe6",
    b"a\xe6\x97\xa5\xe6\xff\xf0\x9f\x98\x80\xc3",
    "日".encode() + b"\xef\xbf\xbd" + b"\xed",  # a real U+FFFD beside invalid bytes
]
CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]


# ----- references ---------------------------------------------------------------------------------
_spans: list[tuple[int, int]] = []


def _record(e: UnicodeDecodeError) -> tuple[str, int]:
    _spans.append((e.start, e.end))
    return "\ufffd", e.end


codecs.register_error("test_text.record", _record)


def units(data: bytes) -> list[tuple[int, int, str | None]]:
    """(start, end, char or None) of the whole text, from CPython's decoder reporting each invalid sequence."""
    _spans.clear()
    decoded = data.decode("utf-8", "test_text.record")
    out, i, bad = [], 0, list(_spans)
    for char in decoded:
        if bad and bad[0][0] == i:
            start, end = bad.pop(0)
            out.append((start, end, None))
        else:
            end = i + len(char.encode())
            out.append((i, end, char))
        i = out[-1][1]
    assert i == len(data)
    return out


def offsets_of(chunks: list[bytes]) -> list[int]:
    return [0, *itertools.accumulate(map(len, chunks))]


def token_at(offsets: list[int], byte: int) -> int:
    """The token holding byte `byte` (empty tokens hold none)."""
    return next(t for t in range(len(offsets) - 1) if offsets[t] <= byte < offsets[t + 1])


def reference_labels(chunks: list[bytes]) -> list[str]:
    """The label rule read literally: a character goes to the token of its last byte, every other byte is hex where it is."""
    data, offsets = b"".join(chunks), offsets_of(chunks)
    parts: list[list[str | bytes]] = [[] for _ in chunks]
    for start, end, char in units(data):
        last = token_at(offsets, end - 1)
        for t in range(token_at(offsets, start), last + 1):
            if char is not None and t == last:
                parts[t].append(char)
            else:
                parts[t].append(data[max(start, offsets[t]) : min(end, offsets[t + 1])])
    out = []
    for p in parts:
        groups = itertools.groupby(p, key=type)
        out.append("".join("⟨" + b"".join(g).hex(" ") + "⟩" if k is bytes else "".join(g) for k, g in groups))
    return out


def reference_pieces(chunks: list[bytes]) -> list[str]:
    """What Python's own incremental decoder emits for each token, the final flush on the last."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = [decoder.decode(c) for c in chunks]
    if out:
        out[-1] += decoder.decode(b"", final=True)
    return out


def splits(data: bytes, seed: int = 0) -> list[list[bytes]]:
    """The ways the tests cut a byte string into tokens: whole, every byte alone, and random runs of 1-5 bytes."""
    rng = random.Random(seed)
    out = [[data], [bytes([b]) for b in data]]
    for _ in range(6):
        cut, i = [], 0
        while i < len(data):
            n = rng.randint(1, 5)
            cut.append(data[i : i + n])
            i += n
        out.append(cut)
    return out


def check(chunks: list[bytes]) -> None:
    """Every rule of dsv2viz.text on one tokenization."""
    data = b"".join(chunks)
    whole = data.decode("utf-8", "replace")
    got = T.pieces(chunks)
    assert "".join(got) == whole == T.decode(chunks) == T.decode(data)
    assert got == reference_pieces(chunks)  # emitted at the same token as CPython's incremental decoder
    assert T.labels(chunks) == reference_labels(chunks)
    assert [T.label(c) for c in chunks] == [reference_labels([c])[0] for c in chunks]


# ----- the pure rules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_valid_text_streams_and_labels_exactly(name):
    data = TEXTS[name].encode()
    for chunks in splits(data):
        check(chunks)
        assert "\ufffd" not in "".join(T.pieces(chunks) + T.labels(chunks))
        # each character is in exactly one label, at the token of its last byte; the rest is hex
        assert "".join(re.sub("⟨[0-9a-f ]+⟩", "", label) for label in T.labels(chunks)) == TEXTS[name]


@pytest.mark.parametrize("data", INVALID, ids=[d.hex() for d in INVALID])
def test_invalid_bytes_stream_as_whole_decoding_makes_them(data):
    for chunks in splits(data):
        check(chunks)
        assert all("\ufffd" not in label for label in T.labels(chunks)) or "\ufffd" in data.decode("utf-8", "ignore")


def test_every_short_sequence_of_boundary_bytes_every_way_split():
    """All 1-3 byte strings over the bytes where UTF-8's rules change, cut at every position."""
    alphabet = [
        0x00,
        0x41,
        0x7F,
        0x80,
        0x8F,
        0x90,
        0x9F,
        0xA0,
        0xBF,
        0xC0,
        0xC2,
        0xDF,
        0xE0,
        0xED,
        0xEF,
        0xF0,
        0xF4,
        0xF5,
    ]
    for n in (1, 2, 3):
        for combo in itertools.product(alphabet, repeat=n):
            data = bytes(combo)
            for cuts in itertools.product([False, True], repeat=n - 1):
                chunks, start = [], 0
                for i, cut in enumerate(cuts, 1):
                    if cut:
                        chunks.append(data[start:i])
                        start = i
                chunks.append(data[start:])
                assert "".join(T.pieces(chunks)) == data.decode("utf-8", "replace")
                assert T.labels(chunks) == reference_labels(chunks)


def test_documented_examples():
    day = "日".encode()  # e6 97 a5
    assert T.labels([day[:2], day[2:]]) == ["⟨e6 97⟩", "日"]
    assert T.pieces([day[:2], day[2:]]) == ["", "日"]
    assert T.labels([day[:2], day[2:] + day[:1], day[1:]]) == ["⟨e6 97⟩", "日⟨e6⟩", "日"]
    assert T.labels([b"\xe6", b"\x97A"]) == ["⟨e6⟩", "⟨97⟩A"]  # an invalid pair shown where its bytes are
    assert T.pieces([b"\xe6", b"\x97A"]) == ["", "\ufffdA"]  # its U+FFFD streamed once it is known invalid
    assert T.label(b"\xe6\x97") == "⟨e6 97⟩" and T.label(day) == "日" and T.label(b"\xffA") == "⟨ff⟩A"
    assert T.labels([]) == T.pieces([]) == [] and T.labels([b""]) == [""]
    stream = T.TextStream()
    assert stream.push(b"\xf0\x9f").text == "" and stream.pending == b"\xf0\x9f"
    assert stream.flush() == "\ufffd" and stream.pending == b""  # one U+FFFD for the truncated emoji


def test_controls_are_made_visible_for_the_terminal():
    every = "".join(map(chr, CONTROLS))
    shown = T.visible_controls(every)
    assert not set(shown) & set(every)
    kept = T.visible_controls("a\nb\tc\r\x1b[2J\x07\u202eevil\u2066", keep_newlines=True)
    assert kept == "a\nb\tc␍␛[2J␇⟨U+202E⟩evil⟨U+2066⟩"
    assert T.visible_controls("\n\t\x9b\x7f") == "↵⇥⟨U+009B⟩␡"
    for text in TEXTS.values():  # ordinary text of any script passes unchanged, its newlines kept
        assert T.visible_controls(text.replace("\r", ""), keep_newlines=True) == text.replace("\r", "")
    assert T.visible(" \u202eab ") == "·⟨U+202E⟩ab·"
    assert token_label("\u202e<b>") == "⟨U+202E⟩&lt;b&gt;"  # figures show them too, never reorder text


# ----- tokenizers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    return dsv2viz.load(progress=False)


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory) -> Tokenizer:
    """An untrained byte-level tokenizer (every byte a token) with two added tokens of table characters."""
    raw = byte_level_bpe(None, 258, DEEPSEEK_BOS, DEEPSEEK_EOS)
    raw.add_tokens(["ĠxĠ", "naïve<"])  # decoded through the byte table by tokenizers, as by us
    return Tokenizer(raw, bos_token=DEEPSEEK_BOS, eos_token=DEEPSEEK_EOS)


def test_the_byte_table_is_the_byte_level_alphabet():
    assert set(BYTE_OF_CHAR) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert sorted(BYTE_OF_CHAR.values()) == list(range(256)) and BYTE_OF_CHAR["Ġ"] == 32


def test_token_bytes_agree_with_tokenizers_decode(demo, byte_tok):
    rng = random.Random(0)
    for tok in (demo.tokenizer, byte_tok):
        n = tok.vocab_size
        for i in range(n):  # every token alone
            assert T.decode(tok.token_bytes([i])) == tok.decode([i]), i
        for _ in range(400):  # random sequences: split and invalid UTF-8 everywhere
            ids = [rng.randrange(n) for _ in range(rng.randint(1, 12))]
            assert T.decode(tok.token_bytes(ids)) == tok.decode(ids), ids
        for text in TEXTS.values():
            ids = tok.encode(text)
            assert b"".join(tok.token_bytes(ids)) == (DEEPSEEK_BOS + text).encode()
            assert T.decode(tok.token_bytes(ids)) == tok.decode(ids) == DEEPSEEK_BOS + text
    assert byte_tok.token_bytes([byte_tok.bos_token_id, 258, 259]) == [DEEPSEEK_BOS.encode(), b" x ", b"na\xefve<"]
    assert byte_tok.token_bytes([10**6]) == [b""] and byte_tok.decode([10**6]) == ""  # unknown ids have no bytes
    single = sorted(b for i in range(256) for b in byte_tok.token_bytes([i]))
    assert single == [bytes([b]) for b in range(256)]  # the 256 byte tokens are the 256 bytes


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_labels_of_real_tokenizations(demo, byte_tok, name):
    for tok in (demo.tokenizer, byte_tok):
        ids = tok.encode(TEXTS[name], add_bos=False)
        chunks = tok.token_bytes(ids)
        check(chunks)
        labels = T.labels(chunks)
        assert "\ufffd" not in "".join(labels + tok.token_labels(ids) + T.pieces(chunks))
        split = [i for i, c in enumerate(chunks) if c.decode("utf-8", "ignore").encode() != c]
        if any(ord(ch) > 0x7F for ch in TEXTS[name]):
            assert split  # the demo tokenizer splits these characters into byte tokens too
        for i in split:  # a token holding part of a character shows those bytes
            assert "⟨" in tok.token_labels([ids[i]])[0]
    assert id_labels(None, [5, 7]) == ["<5>", "<7>"]
    assert id_labels(demo.tokenizer, [5]) == demo.tokenizer.token_labels([5])


# ----- generation, trace, report ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Forced(Sampling):
    """Sampling that emits given tokens in order, to stream a text whose characters span tokens."""

    forced: list[int] = field(default_factory=list)

    def choose(self, logits, generator) -> int:
        return self.forced.pop(0)


def forced_generation(model, prompt, ids: list[int]) -> Generation:
    return Generation(model, prompt, Forced(max_new_tokens=len(ids), forced=list(ids)), Recording())


def test_a_chinese_prompt_streams_exact_text(demo):
    tok = demo.tokenizer
    prompt = "# 计算斐波那契数列 🙂\n"
    generation = demo.generate(prompt, 8, temperature=1.0, seed=3)
    streamed = "".join(step.text for step in generation)
    trace = generation.trace
    assert streamed == tok.decode(trace.generated_ids) == trace.generated_text
    assert generation.prompt_text == trace.prompt_text == DEEPSEEK_BOS + prompt
    assert generation.text == trace.text == tok.decode(trace.token_ids.tolist())


def test_split_characters_stream_when_their_last_byte_arrives(demo):
    tok = demo.tokenizer
    text = "专家🙂é\r\n👨\u200d👩 e\u0301"  # Chinese, a ZWJ sequence, accents precomposed and combining, CRLF
    ids = tok.encode(text, add_bos=False)
    generation = forced_generation(demo, "日本語：", ids)
    steps = list(generation)
    assert [s.token_id for s in steps] == ids
    assert [s.text for s in steps] == reference_pieces(tok.token_bytes(ids))
    assert "".join(s.text for s in steps) == tok.decode(ids) == text
    assert sum(s.text == "" for s in steps) >= 10  # characters really were split across steps
    trace = generation.trace
    assert trace.generated_text == text and trace.prompt_text == DEEPSEEK_BOS + "日本語："
    assert trace.token_texts == generation.texts == T.labels(tok.token_bytes(trace.token_ids.tolist()))
    assert trace.id_labels == tok.token_labels(trace.token_ids.tolist())
    df = trace.routing_df()
    assert df["token"].tolist() == [trace.token_texts[p] for p in df["position"]]


def test_a_character_across_the_prompt_boundary_and_at_the_end(demo):
    tok = demo.tokenizer
    family = tok.encode("👨\u200d👩", add_bos=False)
    day = tok.encode("日", add_bos=False)
    assert len(day) == 3 and "👩".encode().endswith(tok.token_bytes(family[-1:])[0]) and len(family) > 1
    # the prompt (ids) ends inside 日; the first step finishes it; the last step leaves the family's woman unfinished
    generation = forced_generation(demo, [tok.bos_token_id, *day[:2]], [day[2], *family[:-1]])
    steps = list(generation)
    assert generation.prompt_text == DEEPSEEK_BOS and steps[0].text == "日"
    assert steps[-1].text.endswith("\ufffd")  # flushed with the last step
    whole = tok.decode(generation.token_ids)
    assert generation.prompt_text + "".join(s.text for s in steps) == whole == generation.trace.text
    assert generation.trace.token_texts[1:3] == ["⟨e6⟩", "⟨97⟩"] and generation.trace.token_texts[3] == "日"


def test_saved_traces_keep_exact_text_without_a_tokenizer(demo, tmp_path):
    trace = forced_generation(demo, "🙂 ", demo.tokenizer.encode("求索", add_bos=False)).run()
    again = Trace.load(trace.save(tmp_path / "t"))
    assert again.text == trace.text == DEEPSEEK_BOS + "🙂 求索"
    assert again.token_chunks == demo.tokenizer.token_bytes(trace.token_ids.tolist())
    assert again.token_texts == trace.token_texts and again.generated_text == "求索"
    # a trace without bytes (no tokenizer, or saved before they were recorded) falls back to its token texts
    old = Trace(trace.config, trace.prompt_len, ["a", "b⟨e6⟩"] + trace.token_texts[2:], {"token_ids": trace.token_ids})
    assert old.token_chunks is None and old.text == "".join(old.token_texts) and old.id_labels == old.token_texts


def test_a_model_without_tokenizer_shows_ids(tiny_model):
    trace = tiny_model().generate([5, 6, 7], 3).run()
    assert "token_bytes" not in trace.tensors and trace.token_texts[:3] == ["<5>", "<6>", "<7>"]
    assert trace.text == "".join(trace.token_texts) and trace.prompt_text == "<5><6><7>"


def test_the_report_shows_the_prompt_exactly(demo, tmp_path):
    prompt = "混合专家 <b>&amp;</b> 👨\u200d👩\u200d👧 é\n"
    trace = demo.generate(prompt, 4).run()
    page = report(trace, tmp_path / "r.html").read_text()
    shown = f'{html.escape(DEEPSEEK_BOS + prompt)}<span class="generated">{html.escape(trace.generated_text)}</span>'
    assert f'<div class="report-text">{shown}</div>' in page


def test_the_logit_lens_marks_the_next_token_by_id(demo):
    """The byte that completes 日 is labelled 日 in the sequence but ⟨a5⟩ as a candidate: the same token."""
    from dsv2viz import plots

    tok = demo.tokenizer
    ids = tok.encode("日!")  # BOS, e6, 97, a5, !
    guesses = [ids[1], ids[2], ids[3], ids[1]]  # right at positions 0-2, wrong at 3
    frame = pd.DataFrame(
        {
            "layer": 0,
            "position": range(4),
            "rank": 0,
            "token_id": guesses,
            "token": tok.token_labels(guesses),
            "prob": 0.5,
        }
    )
    labels = T.labels(tok.token_bytes(ids))
    assert labels[3] == "日" and tok.token_labels([ids[3]]) == ["⟨a5⟩"]
    cells = plots.logit_lens(frame, labels, ids).data[0].text[0]
    assert list(cells) == ["<b>⟨e6⟩</b>", "<b>⟨97⟩</b>", "<b>⟨a5⟩</b>", "⟨e6⟩"]


def test_corpus_token_table_labels_ids_alone(demo, tmp_path):
    from dsv2viz import analysis
    from dsv2viz.corpus import collect

    docs = [TEXTS["chinese"], TEXTS["mixed"]]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    corpus = collect([path], tmp_path / "out", model=demo, progress=False)
    table = corpus.stats.token_experts
    assert table["token"].tolist() == demo.tokenizer.token_labels(table["token_id"].tolist())
    assert any("⟨" in t for t in table["token"]) and not any("\ufffd" in t for t in table["token"])
    traces = [demo.generate(t, 0).run() for t in docs]
    for layer in demo.config.moe_layers:  # traces group tokens by the same labels as the corpus
        a, b = analysis.top_tokens_per_expert(corpus, layer), analysis.top_tokens_per_expert(traces, layer)
        pd.testing.assert_frame_equal(a, b)


# ----- the terminal ---------------------------------------------------------------------------------
RAW = [b"\x1b", b"\x07", "\u202e".encode(), "\u2066".encode(), "\x9b".encode(), b"\x08", b"\r"]


def test_generate_prints_no_raw_control_character():
    prompt = "title\x1b]0;pwned\x07 clear\x1b[2J\x1bc rtl\u202eevil\u202c iso\u2066x\u2069 bs\x08\r\nline two\n"
    done = subprocess.run(
        [sys.executable, "-m", "dsv2viz", "generate", "--prompt", prompt, "--max-new-tokens", "3", "--quiet"],
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert not [r for r in RAW if r in out]
    shown = "title␛]0;pwned␇ clear␛[2J␛c rtl⟨U+202E⟩evil⟨U+202C⟩ iso⟨U+2066⟩x⟨U+2069⟩ bs␈␍\nline two\n"
    assert out.decode().startswith(DEEPSEEK_BOS + shown)  # newlines still newlines


def test_errors_and_collect_reports_print_no_raw_control_character(demo, tmp_path, capsys):
    from dsv2viz.cli import main
    from dsv2viz.corpus import collect

    evil = "x\x1b]0;pwned\x07\u202e"
    assert main(["report", str(tmp_path / evil), "-o", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert "x␛]0;pwned␇⟨U+202E⟩" in err and not [r for r in RAW if r in err.encode()]
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": evil, "text": "  "}) + "\n" + json.dumps({"text": "ok"}) + "\n")
    collect([path], tmp_path / "out", model=demo, progress=False)
    err = capsys.readouterr().err
    assert "skipped x␛]0;pwned␇⟨U+202E⟩: empty text" in err and not [r for r in RAW if r in err.encode()]


def test_demo_shows_generated_control_bytes_visibly(tmp_path, capsys):
    """The random model's byte tokens include control bytes; each row shows its token's label, controls visible."""
    from dsv2viz.cli import main

    assert main(["demo", "--out", str(tmp_path / "m"), "--tokens", "40", "--prompt", "x\x1b[2J\u202e"]) == 0
    out = capsys.readouterr().out
    assert not [r for r in RAW if r in out.encode()] and "x␛[2J⟨U+202E⟩" in out
    tokens = [line.split()[1] for line in out.splitlines() if re.match(r"\s+\d+ ", line)]
    assert len(tokens) == 40
    assert any(len(t) == 1 and 0x2400 <= ord(t) <= 0x2421 for t in tokens)  # a control byte, as its picture
    assert any(re.fullmatch("⟨[0-9a-f]{2}⟩", t) for t in tokens)  # a byte of no complete character
