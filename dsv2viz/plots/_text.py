"""Token text made safe and readable: the one place every figure gets its token labels from.

Plotly renders a subset of HTML in titles, tick labels, cell text and hover labels, so a raw token such
as ``<img src=x onerror=alert(1)>`` would be markup rather than text. :func:`token_label` escapes it and
also makes invisible characters visible, since a byte-level tokenizer produces many tokens that are
only spaces or line breaks:

* a space at the start or end of a token shows as ``·`` (``" the"`` -> ``·the``, ``"  "`` -> ``··``);
  spaces between other characters stay spaces;
* a line feed shows as ``↵``, a tab as ``⇥``, a carriage return as ``␍``, any other control character
  as its Unicode control picture (``\\x00`` -> ``␀``, DEL -> ``␡``);
* the empty token shows as ``∅``.

Escaping is :func:`html.escape` with ``quote=True``, except that the double quote is written ``&#34;``
(plotly.js decodes numeric entities but not ``&quot;``, which it would show literally) and ``$`` as
``&#36;`` (so a token like ``$x$`` is not typeset as LaTeX where MathJax is loaded). Plotly decodes
these entities for display, so the reader sees the token as it is, never markup.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍", "\x7f": "␡"}
_VISIBLE.update({chr(c): chr(0x2400 + c) for c in range(0x20) if chr(c) not in _VISIBLE})


def token_label(text: str, max_chars: int | None = None) -> str:
    """`text` with whitespace made visible and HTML escaped, safe for any plotly text field.

    `max_chars` (for small cells) cuts the visible text to that many characters ending in ``…``
    before escaping, so an entity is never cut in half.
    """
    if not text:
        return "∅"
    body = text.strip(" ")
    if body:
        start = text.index(body)
        visible = "·" * start + body + "·" * (len(text) - start - len(body))
    else:
        visible = "·" * len(text)
    visible = "".join(_VISIBLE.get(ch, ch) for ch in visible)
    if max_chars is not None and len(visible) > max_chars:
        visible = visible[: max(1, max_chars - 1)] + "…"
    return html.escape(visible, quote=True).replace("&quot;", "&#34;").replace("$", "&#36;")


def token_labels(texts: Sequence[str], max_chars: int | None = None) -> list[str]:
    """:func:`token_label` of each text."""
    return [token_label(t, max_chars) for t in texts]
