"""HTML of the text a query actually read: its chosen blocks and its window, never the whole input.

Each token is a span shaded by its weight (the dense attention the query gives it, on a square-root
scale so that small weights stay visible); the query token is outlined, a highlighted range (a needle)
is underlined. Byte tokens are shown as text; specials and control bytes as short labels. All text is
HTML-escaped. No Streamlit here.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

from nsa_core import tokenizer

from .figures import BRANCH_COLORS, FORCED_COLOR

_STYLE = (
    "<style>.nsa-snip{font-family:ui-monospace,Menlo,monospace;font-size:12.5px;line-height:1.55;"
    "white-space:pre-wrap;word-break:break-all;border:1px solid #e6e6e6;border-radius:6px;padding:6px 8px;"
    "margin:4px 0 8px 0;background:#fcfcfc}.nsa-snip .hd{font-family:system-ui,sans-serif;font-size:12px;"
    "color:#555;margin-bottom:2px}.nsa-q{outline:2px solid #E45756;border-radius:2px}"
    ".nsa-needle{text-decoration:underline 2px #E45756}.nsa-gap{color:#999;font-family:system-ui}</style>"
)


def _token_text(token: int) -> str:
    if 0 <= token < 128 and (token >= 32 or token in (9, 10)):
        return chr(token)
    return f"⟨{tokenizer.token_label(token)}⟩"


def span_html(
    ids: Sequence[int],
    start: int,
    stop: int,
    *,
    query: int | None = None,
    weights: np.ndarray | None = None,
    highlight: tuple[int, int] | None = None,
    title: str = "",
) -> str:
    """One snippet: tokens ids[start:stop], shaded by weights[i] (indexed by absolute position)."""
    return _STYLE + _snippet(ids, start, stop, query=query, weights=weights, highlight=highlight, title=title)


def _snippet(ids, start, stop, *, query, weights, highlight, title, accent: str | None = None) -> str:
    if not 0 <= start <= stop <= len(ids):
        raise ValueError(f"span {start}:{stop} is outside the {len(ids)} tokens")
    top = 0.0
    if weights is not None and stop > start:
        part = np.asarray(weights[start : min(stop, len(weights))], np.float64)
        top = float(np.sqrt(part.max())) if part.size else 0.0
    pieces = []
    for pos in range(start, stop):
        classes = []
        if pos == query:
            classes.append("nsa-q")
        if highlight is not None and highlight[0] <= pos <= highlight[1]:
            classes.append("nsa-needle")
        style = ""
        if weights is not None and top > 0 and pos < len(weights):
            alpha = float(np.sqrt(max(weights[pos], 0.0))) / top
            style = f' style="background:rgba(245,133,24,{alpha * 0.85:.2f})"'
        cls = f' class="{" ".join(classes)}"' if classes else ""
        pieces.append(f'<span{cls}{style} title="token {pos}">{html.escape(_token_text(ids[pos]))}</span>')
    head = f'<div class="hd">{html.escape(title)}</div>' if title else ""
    border = f' style="border-left:4px solid {accent}"' if accent else ""
    return f'<div class="nsa-snip"{border}>{head}{"".join(pieces)}</div>'


def chosen_blocks_html(
    ids: Sequence[int],
    *,
    chosen: Sequence[int],
    forced: Sequence[int],
    slc_block: int,
    query: int,
    weights: np.ndarray | None = None,
    highlight: tuple[int, int] | None = None,
) -> str:
    """The chosen selection blocks in order, each as a snippet titled with its id, span and kind.

    Keys after the query are not part of what it read, so the query's own block is cut at the query.
    """
    forced_set = {int(b) for b in forced}
    parts = []
    for block in sorted(int(b) for b in chosen if b >= 0):
        start, stop = block * slc_block, min((block + 1) * slc_block, query + 1, len(ids))
        if start >= stop:
            continue
        kind = "forced" if block in forced_set else "top-n"
        mass = f" · dense mass {float(np.sum(weights[start:stop])):.1%}" if weights is not None else ""
        color = FORCED_COLOR if kind == "forced" else BRANCH_COLORS["slc"]
        title = f"block {block} · tokens {start}–{stop - 1} · {kind}{mass}"
        parts.append(
            _snippet(ids, start, stop, query=query, weights=weights, highlight=highlight, title=title, accent=color)
        )
    return _STYLE + ("".join(parts) if parts else '<div class="nsa-gap">No block chosen.</div>')
