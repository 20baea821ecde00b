"""Explorer page: trace a text, then see per layer and head what each NSA branch did, against dense.

Layout: input -> gate atlas (click a cell to pick layer and head) -> maps of the chosen layer and head
(block selection, or NSA against dense; click a cell to inspect its query, box-select to zoom) ->
query inspector. The maps and the inspector live in one fragment, so a click there reruns only them
and never the model.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import cache, figures, inputs, session, snippets, state, widgets
from app.state import Zoom
from nsa_core import analysis, limits, masks, tokenizer

MAP_CELLS = 64  # cells per side of a clickable map (the overlay then has at most 64 x 64 markers)
VIEW_KEYS = ("ckpt", "tokens", "layer", "head", "query", "zoom")

st.title("Explorer")
loaded = session.model()
config = loaded.model.config
if config.attention != "nsa":
    st.info(
        f"`{loaded.label}` uses dense attention, so it has no NSA branches to explore. "
        "Open an NSA checkpoint on the **Model** page."
    )
    st.stop()
choice = session.device_choice()
model_input = inputs.input_panel(session.token_limit())
ids, needle_span = model_input.ids, model_input.needle_span

with st.spinner(f"Tracing {len(ids)} tokens through {config.n_layer} layers…"):
    run = cache.trace_ids(loaded.source, choice.device, choice.dtype, ids)
trace = run.trace
T = len(ids)
m = st.columns([1, 1, 1, 2])
m[0].metric("Tokens", f"{T:,}")
m[1].metric("Trace time", f"{run.seconds:.2f} s")
m[2].metric("Layers × heads", f"{config.n_layer} × {config.n_head}")
with m[3]:
    st.download_button(
        "Download trace (.npz)",
        data=lambda: cache.trace_npz(loaded.source, choice.device, choice.dtype, ids),
        file_name="nsa-trace.npz",
        mime="application/octet-stream",
        key="dl_trace",
        on_click="ignore",
        icon=":material/download:",
    )

# Gate atlas: clicking a cell picks the layer and head ----------------------------------------------
layer = state.clamp("layer", config.n_layer)
head = state.clamp("head", config.n_head)
st.subheader(
    "Gate atlas",
    help="Mean gate of each branch per layer and query head, over all tokens. "
    "Click a cell to look at that layer and head below.",
)
atlas_event = widgets.chart(
    figures.gate_atlas(analysis.gate_atlas(trace), selected=(layer, head)),
    key="atlas",
    name="gate-atlas",
    selectable=True,
)
points = widgets.selected_points(atlas_event)
if points and st.session_state.get("_atlas_seen") != points[0]:
    st.session_state["_atlas_seen"] = points[0]
    st.session_state["layer"], st.session_state["head"] = int(points[0]["y"]), int(points[0]["x"])
    st.rerun()

c1, c2, c3 = st.columns([1, 1, 2])
c1.selectbox("Layer", range(config.n_layer), key="layer")
c2.selectbox("Query head", range(config.n_head), key="head")
kv_head = st.session_state["head"] // config.group_size
c3.markdown(
    f"<br>KV head **{kv_head}** (query heads {kv_head * config.group_size}–"
    f"{(kv_head + 1) * config.group_size - 1} share its block selection)",
    unsafe_allow_html=True,
)
state.publish(VIEW_KEYS)


@st.fragment
def maps_and_inspector(source: str, device: str, dtype: str, ids: tuple[int, ...], needle_span) -> None:
    # A fragment rerun bypasses the entry script's handler, so memory errors are shown here too.
    try:
        _maps_and_inspector(source, device, dtype, ids, needle_span)
    except (limits.ContextTooLong, limits.DeviceOutOfMemory) as err:
        st.error(str(err), icon=":material/memory:")


def _maps_and_inspector(source: str, device: str, dtype: str, ids: tuple[int, ...], needle_span) -> None:
    T = len(ids)
    layer, head = st.session_state["layer"], st.session_state["head"]
    kv_head = head // config.group_size
    # Settled before any chart is drawn: a chart's identity includes its figure, and a figure that
    # changed between reruns would drop the selection the user just made.
    query = state.clamp("query", T, default=T - 1)
    zoom = st.session_state.get("zoom")
    if zoom is not None and (zoom.q_hi > T or zoom.k_hi > T):
        zoom = st.session_state["zoom"] = None
    view = st.segmented_control(
        "Map", ["Block selection", "NSA vs dense"], key="map_view", default="Block selection", required=True
    )
    region = zoom.as_tuple() if zoom else None
    if view == "Block selection":
        pooled = cache.selection_map(source, device, dtype, ids, layer, kv_head, region, MAP_CELLS)
        fig = figures.selection_map(
            pooled.values,
            pooled.row_edges,
            pooled.col_edges,
            window=config.window,
            forced=pooled.forced,
            query=query,
            title=f"layer {layer} · KV head {kv_head}: blocks chosen per query block",
        )
        event = widgets.chart(fig, key="selmap", name=f"selection-L{layer}-kv{kv_head}", selectable=True, box=True)
    else:
        pooled = cache.dense_map(source, device, dtype, ids, layer, head, region, MAP_CELLS)
        log_scale = st.toggle("log colour scale", value=True, key="log_mass")
        fig = figures.nsa_vs_dense(
            pooled.values, pooled.covered, pooled.row_edges, pooled.col_edges, log_scale=log_scale
        )
        event = widgets.chart(fig, key="densemap", name=f"nsa-vs-dense-L{layer}-h{head}", selectable=True, box=True)
        recall, oracle = cache.layer_recall(source, device, dtype, ids, layer)
        # Per head over all queries; the oracle overlap is per KV head, shared by its G query heads.
        per_head_oracle = oracle.mean(0).repeat(config.group_size)
        widgets.chart(
            figures.head_recall(recall.mean(0), oracle=per_head_oracle, selected_head=head),
            key="recall",
            name=f"recall-L{layer}",
        )
    _apply_map_event(event, T)
    if zoom is not None:
        z1, z2 = st.columns([3, 1])
        z1.caption(f"Zoomed to queries {zoom.q_lo}–{zoom.q_hi - 1}, keys {zoom.k_lo}–{zoom.k_hi - 1}.")
        if z2.button("Reset zoom", key="reset_zoom", icon=":material/zoom_out_map:"):
            st.session_state["zoom"] = None
            st.rerun()
    else:
        st.caption(
            "Click a cell to inspect its query. To zoom into a region, pick **Box Select** in the chart's "
            "toolbar and drag a box: the map is recomputed at a finer grid."
        )
    with st.container(key="inspector"):  # a stable handle (.st-key-inspector) for screenshots and tests
        inspector(source, device, dtype, ids, layer, head, needle_span)
    state.publish(VIEW_KEYS)


def _apply_map_event(event, T: int) -> None:
    """A click picks the query at the clicked row's centre; a box zooms. Each event applies once."""
    points, box = widgets.selected_points(event), widgets.selected_box(event)
    if box is not None and st.session_state.get("_box_seen") != box:
        st.session_state["_box_seen"] = box
        st.session_state["zoom"] = Zoom.from_box(box[0], box[1], length=T)
        st.rerun()
    if points and len(points) == 1 and st.session_state.get("_click_seen") != points[0]:
        st.session_state["_click_seen"] = points[0]
        st.session_state["query"] = min(max(int(round(float(points[0]["y"]))), 0), T - 1)


def inspector(source, device, dtype, ids, layer: int, head: int, needle_span) -> None:
    T = len(ids)
    kv_head = head // config.group_size
    st.subheader("Query inspector", help="What one query of the chosen layer and head read through each branch.")
    query = state.clamp("query", T, default=T - 1)  # a click above may have moved it
    st.number_input("Query position", min_value=0, max_value=T - 1, step=1, key="query")
    d = cache.query_detail(source, device, dtype, ids, layer, query)
    chosen = [int(b) for b in d.selected[kv_head] if b >= 0]
    forced = [int(b) for b in np.flatnonzero(d.forced)]
    # Blocks after the query's own block cannot be chosen: show them as gaps, not as zero importance.
    importance = np.where(
        np.arange(d.block_importance.shape[1]) <= query // config.slc_block, d.block_importance[kv_head], np.nan
    )
    visible = masks.num_compressed(query + 1, config.cmp_block, config.cmp_stride)
    dense_row = d.dense_row[head]
    recall = cache.layer_recall(source, device, dtype, ids, layer)[0][query, head]
    gates = " ".join(f"g<sub>{b}</sub>={d.gates[head, i]:.2f}" for i, b in enumerate(figures.BRANCHES))
    st.markdown(
        f"Query **{query}** (`{tokenizer.token_label(ids[query])}`) · layer {layer} · head {head} "
        f"(KV head {kv_head}) · window tokens {d.window[0]}–{d.window[1]} · {gates} · "
        f"{len(chosen)} blocks chosen · dense mass covered **{recall:.1%}**",
        unsafe_allow_html=True,
    )
    if not d.voted[kv_head]:
        st.caption(
            f"KV group {kv_head} cast no vote at this query: every block's importance is 0, because no compressed "
            "token is complete yet or, with *free* scores, each of its heads attended only to forced blocks. Its "
            "chosen blocks are ties, taken by lowest id."
        )
    left, right = st.columns(2)
    with left:
        widgets.chart(
            figures.block_importance(importance, chosen, forced, slc_block=config.slc_block, query=query),
            key="importance",
            name=f"importance-q{query}",
        )
        widgets.chart(
            figures.compressed_probs(
                d.cmp_probs[head, :visible], cmp_block=config.cmp_block, cmp_stride=config.cmp_stride, query=query
            ),
            key="pcmp",
            name=f"compressed-q{query}",
        )
    with right:
        widgets.chart(figures.gate_bars(d.gates, query=query), key="gatebars", name=f"gates-q{query}")
        widgets.chart(
            figures.dense_row(
                dense_row, query=query, chosen=chosen, slc_block=config.slc_block, window=config.window, log_scale=True
            ),
            key="denserow",
            name=f"dense-q{query}",
        )
    st.markdown(
        "**What the selection branch read**: the chosen blocks as text, shaded by the dense attention "
        "of this head; the query token is outlined" + (", the needle underlined." if needle_span else ".")
    )
    st.html(
        snippets.chosen_blocks_html(
            ids,
            chosen=chosen,
            forced=forced,
            slc_block=config.slc_block,
            query=query,
            weights=dense_row,
            highlight=needle_span,
        )
    )
    with st.expander(f"Sliding window: tokens {d.window[0]}–{d.window[1]}"):
        st.html(
            snippets.span_html(ids, d.window[0], d.window[1] + 1, query=query, weights=dense_row, highlight=needle_span)
        )


maps_and_inspector(loaded.source, choice.device, choice.dtype, ids, needle_span)
