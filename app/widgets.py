"""Small Streamlit helpers every page uses: charts with the right options, exports, selection reading."""

from __future__ import annotations

import json
from collections.abc import Callable

import plotly.graph_objects as go
import streamlit as st

from . import export

# The modebar's camera button saves SVG (vector, for papers); the export menu offers PNG and HTML too.
CHART_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "svg", "scale": 1}}


def chart(fig: go.Figure, *, key: str, name: str, selectable: bool = False, box: bool = False):
    """Show a figure with its export menu; returns the selection event (a dict) when selectable."""
    # theme=None: the figure's own colours, identical on screen and in every export.
    kwargs = {"key": key, "theme": None, "config": CHART_CONFIG, "width": "stretch"}
    if selectable:
        event = st.plotly_chart(
            fig, on_select="rerun", selection_mode=("points", "box") if box else ("points",), **kwargs
        )
    else:
        event = None
        st.plotly_chart(fig, **kwargs)
    export_menu(fig, name=name, key=key)
    return event


def export_menu(fig: go.Figure, *, name: str, key: str) -> None:
    """PNG, SVG and self-contained HTML downloads; images render only when asked for."""
    with st.popover("Export", icon=":material/download:", type="tertiary"):
        st.download_button(
            "PNG",
            data=_deferred(export.figure_image, fig, "png"),
            file_name=f"{name}.png",
            mime="image/png",
            key=f"{key}-png",
            on_click="ignore",
        )
        st.download_button(
            "SVG",
            data=_deferred(export.figure_image, fig, "svg"),
            file_name=f"{name}.svg",
            mime="image/svg+xml",
            key=f"{key}-svg",
            on_click="ignore",
        )
        st.download_button(
            "HTML (works offline)",
            data=_deferred(export.figure_html, fig),
            file_name=f"{name}.html",
            mime="text/html",
            key=f"{key}-html",
            on_click="ignore",
        )


def _deferred(fn: Callable, *args) -> Callable[[], bytes]:
    return lambda: fn(*args)


def download_json(label: str, payload: dict, *, file_name: str, key: str) -> None:
    st.download_button(
        label,
        data=json.dumps(payload, indent=1).encode(),
        file_name=file_name,
        mime="application/json",
        key=key,
        on_click="ignore",
        icon=":material/data_object:",
    )


def selected_points(event) -> list[dict]:
    """Points of a chart selection. Read with item access: AppTest injects plain dicts, not attribute objects."""
    if not event:
        return []
    return list(event["selection"]["points"] or [])


def selected_box(event) -> tuple[list[float], list[float]] | None:
    """(x range, y range) of a box selection, or None."""
    if not event:
        return None
    boxes = event["selection"].get("box") or []
    if not boxes:
        return None
    return list(boxes[0]["x"]), list(boxes[0]["y"])
