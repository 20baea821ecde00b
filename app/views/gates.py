"""Gates page: how each layer mixes its three branches: distributions, along the position, near a needle."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import cache, figures, inputs, session, state, widgets

st.title("Gates")
st.caption(
    "Every query head mixes its branches with sigmoid gates g_cmp, g_slc, g_win (not normalised "
    "across branches). Statistics are over the tokens of the input below, per layer."
)
loaded = session.model()
config = loaded.model.config
if config.attention != "nsa":
    st.info(f"`{loaded.label}` uses dense attention and has no gates. Open an NSA checkpoint on the **Model** page.")
    st.stop()
choice = session.device_choice()
model_input = inputs.input_panel(session.token_limit())
ids = model_input.ids
with st.spinner(f"Tracing {len(ids)} tokens…"):
    cache.trace_ids(loaded.source, choice.device, choice.dtype, ids)

c1, c2 = st.columns([1, 3])
layer = state.clamp("layer", config.n_layer)
c1.selectbox("Layer", range(config.n_layer), key="layer")
head_options = ["mean over heads", *range(config.n_head)]
head_pick = c2.segmented_control(
    "Along the position",
    head_options,
    key="gates_head",
    default="mean over heads",
    required=True,
    format_func=lambda h: h if isinstance(h, str) else f"head {h}",
)
state.publish(("ckpt", "layer"))

# Near a needle: the passkey prompt's needle, or any phrase the user looks for.
span = model_input.needle_span
phrase = st.text_input(
    "Look near a phrase",
    key="gates_phrase",
    placeholder="e.g. def (or leave empty)",
    help="The first occurrence of this text in the input is marked along the position and "
    "compared with every other token.",
)
if phrase:
    found = cache.find_phrase(ids, phrase)
    if found is None:
        st.warning(f"“{phrase}” does not occur in the input.")
    span = found or span
token_range = None if span is None else (span[0], span[1] + 1)
stats = cache.gate_stats(loaded.source, choice.device, choice.dtype, ids, layer, token_range)

left, right = st.columns(2)
with left:
    widgets.chart(
        figures.gate_distributions(stats.hist_edges, stats.hist.sum(0), layer=layer),
        key="gate_hist",
        name=f"gate-hist-L{layer}",
    )
with right:
    widgets.chart(figures.gate_boxes(stats.quantiles, layer=layer), key="gate_box", name=f"gate-box-L{layer}")

centres = (stats.position_edges[:-1] + stats.position_edges[1:] - 1) / 2
if head_pick == "mean over heads":
    mean, low, high = stats.position_mean.mean(1), stats.position_mean.min(1), stats.position_mean.max(1)
    label = "mean over heads (band: lowest to highest head)"
else:
    mean, low, high = stats.position_mean[:, head_pick], None, None
    label = f"head {head_pick}"
widgets.chart(
    figures.gates_along_position(
        centres, mean, low=low, high=high, highlight=span, title=f"layer {layer}: gates along the position, {label}"
    ),
    key="gate_pos",
    name=f"gates-position-L{layer}",
)

if stats.token_range is not None:
    lo, hi = stats.token_range
    st.subheader(f"Near tokens {lo}–{hi - 1}")
    around = stats.around if head_pick == "mean over heads" else stats.around[:, [head_pick]]
    widgets.chart(
        figures.gates_along_position(
            stats.around_positions,
            around.mean(1),
            low=around.min(1),
            high=around.max(1),
            highlight=(lo, hi - 1),
            title="gates token by token around the range",
        ),
        key="gate_near",
        name=f"gates-near-L{layer}",
    )
    inside, outside = stats.inside_mean.mean(0), stats.outside_mean.mean(0)
    cols = st.columns(3)
    for col, i, branch in zip(cols, range(3), figures.BRANCHES, strict=True):
        delta = None if np.isnan(outside[i]) else f"{inside[i] - outside[i]:+.3f} vs elsewhere"
        col.metric(f"g_{branch} inside", f"{inside[i]:.3f}", delta=delta)
