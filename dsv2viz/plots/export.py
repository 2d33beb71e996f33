"""Saving figures: standalone HTML that works offline, and PNG/SVG images through kaleido.

:func:`save_html` embeds plotly.js in the file (about 4.5 MB), so it opens without a network, from an
archive, a laptop on a plane or a sandboxed viewer; it never links a CDN. :func:`save_image` needs the
optional kaleido package and a Chrome/Chromium for it to drive. Both write the file whole or not at all.
"""

from __future__ import annotations

import os
from pathlib import Path

import plotly.graph_objects as go

from ..files import atomic_write

IMAGE_FORMATS = ("png", "svg")
MISSING_KALEIDO = (
    "saving images needs kaleido: pip install kaleido (kaleido also needs a Chrome or Chromium browser "
    "installed; `plotly_get_chrome` fetches one). save_html needs neither and works offline."
)


def save_html(fig: go.Figure, path: str | os.PathLike) -> Path:
    """Write `fig` as a standalone HTML page with plotly.js embedded (no CDN); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False}))


def save_image(fig: go.Figure, path: str | os.PathLike, *, scale: float = 2.0) -> Path:
    """Write `fig` as a .png or .svg (by the suffix) with kaleido; returns the path.

    Raises RuntimeError saying what to install when kaleido or the browser it drives is missing.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"{path}: save_image writes .png or .svg files; use save_html for .html")
    try:
        import kaleido  # noqa: F401  (plotly finds it itself; imported here to fail early and clearly)
    except ImportError:
        raise RuntimeError(MISSING_KALEIDO) from None
    try:
        image = fig.to_image(format=fmt, scale=scale)
    except RuntimeError as e:  # plotly's own: kaleido too old, or no Chrome for it to drive
        raise RuntimeError(f"{MISSING_KALEIDO}\n(plotly said: {str(e).strip()})") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, image)
