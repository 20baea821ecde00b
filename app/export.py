"""Figure and data exports as bytes (no Streamlit here): PNG/SVG through Kaleido, self-contained HTML, npz."""

from __future__ import annotations

import io

import numpy as np
import plotly.graph_objects as go

IMAGE_FORMATS = ("png", "svg")


def figure_image(fig: go.Figure, fmt: str) -> bytes:
    """PNG or SVG of a figure, rendered by Kaleido through the system's Chrome/Chromium."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {fmt!r}")
    width = fig.layout.width or 1100
    return fig.to_image(format=fmt, width=width, height=fig.layout.height or 450, scale=2 if fmt == "png" else 1)


def figure_html(fig: go.Figure) -> bytes:
    """A standalone HTML page with plotly.js inlined, so it opens without a network."""
    return fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")


def arrays_npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()
