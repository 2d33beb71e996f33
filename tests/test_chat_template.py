"""Chat templates are checkpoint code: rendered like Jinja's sandbox would, but within limits on size and work."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dsv2viz.chat_template import render_chat_template
from dsv2viz.tokenizer import (
    DEEPSEEK_BOS,
    DEEPSEEK_EOS,
    Tokenizer,
    TokenizerError,
    byte_level_bpe,
)

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def tokenizer(template: str | None = None) -> Tokenizer:
    return Tokenizer(byte_level_bpe(None, 258), bos_token=DEEPSEEK_BOS, eos_token=DEEPSEEK_EOS, chat_template=template)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ 'a' * 10**9 }}", "a repetition (*) would hold 1,000,000,000 characters"),
        ("{{ ([0] * 10**8)|length }}", "a repetition (*) would hold 100,000,000"),
        ("{{ 3 ** (10**9) }}", "a power (**) would have over 65,536 bits"),
        (
            "{% set ns = namespace(n=3) %}{% for i in range(99) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
            "a product would have over 65,536 bits",
        ),
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "steps"),
        ("{% for i in range(10**10) %}{% endfor %}", "Range too big"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
        ("{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}", "steps"),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "a concatenation (~) would hold 8,388,608",
        ),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
            "a concatenation (+) would hold 8,388,608",
        ),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s %}{{ ns.s }}{{ ns.s }}{% endset %}"
            "{% endfor %}",
            "a concatenation",
        ),
        ("{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}", "the rendered text would hold"),
        ("{{ ('a' * 99999)|replace('a', 'b' * 99999) }}", "the replace filter would hold 9,999,800,001"),
        ("{{ ('a' * 99999).replace('a', 'b' * 99999) }}", "str.replace would hold 9,999,800,001"),
        ("{{ 'a'.ljust(10**9) }}", "str.ljust would hold 1,000,000,000"),
        ("{{ '%999999999s' % 'a' }}", "a % format would hold"),
        ("{{ '%*d' % (999999999, 1) }}", "a % format would hold"),
        ("{{ '{:>999999999}'.format('a') }}", "str.format would hold"),
        ("{{ '{:>{w}}'.format('a', w=999999999) }}", "str.format would hold"),
        ("{{ '%999999999s'|format('a') }}", "the format filter would hold"),
        (  # the digits of 0..998 (2,887) and 998 separators of 99,999
            "{{ ('x' * 99999).join(range(999)|map('string')|list) }}",
            "str.join would hold 99,801,889 characters",
        ),
        (  # the digits of 0..99998 (488,885) and 99,998 separators of 99,999
            "{{ range(99999)|join('x' * 99999) }}",
            "the join filter would hold 10,000,188,887 characters",
        ),
        ("{{ ('a\n' * 99999)|indent(9999) }}", "the indent filter would hold"),
        ("{{ 'a'|center(10**9) }}", "the center filter was given 1,000,000,000"),
        ("{{ ([1]|batch(10**9, 'x')|list)|length }}", "the batch filter was given 1,000,000,000"),
        ("{{ (range(9)|slice(4000000)|list)|length }}", "steps"),  # each generated item is a step
        ("{{ messages|tojson(indent=10**6) }}", "the tojson filter would hold"),
        ("{{ ('x' * 99999)|wordwrap(1, wrapstring='y' * 9999) }}", "the wordwrap filter would hold"),
        ("{# " + "x" * 300_000 + " #}", "the template has 300,006 characters"),  # compiling costs per character
    ],
)
def test_hostile_templates_fail_fast_in_bounded_memory(template, message):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(TokenizerError) as err:
            tokenizer(template).apply_chat_template(CHAT, max_steps=5_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert time.perf_counter() - start < 5
    assert peak < 48 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_limits_are_exact():
    render = render_chat_template
    assert render("{{ 'x' * 100 }}", {}, max_chars=100) == "x" * 100
    with pytest.raises(Exception, match="would hold 101 characters, over the limit of 100"):
        render("{{ 'x' * 101 }}", {}, max_chars=100)
    assert render("{% for i in range(10) %}{{ 'x' * 10 }}{% endfor %}", {}, max_chars=100) == "x" * 100
    with pytest.raises(Exception, match="the rendered text would hold 101"):
        render("{% for i in range(10) %}{{ 'x' * 10 }}{% endfor %}.", {}, max_chars=100)
    # a step is one loop iteration or one call (here: the call to range, then 999 iterations)
    assert render("{% for i in range(999) %}{% endfor %}done", {}, max_steps=1000) == "done"
    with pytest.raises(Exception, match="ran past 1,000 steps"):
        render("{% for i in range(1000) %}{% endfor %}done", {}, max_steps=1000)
    start = time.perf_counter()
    with pytest.raises(Exception, match=r"ran past 0\.2 seconds"):
        loops = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
        render(loops, {}, max_seconds=0.2, max_steps=10**12)
    assert time.perf_counter() - start < 1.5


def test_a_long_conversation_renders_exactly_within_the_default_limits():
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"message {i} 你好 🙂"} for i in range(2000)]
    expected = DEEPSEEK_BOS + "".join(
        f"User: {m['content']}\n\n" if m["role"] == "user" else f"Assistant: {m['content']}{DEEPSEEK_EOS}"
        for m in messages
    )
    assert tokenizer().apply_chat_template(messages, add_generation_prompt=False) == expected


BENIGN = """{% macro turn(m) %}[{{ m.role|upper }}] {{ m.content|replace('o', '0') }}{% endmacro %}
{% set ns = namespace(n=0, text='') %}{% for m in messages %}{% set ns.n = ns.n + loop.index * 2 %}
{{ loop.index }}/{{ messages|length }} {{ turn(m) }} {{ '-' * 3 ~ ('%03d' % ns.n) ~ '{:>6}'.format(m.role) }}
{{ m.content.split(' ')|join(', ') }}|{{ m|tojson }}|{{ m.content|center(12) }}|{{ m.content|indent(2) }}
{% set ns.text = ns.text + m.content %}{% endfor %}{{ ns.text|wordwrap(5) }} {{ (messages * 2)|length }}
{{ ([1, 2] + [3])|sum }} {{ 2 ** 10 }} {{ ', '.join(['a', 'b']) }} {{ range(3)|map('string')|join }}"""


def test_benign_templates_render_as_jinjas_sandbox_does():
    variables = {"messages": CHAT + [{"role": "user", "content": "one two\nthree four"}]}
    reference = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(BENIGN)
    assert render_chat_template(BENIGN, variables) == reference.render(**variables)
