"""Plotly figures of what NSA did: pure functions from numpy arrays to `go.Figure`, no Streamlit here.

Conventions every builder follows (Streamlit 1.67 renders with its bundled plotly.js 4.2):
- Attention maps put query position on y, running downwards (row 0 at the top), key position on x;
  axes are in token positions, so a click or a box selection comes back in tokens.
- Cells nobody computed (the causal upper triangle, rows outside a zoom) are NaN and render as
  background, never as a zero weight.
- A heatmap cell cannot be clicked in Streamlit (plotly.js heatmaps emit no selection events), so each
  clickable map carries a transparent scatter overlay with one marker per cell; the overlay also
  carries the hover text. Overlays are capped at `MAX_OVERLAY` markers.
- Maps keep plotly's default drag mode: in "select" mode a plain click selects nothing in Streamlit,
  so clicking stays the main gesture and box selection (for zooming) is one toolbar button away.
- Arrays go out as float32 (typed-array encoded), so a 512 x 512 map costs about 1 MB of JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from nsa_core.niah import depth_labels

BRANCHES = ("cmp", "slc", "win")
BRANCH_NAMES = {"cmp": "compressed", "slc": "selected", "win": "sliding window"}
BRANCH_COLORS = {"cmp": "#4C78A8", "slc": "#F58518", "win": "#54A24B"}
FORCED_COLOR = "#B279A2"
MISS_COLOR = "#E45756"
MUTED = "#BAB0AC"
SELECTION_SCALE = [[0.0, "#F7FBFF"], [0.25, "#C6DBEF"], [0.6, "#4292C6"], [1.0, "#08306B"]]
MASS_SCALE = "Viridis"
MISS_SCALE = [[0.0, "#FFF5F0"], [0.4, "#FC9272"], [1.0, "#A50F15"]]
GATE_SCALE = [[0.0, "#FFFFFF"], [1.0, "#3F007D"]]
# MInference's needle colours: red (fail) -> yellow -> green (pass).
NEEDLE_SCALE = [[0.0, "#F0496E"], [0.5, "#EBB839"], [1.0, "#0CD79F"]]
MAX_OVERLAY = 128 * 128
FONT = {"family": "Inter, system-ui, sans-serif", "size": 13}


def _clickable(fig: go.Figure) -> go.Figure:
    """Let the pointer anywhere in a cell hover (and so click) the cell's overlay marker: with no hover
    distance cut-off the nearest marker wins, and on a rectangular grid of centres the nearest one is
    the centre of the cell under the pointer, however wide the cell is on screen."""
    return fig.update_layout(hovermode="closest", hoverdistance=-1)


def _layout(fig: go.Figure, *, title: str | None = None, height: int = 420) -> go.Figure:
    fig.update_layout(
        template="plotly_white",
        font=FONT,
        height=height,
        margin={"l": 60, "r": 20, "t": 60 if title else 30, "b": 50},
        title={"text": title, "x": 0.01, "xanchor": "left"} if title else None,
        hoverlabel={"font_size": 12},
    )
    return fig


def _centres(edges: np.ndarray) -> np.ndarray:
    edges = np.asarray(edges, dtype=np.float64)
    return (edges[:-1] + edges[1:] - 1) / 2


def _check_map(values: np.ndarray, q_edges: np.ndarray, k_edges: np.ndarray, name: str) -> None:
    if values.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [rows, cols] array, got shape {values.shape}")
    if len(q_edges) != values.shape[0] + 1 or len(k_edges) != values.shape[1] + 1:
        raise ValueError(
            f"{name} of shape {values.shape} needs {values.shape[0] + 1} query edges and "
            f"{values.shape[1] + 1} key edges, got {len(q_edges)} and {len(k_edges)}"
        )


def cell_overlay(
    x: np.ndarray,
    y: np.ndarray,
    *,
    hovertext: np.ndarray | None = None,
    name: str = "cells",
    xaxis: str = "x",
    yaxis: str = "y",
) -> go.Scatter:
    """Transparent markers at the cell centres x [C] by y [R], so that a click selects a cell.

    hovertext [R, C] (optional) is shown on hover; without it the overlay shows nothing (and still
    receives clicks: hoverinfo "skip" would drop them).
    """
    if len(x) * len(y) > MAX_OVERLAY:
        raise ValueError(f"an overlay of {len(y)} x {len(x)} cells exceeds {MAX_OVERLAY} markers; pool the map first")
    xx, yy = np.meshgrid(np.asarray(x, np.float32), np.asarray(y, np.float32))
    common = {
        "x": xx.ravel(),
        "y": yy.ravel(),
        "mode": "markers",
        "name": name,
        "showlegend": False,
        "xaxis": xaxis,
        "yaxis": yaxis,
        "marker": {"size": 14, "opacity": 0, "color": "#000000"},
    }
    if hovertext is None:
        return go.Scatter(**common, hoverinfo="none")
    return go.Scatter(**common, text=np.asarray(hovertext).ravel(), hovertemplate="%{text}<extra></extra>")


def _map_axes(
    fig: go.Figure, q_edges, k_edges, *, row: int | None = None, col: int | None = None, zoom=None, ylabel: bool = True
) -> None:
    """Token axes with the query axis reversed; zoom = (q_lo, q_hi, k_lo, k_hi) half-open token ranges."""
    q_lo, q_hi = float(q_edges[0]), float(q_edges[-1])
    k_lo, k_hi = float(k_edges[0]), float(k_edges[-1])
    if zoom is not None:
        q_lo, q_hi, k_lo, k_hi = (float(v) for v in zoom)
    fig.update_xaxes(
        range=[k_lo - 0.5, k_hi - 0.5], title_text="key position", row=row, col=col, showgrid=False, zeroline=False
    )
    fig.update_yaxes(
        range=[q_hi - 0.5, q_lo - 0.5],
        title_text="query position" if ylabel else None,
        row=row,
        col=col,
        showgrid=False,
        zeroline=False,
    )


def _heatmap(
    values,
    q_edges,
    k_edges,
    *,
    colorscale,
    zmin=None,
    zmax=None,
    colorbar=None,
    name="",
    showscale=True,
    hover: str | None = None,
) -> go.Heatmap:
    # Edges as x/y make each cell span its real token range, so pooled cells of unequal size still line up.
    return go.Heatmap(
        z=np.asarray(values, np.float32),
        x=np.asarray(k_edges, np.float32) - 0.5,
        y=np.asarray(q_edges, np.float32) - 0.5,
        colorscale=colorscale,
        zmin=zmin,
        zmax=zmax,
        colorbar=colorbar,
        name=name,
        showscale=showscale,
        hoverongaps=False,
        hoverinfo="skip" if hover is None else None,
        hovertemplate=hover,
    )


def _overlay_for_map(values: np.ndarray, q_edges, k_edges, labels: dict[str, np.ndarray], xaxis="x", yaxis="y"):
    """Overlay with hover text listing each array in labels at each cell, or None when the grid is too big."""
    rows, cols = values.shape
    if rows * cols > MAX_OVERLAY:
        return None
    qe, ke = np.asarray(q_edges), np.asarray(k_edges)
    q_text = np.char.add(np.char.add(qe[:-1].astype(str), "–"), (qe[1:] - 1).astype(str))
    k_text = np.char.add(np.char.add(ke[:-1].astype(str), "–"), (ke[1:] - 1).astype(str))
    text = np.char.add(np.char.add("queries ", q_text[:, None]), np.char.add("<br>keys ", k_text[None, :]))
    for label, arr in labels.items():
        shown = np.where(np.isnan(arr), "—", np.char.mod("%.3g", np.nan_to_num(arr)))
        text = np.char.add(text, np.char.add(f"<br>{label}: ", shown))
    return cell_overlay(_centres(ke), _centres(qe), hovertext=text, xaxis=xaxis, yaxis=yaxis)


# Gate atlas -----------------------------------------------------------------------------------------


def gate_atlas(mean_gates: np.ndarray, *, selected: tuple[int, int] | None = None) -> go.Figure:
    """Mean gate per layer and query head, one panel per branch; mean_gates [L, HQ, 3] in (cmp, slc, win).

    Clicking a cell returns x = head, y = layer. selected (layer, head) is outlined in every panel.
    """
    g = np.asarray(mean_gates, np.float32)
    if g.ndim != 3 or g.shape[-1] != 3:
        raise ValueError(f"mean_gates must be [layers, heads, 3], got shape {g.shape}")
    L, HQ, _ = g.shape
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=[f"g<sub>{b}</sub>: {BRANCH_NAMES[b]}" for b in BRANCHES],
        horizontal_spacing=0.06,
        shared_yaxes=True,
    )
    heads, layers = np.arange(HQ), np.arange(L)
    for i, branch in enumerate(BRANCHES):
        fig.add_trace(
            go.Heatmap(
                z=g[..., i],
                x=heads,
                y=layers,
                zmin=0,
                zmax=1,
                colorscale=GATE_SCALE,
                showscale=i == 2,
                colorbar={"title": "gate", "thickness": 12},
                hoverinfo="skip",
                texttemplate="%{z:.2f}" if L * HQ <= 64 else None,
                textfont={"size": 10},
            ),
            row=1,
            col=i + 1,
        )
        text = np.array(
            [
                [
                    f"layer {l} · head {h}<br>g_cmp {g[l, h, 0]:.3f}  g_slc {g[l, h, 1]:.3f}  g_win {g[l, h, 2]:.3f}"
                    for h in range(HQ)
                ]
                for l in range(L)
            ]
        )
        suffix = "" if i == 0 else str(i + 1)
        fig.add_trace(
            cell_overlay(heads, layers, hovertext=text, name=f"gates-{branch}", xaxis=f"x{suffix}", yaxis=f"y{suffix}")
        )
        fig.update_xaxes(
            range=[-0.5, HQ - 0.5],
            title_text="query head",
            dtick=1 if HQ <= 16 else None,
            showgrid=False,
            row=1,
            col=i + 1,
        )
        fig.update_yaxes(range=[L - 0.5, -0.5], dtick=1 if L <= 24 else None, showgrid=False, row=1, col=i + 1)
        if selected is not None:
            layer, head = selected
            fig.add_shape(
                type="rect",
                x0=head - 0.5,
                x1=head + 0.5,
                y0=layer - 0.5,
                y1=layer + 0.5,
                line={"color": MISS_COLOR, "width": 2},
                row=1,
                col=i + 1,
            )
    fig.update_yaxes(title_text="layer", row=1, col=1)
    return _layout(_clickable(fig), height=max(260, 70 + 36 * L))


# Block-selection map and NSA against dense ---------------------------------------------------------


def selection_map(
    selected: np.ndarray,
    q_edges: np.ndarray,
    k_edges: np.ndarray,
    *,
    window: int,
    forced: np.ndarray | None = None,
    zoom=None,
    query: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """How often each key cell was chosen by the queries of each query cell, for one layer and KV head.

    selected [R, C]: share of (query, chosen block) pairs landing in the cell by top-n choice (cells in
    the causal future are drawn as NaN); forced [R, C] (optional): the same share for the blocks
    every query is forced to take (block 0 and the local blocks), drawn in their own hue.
    q_edges [R+1], k_edges [C+1]: token boundaries of the cells. The sliding window of width `window`
    is drawn as a band along the diagonal; `query` marks one query row.
    """
    selected = np.asarray(selected, np.float32)
    _check_map(selected, q_edges, k_edges, "selected")
    future = future_cells(q_edges, k_edges)
    selected = np.where(future, np.nan, selected)
    fig = go.Figure()
    fig.add_trace(
        _heatmap(
            selected,
            q_edges,
            k_edges,
            colorscale=SELECTION_SCALE,
            zmin=0,
            zmax=1,
            name="top-n",
            colorbar={"title": "chosen", "thickness": 12},
        )
    )
    labels = {"chosen (top-n)": selected}
    if forced is not None:
        forced = np.asarray(forced, np.float32)
        _check_map(forced, q_edges, k_edges, "forced")
        forced = np.where(future, np.nan, forced)
        shown = np.where(forced > 0, forced, np.nan)
        fig.add_trace(
            _heatmap(
                shown,
                q_edges,
                k_edges,
                colorscale=[[0, "#E7D4E8"], [1, FORCED_COLOR]],
                zmin=0,
                zmax=1,
                name="forced",
                showscale=False,
            )
        )
        labels["forced"] = forced
        # Heatmaps have no legend entry of their own: a marker-only trace names the hue.
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                marker={"size": 10, "color": FORCED_COLOR, "symbol": "square"},
                name="forced (block 0, local blocks)",
            )
        )
    t0, t1 = float(q_edges[0]), float(q_edges[-1])
    # Window band: keys t-w+1 .. t for every query t (two lines, drawn in key coordinates).
    ts = np.array([t0, t1 - 1], np.float32)
    for offset, dash in ((0.0, None), (-(window - 1), "dash")):
        fig.add_trace(
            go.Scatter(
                x=ts + offset,
                y=ts,
                mode="lines",
                line={"color": BRANCH_COLORS["win"], "width": 2, "dash": dash},
                hoverinfo="skip",
                showlegend=offset != 0,
                name=f"window (w={window})",
            )
        )
    if query is not None:
        fig.add_hline(y=query, line={"color": MISS_COLOR, "width": 1.5, "dash": "dot"})
    overlay = _overlay_for_map(selected, q_edges, k_edges, labels)
    if overlay is not None:
        fig.add_trace(overlay)
    _map_axes(fig, q_edges, k_edges, zoom=zoom)
    fig.update_layout(legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"})
    return _layout(_clickable(fig), title=title, height=520)


def future_cells(q_edges: np.ndarray, k_edges: np.ndarray) -> np.ndarray:
    """[R, C] bool: cells whose keys all lie after every query of the row (causally invisible)."""
    return np.asarray(k_edges)[:-1][None, :] > (np.asarray(q_edges)[1:] - 1)[:, None]


def nsa_vs_dense(
    mass: np.ndarray,
    covered: np.ndarray,
    q_edges: np.ndarray,
    k_edges: np.ndarray,
    *,
    log_scale: bool = True,
    zoom=None,
) -> go.Figure:
    """Three maps of one query head: dense attention mass, the part NSA covered, the part it missed.

    mass [R, C]: full-attention softmax mass summed into each cell; covered [R, C]: the part of it
    inside the chosen blocks or the window. Both are divided by the queries in the row, so a cell
    shows the mass an average query of the row puts there (each row of the full map sums to 1).
    Cells in the causal future are NaN. log_scale shows log10 of the mass (first-token sinks
    otherwise flatten everything else).
    """
    mass, covered = np.asarray(mass, np.float64), np.asarray(covered, np.float64)
    _check_map(mass, q_edges, k_edges, "mass")
    _check_map(covered, q_edges, k_edges, "covered")
    rows = np.diff(np.asarray(q_edges, np.float64))[:, None]
    future = future_cells(q_edges, k_edges)
    dense = np.where(future, np.nan, mass / rows)
    kept = np.where(future, np.nan, covered / rows)
    missed = np.where(future, np.nan, np.maximum(dense - kept, 0.0))
    fig = make_subplots(
        rows=1,
        cols=3,
        shared_xaxes=True,
        shared_yaxes=True,
        horizontal_spacing=0.05,
        subplot_titles=["dense attention mass", "mass NSA covered", "mass NSA missed"],
    )
    floor = 1e-5
    shown = (lambda a: np.log10(np.maximum(a, floor))) if log_scale else (lambda a: a)
    top = float(np.nanmax(dense)) if np.isfinite(dense).any() else 1.0
    zmin, zmax = (np.log10(floor), np.log10(max(top, floor))) if log_scale else (0.0, top)
    unit = "log10 mass" if log_scale else "mass"
    # Both colour bars sit right of the last panel: mass (dense and covered share it), then missed.
    bars = (
        {"title": {"text": unit, "side": "right"}, "x": 1.01, "thickness": 10, "len": 0.9},
        None,
        {"title": {"text": f"missed ({unit})", "side": "right"}, "x": 1.1, "thickness": 10, "len": 0.9},
    )
    for i, (a, scale) in enumerate(((dense, MASS_SCALE), (kept, MASS_SCALE), (missed, MISS_SCALE))):
        fig.add_trace(
            _heatmap(
                np.where(np.isnan(a), np.nan, shown(a)),
                q_edges,
                k_edges,
                colorscale=scale,
                zmin=zmin,
                zmax=zmax,
                showscale=bars[i] is not None,
                colorbar=bars[i],
            ),
            row=1,
            col=i + 1,
        )
        suffix = "" if i == 0 else str(i + 1)
        overlay = _overlay_for_map(
            a,
            q_edges,
            k_edges,
            {"dense": dense, "covered": kept, "missed": missed},
            xaxis=f"x{suffix}",
            yaxis=f"y{suffix}",
        )
        if overlay is not None:
            fig.add_trace(overlay)
        _map_axes(fig, q_edges, k_edges, row=1, col=i + 1, zoom=zoom, ylabel=i == 0)
    _layout(_clickable(fig), height=440)
    return fig.update_layout(margin={"r": 130})


def head_recall(recall: np.ndarray, *, oracle: np.ndarray | None = None, selected_head: int | None = None) -> go.Figure:
    """Per query head of one layer: dense-mass recall (share of dense mass in chosen blocks + window),
    sorted worst first, with the overlap against the oracle top-n blocks beside it when given.

    recall [HQ], oracle [HQ] in [0, 1]. Clicking a bar returns its head as customdata.
    """
    recall = np.asarray(recall, np.float32)
    order = np.argsort(recall, kind="stable")
    labels = [f"head {h}" for h in order]
    colors = [MISS_COLOR if h == selected_head else BRANCH_COLORS["slc"] for h in order]
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=recall[order],
            name="dense-mass recall",
            marker_color=colors,
            customdata=order,
            hovertemplate="%{x}: recall %{y:.3f}<extra></extra>",
        )
    )
    if oracle is not None:
        oracle = np.asarray(oracle, np.float32)
        fig.add_trace(
            go.Bar(
                x=labels,
                y=oracle[order],
                name="overlap with oracle top-n",
                marker_color=MUTED,
                customdata=order,
                hovertemplate="%{x}: oracle overlap %{y:.3f}<extra></extra>",
            )
        )
    fig.update_yaxes(range=[0, 1.02], title_text="share")
    fig.update_layout(
        barmode="group", legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"}
    )
    return _layout(fig, title="per-head recall of the dense attention mass (worst first)", height=340)


# Query inspector -----------------------------------------------------------------------------------


def block_importance(
    scores: np.ndarray,
    chosen: Sequence[int],
    forced: Sequence[int],
    *,
    slc_block: int,
    query: int,
    title: str | None = None,
) -> go.Figure:
    """Importance p_slc' of every selection block visible to one query (one KV head), top-n marked.

    scores [Ns]: block importance (NaN for blocks after the query's own block); chosen: block ids the
    top-n picked (forced ones included); forced: the forced block ids.
    """
    scores = np.asarray(scores, np.float32)
    blocks = np.arange(len(scores))
    chosen_set, forced_set = {int(b) for b in chosen}, {int(b) for b in forced}
    kind = np.array(["forced" if b in forced_set else "top-n" if b in chosen_set else "not chosen" for b in blocks])
    fig = go.Figure()
    for label, color in (("not chosen", MUTED), ("top-n", BRANCH_COLORS["slc"]), ("forced", FORCED_COLOR)):
        mask = kind == label
        if mask.any():
            starts = blocks[mask] * slc_block
            fig.add_trace(
                go.Bar(
                    x=blocks[mask],
                    y=scores[mask],
                    name=label,
                    marker_color=color,
                    customdata=np.stack([starts, starts + slc_block - 1], -1),
                    hovertemplate="block %{x} (tokens %{customdata[0]}–%{customdata[1]})<br>"
                    "importance %{y:.4f}<extra>" + label + "</extra>",
                )
            )
    fig.update_xaxes(title_text=f"selection block (l'={slc_block} tokens)")
    fig.update_yaxes(title_text="importance p_slc'")
    fig.update_layout(
        bargap=0.1, legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"}
    )
    return _layout(fig, title=title or f"block importance seen by query {query}", height=300)


def compressed_probs(probs: np.ndarray, *, cmp_block: int, cmp_stride: int, query: int) -> go.Figure:
    """Compressed-branch attention of one query head over its visible compressed tokens; probs [Tc_visible]."""
    probs = np.asarray(probs, np.float32)
    starts = np.arange(len(probs)) * cmp_stride
    fig = go.Figure(
        go.Bar(
            x=starts,
            y=probs,
            marker_color=BRANCH_COLORS["cmp"],
            width=cmp_stride * 0.9,
            customdata=np.stack([np.arange(len(probs)), starts + cmp_block - 1], -1),
            hovertemplate="compressed token %{customdata[0]} (tokens %{x}–%{customdata[1]})"
            "<br>p_cmp %{y:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text=f"window start i·d (l={cmp_block}, d={cmp_stride})")
    fig.update_yaxes(title_text="p_cmp")
    return _layout(fig, title=f"compressed attention of query {query}", height=260)


def dense_row(
    row: np.ndarray, *, query: int, chosen: Sequence[int], slc_block: int, window: int, log_scale: bool = False
) -> go.Figure:
    """Full-attention softmax of one query over keys 0..query, with the chosen blocks and window shaded.

    row [query + 1]: dense probabilities (they sum to 1).
    """
    row = np.asarray(row, np.float32)
    keys = np.arange(len(row))
    fig = go.Figure()
    for b in chosen:
        fig.add_vrect(
            x0=b * slc_block - 0.5,
            x1=min((b + 1) * slc_block, query + 1) - 0.5,
            fillcolor=BRANCH_COLORS["slc"],
            opacity=0.18,
            line_width=0,
            layer="below",
        )
    fig.add_vrect(
        x0=max(0, query - window + 1) - 0.5,
        x1=query + 0.5,
        fillcolor=BRANCH_COLORS["win"],
        opacity=0.15,
        line_width=0,
        layer="below",
    )
    fig.add_trace(
        go.Scatter(
            x=keys,
            y=row,
            mode="lines",
            line={"color": "#333333", "width": 1},
            name="dense",
            hovertemplate="key %{x}: %{y:.4g}<extra></extra>",
        )
    )
    # Legend entries for the shaded spans (shapes have none of their own).
    for name, color in (("chosen blocks", BRANCH_COLORS["slc"]), (f"window (w={window})", BRANCH_COLORS["win"])):
        fig.add_trace(
            go.Scatter(
                x=[None], y=[None], mode="markers", marker={"size": 10, "color": color, "symbol": "square"}, name=name
            )
        )
    fig.update_xaxes(title_text="key position", range=[-0.5, query + 0.5])
    fig.update_yaxes(title_text="dense probability", type="log" if log_scale else "linear")
    fig.update_layout(legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"})
    return _layout(fig, title=f"full attention of query {query} (what dense would read)", height=280)


def gate_bars(gates: np.ndarray, *, query: int) -> go.Figure:
    """Gates of one query across its query heads; gates [HQ, 3] in (cmp, slc, win)."""
    gates = np.asarray(gates, np.float32)
    heads = [f"h{h}" for h in range(gates.shape[0])]
    fig = go.Figure(
        [
            go.Bar(
                x=heads,
                y=gates[:, i],
                name=f"g_{b}",
                marker_color=BRANCH_COLORS[b],
                hovertemplate="%{x} g_" + b + " %{y:.3f}<extra></extra>",
            )
            for i, b in enumerate(BRANCHES)
        ]
    )
    fig.update_yaxes(range=[0, 1], title_text="gate")
    fig.update_layout(
        barmode="group", legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"}
    )
    return _layout(fig, title=f"gates at query {query}", height=260)


# Gates page ----------------------------------------------------------------------------------------


def gate_distributions(hist_edges: np.ndarray, hist: np.ndarray, *, layer: int) -> go.Figure:
    """Share of (token, head) pairs per gate value, one curve per branch.

    hist_edges [bins + 1] over [0, 1]; hist [3, bins] counts in (cmp, slc, win) order.
    """
    hist = np.asarray(hist, np.float64)
    if hist.ndim != 2 or hist.shape[0] != 3 or len(hist_edges) != hist.shape[1] + 1:
        raise ValueError(f"hist must be [3, bins] with bins + 1 edges, got {hist.shape} and {len(hist_edges)} edges")
    centres = (np.asarray(hist_edges[:-1]) + np.asarray(hist_edges[1:])) / 2
    share = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    fig = go.Figure(
        [
            go.Bar(
                x=centres,
                y=share[i],
                name=f"g_{b}",
                marker_color=BRANCH_COLORS[b],
                opacity=0.65,
                width=float(np.diff(hist_edges).mean()),
                hovertemplate="g_" + b + " ≈ %{x:.2f}: %{y:.1%}<extra></extra>",
            )
            for i, b in enumerate(BRANCHES)
        ]
    )
    fig.update_layout(
        barmode="overlay", legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"}
    )
    fig.update_xaxes(title_text="gate value", range=[0, 1])
    fig.update_yaxes(title_text="share of (token, head)", tickformat=".0%")
    return _layout(fig, title=f"layer {layer}: gate distributions", height=320)


def gate_boxes(quantiles: np.ndarray, *, layer: int) -> go.Figure:
    """Per query head, each gate's spread over the tokens as a box from precomputed quantiles.

    quantiles [5, HQ, 3] at levels (0.05, 0.25, 0.5, 0.75, 0.95): whiskers at 5 % and 95 %.
    """
    qs = np.asarray(quantiles, np.float32)
    if qs.ndim != 3 or qs.shape[0] != 5 or qs.shape[2] != 3:
        raise ValueError(f"quantiles must be [5, heads, 3], got shape {qs.shape}")
    heads = [f"head {h}" for h in range(qs.shape[1])]
    fig = go.Figure(
        [
            go.Box(
                x=heads,
                lowerfence=qs[0, :, i],
                q1=qs[1, :, i],
                median=qs[2, :, i],
                q3=qs[3, :, i],
                upperfence=qs[4, :, i],
                name=f"g_{b}",
                marker_color=BRANCH_COLORS[b],
            )
            for i, b in enumerate(BRANCHES)
        ]
    )
    fig.update_layout(
        boxmode="group", legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"}
    )
    fig.update_yaxes(title_text="gate value (5–95 % whiskers)", range=[0, 1])
    return _layout(fig, title=f"layer {layer}: gate spread per query head", height=340)


def gates_along_position(
    positions: np.ndarray,
    mean: np.ndarray,
    *,
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
    highlight: tuple[int, int] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Gates along the sequence: positions [P] (bin centres), mean/low/high [P, 3] in (cmp, slc, win).

    low/high (optional) draw a band (e.g. the spread over heads); highlight (lo, hi) shades a token range
    such as a needle.
    """
    positions = np.asarray(positions, np.float32)
    mean = np.asarray(mean, np.float32)
    fig = go.Figure()
    for i, b in enumerate(BRANCHES):
        color = BRANCH_COLORS[b]
        if low is not None and high is not None:
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([positions, positions[::-1]]),
                    y=np.concatenate([np.asarray(high)[:, i], np.asarray(low)[::-1, i]]),
                    fill="toself",
                    fillcolor=color,
                    opacity=0.15,
                    line={"width": 0},
                    hoverinfo="skip",
                    showlegend=False,
                )
            )
        fig.add_trace(
            go.Scatter(
                x=positions,
                y=mean[:, i],
                mode="lines",
                name=f"g_{b}",
                line={"color": color, "width": 2},
                hovertemplate="token %{x:.0f}: g_" + b + " %{y:.3f}<extra></extra>",
            )
        )
    if highlight is not None:
        fig.add_vrect(
            x0=highlight[0] - 0.5,
            x1=highlight[1] + 0.5,
            fillcolor=MISS_COLOR,
            opacity=0.15,
            line_width=0,
            annotation_text="needle",
            annotation_position="top left",
        )
    fig.update_xaxes(title_text="token position")
    fig.update_yaxes(title_text="gate", range=[0, 1])
    fig.update_layout(legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"})
    return _layout(fig, title=title, height=320)


# Needle page ---------------------------------------------------------------------------------------


def needle_selection(hit: np.ndarray, *, rank: np.ndarray | None = None, title: str | None = None) -> go.Figure:
    """Was the needle's block chosen at the answer? hit [L, H] (1 chosen, 0 not) per layer and KV head;
    rank [L, H] (optional): the block's rank in the importance scores (0 = best, -1: the group cast no vote)."""
    hit = np.asarray(hit, np.float32)
    text = np.where(hit > 0, "chosen", "missed")
    if rank is not None:
        rank = np.asarray(rank).astype(int)
        text = np.char.add(text, np.where(rank >= 0, np.char.add("<br>rank ", rank.astype(str)), "<br>no vote"))
    return _layer_head_map(hit, text, NEEDLE_SCALE, title=title or "needle block chosen at the answer token")


def needle_choice(rate: np.ndarray, *, trials: int, title: str) -> go.Figure:
    """How often each layer's KV group chose the needle's block at the answer token, over `trials` trials of
    one outcome of a sweep: rate [L, H] in [0, 1] (NaN when trials is 0)."""
    rate = np.asarray(rate, np.float64)
    text = np.where(np.isnan(rate), "no trials", np.char.add(np.char.mod("%.0f%%", np.nan_to_num(rate) * 100),
                                                              f"<br>of {trials}"))
    return _layer_head_map(rate, text, SELECTION_SCALE, title=title)


def _layer_head_map(z: np.ndarray, text: np.ndarray, colorscale, *, title: str) -> go.Figure:
    """z [L, H] in [0, 1] as labelled cells, layers top down and KV heads across."""
    L, H = z.shape
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=np.arange(H),
            y=np.arange(L),
            zmin=0,
            zmax=1,
            colorscale=colorscale,
            showscale=False,
            text=text,
            texttemplate="%{text}",
            xgap=2,
            ygap=2,
            hovertemplate="layer %{y} · KV head %{x}: %{text}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="KV head", dtick=1)
    fig.update_yaxes(title_text="layer", dtick=1, autorange="reversed")
    return _layout(fig, title=title, height=max(220, 80 + 46 * L))


def niah_grid(
    lengths: Sequence[int], depths: Sequence[float], score: np.ndarray, *, title: str, trials: np.ndarray | None = None
) -> go.Figure:
    """Needle-in-a-haystack outcome: score [D, Lg] in [0, 1] (exact-match rate) by depth and context length.

    NaN marks cells not run. Clicking a cell returns x = length index, y = depth index.
    """
    score = np.asarray(score, np.float32)
    if score.shape != (len(depths), len(lengths)):
        raise ValueError(f"score must be [depths={len(depths)}, lengths={len(lengths)}], got {score.shape}")
    xs, ys = np.arange(len(lengths)), np.arange(len(depths))
    labels = depth_labels(depths, percent=True)
    fig = go.Figure(
        go.Heatmap(
            z=score,
            x=xs,
            y=ys,
            zmin=0,
            zmax=1,
            colorscale=NEEDLE_SCALE,
            xgap=1,
            ygap=1,
            colorbar={"title": "exact match", "thickness": 12},
            hoverinfo="skip",
            texttemplate="%{z:.0%}" if score.size <= 120 else None,
            hoverongaps=False,
        )
    )
    n = "" if trials is None else np.char.add("<br>trials ", np.asarray(trials).astype(int).astype(str))
    text = np.array(
        [
            [
                f"{lengths[j]} tokens · depth {labels[i]}<br>score "
                + ("—" if np.isnan(score[i, j]) else f"{score[i, j]:.0%}")
                for j in xs
            ]
            for i in ys
        ]
    )
    if trials is not None:
        text = np.char.add(text, n)
    fig.add_trace(cell_overlay(xs, ys, hovertext=text, name="niah-cells"))
    fig.update_xaxes(
        tickvals=xs,
        ticktext=[_tokens_label(n) for n in lengths],
        title_text="context length (tokens)",
        range=[-0.5, len(lengths) - 0.5],
    )
    fig.update_yaxes(
        tickvals=ys, ticktext=labels, title_text="needle depth",
        range=[len(depths) - 0.5, -0.5]
    )
    return _layout(_clickable(fig), title=title, height=max(260, 90 + 30 * len(depths)))


def _tokens_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


# Performance page ----------------------------------------------------------------------------------


def benchmark_lines(
    series: dict[str, tuple[Sequence[int], Sequence[float]]], *, title: str, y_title: str = "time (ms)"
) -> go.Figure:
    """One line per implementation: series[name] = (context lengths, times); log-log axes.

    Whole-attention lines stand out: names starting with "nsa" are drawn thick, dense baselines
    (names containing "dense" or "sdpa") dashed; per-stage lines stay thin.
    """
    fig = go.Figure()
    lengths = sorted({int(x) for xs, _ in series.values() for x in xs})
    for name, (xs, ys) in series.items():
        lowered = name.lower()
        dense = "dense" in lowered or "sdpa" in lowered
        width = 3.5 if lowered.startswith("nsa") else 2.5 if dense else 1.5
        fig.add_trace(
            go.Scatter(
                x=list(xs),
                y=list(ys),
                mode="lines+markers",
                name=name,
                line={"width": width, "dash": "dash" if dense else None},
                marker={"size": 6},
                hovertemplate=name + ": %{y:.3g} ms at %{x} tokens<extra></extra>",
            )
        )
    fig.update_xaxes(
        type="log", title_text="context length (tokens)", tickvals=lengths, ticktext=[_tokens_label(n) for n in lengths]
    )
    fig.update_yaxes(type="log", title_text=y_title)
    fig.update_layout(legend={"orientation": "v", "x": 1.02, "y": 1, "xanchor": "left", "yanchor": "top"})
    return _layout(fig, title=title, height=420)


def payload_bytes(fig: go.Figure) -> int:
    """Size of the JSON a figure sends to the browser."""
    return len(fig.to_json())
