"""Token text made safe and readable: the one place every figure gets its token labels from.

Figures show labels (`dsv2viz.text`: the characters a token completes, the bytes of a character it
only starts in hex, e.g. ``⟨e6 97⟩``). Plotly renders a subset of HTML in titles, tick labels, cell text
and hover labels, so a raw token such as ``<img src=x onerror=alert(1)>`` would be markup rather than
text. :func:`token_label` escapes it and also makes invisible characters visible
(`dsv2viz.text.visible`), since a byte-level tokenizer produces many tokens that are only spaces or
line breaks:

* a space at the start or end of a token shows as ``·`` (``" the"`` -> ``·the``, ``"  "`` -> ``··``);
  spaces between other characters stay spaces;
* a line feed shows as ``↵``, a tab as ``⇥``, a carriage return as ``␍``, any other C0 control character
  as its Unicode control picture (``\\x00`` -> ``␀``, DEL -> ``␡``), C1 controls and bidirectional
  overrides as their code point (``⟨U+202E⟩``), so none can reorder the text around it;
* the empty token shows as ``∅``.

Escaping is :func:`html.escape` with ``quote=True``, except that the double quote is written ``&#34;``
(plotly.js decodes numeric entities but not ``&quot;``, which it would show literally) and ``$`` as
``&#36;`` (so a token like ``$x$`` is not typeset as LaTeX where MathJax is loaded). Plotly decodes
these entities for display, so the reader sees the token as it is, never markup.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from ..text import visible


def token_label(text: str, max_chars: int | None = None) -> str:
    """`text` with whitespace and controls made visible and HTML escaped, safe for any plotly text field.

    `max_chars` (for small cells) cuts the visible text to that many characters ending in ``…``
    before escaping, so an entity is never cut in half.
    """
    return html.escape(visible(text, max_chars), quote=True).replace("&quot;", "&#34;").replace("$", "&#36;")


def token_labels(texts: Sequence[str], max_chars: int | None = None) -> list[str]:
    """:func:`token_label` of each text."""
    return [token_label(t, max_chars) for t in texts]
