"""Model page: open a shipped sample, a server-side checkpoint or an uploaded file; show what it is."""

from __future__ import annotations

import streamlit as st

from app import cache, session, state
from nsa_core import checkpoint

# Paper symbol of each NSA field (arXiv 2502.11089; the mapping is NSAConfig's docstring).
PAPER_SYMBOLS = {
    "cmp_block": "l",
    "cmp_stride": "d",
    "slc_block": "l'",
    "top_n": "n",
    "window": "w",
    "cmp_fn": "φ",
    "n_head": "h",
    "n_kv_head": "g (KV heads)",
    "head_dim": "d_k",
    "v_head_dim": "d_v",
}
UPLOAD_LIMIT_MB = 256

st.title("Model")
st.caption(
    "Open a checkpoint: one of the shipped sample models, a checkpoint on the server, or a single "
    "`.safetensors` file from your computer. Loading is strict; nothing is ever unpickled."
)

shipped, server, upload = st.tabs(["Shipped samples", "Server path", "Upload"])
with shipped:
    names = cache.sample_names()
    current = st.session_state.get("ckpt", "")
    if not names:
        st.info("No shipped checkpoint was found on this server; open one by path or upload a file.")
    else:
        checkpoint_source = cache.split_scores(current)[0] if current else ""
        picked = checkpoint_source[len(cache.SAMPLE) :] if checkpoint_source.startswith(cache.SAMPLE) else None
        name = st.selectbox(
            "Sample model", names, index=names.index(picked) if picked in names else 0, key="sample_pick"
        )
        st.caption(cache.describe_sample(name))
        if st.button("Open sample", key="open_sample", type="primary") and session.switch_model(cache.SAMPLE + name):
            st.rerun()
with server:
    roots = cache.allowed_roots()
    st.caption(
        "Checkpoints on this server, under the folders it allows ("
        + ", ".join(f"`{r}`" for r in roots)
        + "; add more with the `NSA_CHECKPOINT_ROOTS` environment variable)."
    )
    found = [str(p) for p in cache.server_checkpoints()]
    picked = st.selectbox("Found checkpoints", found, index=None, key="path_found", placeholder="Choose one…")
    typed = st.text_input("…or a path", key="path_pick", placeholder="a directory or a .safetensors file")
    wanted = typed.strip() or picked
    if st.button("Open path", key="open_path", disabled=not wanted):
        try:
            source = cache.PATH + str(cache.checked_path(wanted))
        except cache.SourceError as err:
            st.error(str(err))
        else:
            if session.switch_model(source):
                st.rerun()
with upload:
    file = st.file_uploader(
        "Single-file checkpoint",
        type=["safetensors"],
        key="upload_pick",
        max_upload_size=UPLOAD_LIMIT_MB,
        help="A .safetensors file whose metadata carries the config, as "
        "`nsa_core.checkpoint.save_single_file` writes it.",
    )
    if file is not None and st.session_state.get("_upload_done") != file.file_id:
        st.session_state["_upload_done"] = file.file_id
        if session.switch_model(cache.store_upload(file.getvalue())):
            st.rerun()

loaded = session.model()
state.publish(("ckpt",))
config = loaded.model.config
choice = session.device_choice()

st.subheader(f"`{loaded.label}`")
cols = st.columns(4)
cols[0].metric("Parameters", f"{loaded.model.num_parameters() / 1e6:.2f} M")
cols[1].metric("Attention", "NSA" if config.attention == "nsa" else "dense")
cols[2].metric("Device", choice.device.upper(), help=choice.reason)
cols[3].metric("Load time", f"{loaded.load_seconds:.2f} s")
st.markdown(f"**Device:** {choice.reason}.  \n**Attention implementation:** {loaded.backend_reason}.")

rows = [{"field": k, "paper": PAPER_SYMBOLS.get(k, ""), "value": str(v)} for k, v in config.to_dict().items()]
left, right = st.columns([1, 1])
with left:
    st.markdown("**Configuration**")
    st.dataframe(rows, hide_index=True, width="stretch", height=min(38 + 35 * len(rows), 640))
with right:
    path = cache.source_path(loaded.source)
    card, metrics = checkpoint.read_card(path), checkpoint.read_metrics(path)
    st.markdown("**Model card**")
    with st.container(height=420, border=True):
        st.markdown(card or "_This checkpoint has no model card._")
    if metrics:
        with st.expander("metrics.json"):
            st.json(metrics)
