"""The model a browser session is looking at, and the run panel in the sidebar that names it.

The launcher's choices arrive as environment variables (see nsa_core/launch.py). A session starts on
the checkpoint in its URL, else the one given on the command line, else the best shipped NSA sample.
A checkpoint that fails to load shows an error and leaves the session on its previous model.
"""

from __future__ import annotations

import os

import streamlit as st

from nsa_core import limits
from nsa_core.launch import ENV_CHECKPOINT, ENV_DEVICE

from . import cache

# Longest input a page offers: the CPU reference is quadratic in places and slow past a few thousand tokens.
CPU_TOKEN_LIMIT = 8192
GPU_TOKEN_LIMIT = 65536
_LAST_GOOD = "_last_good_ckpt"
_THIS_RUN = "_loaded_model"
_RULE_PICK = "slc_pick"
# The block-selection rules (NSAConfig.slc_scores) as the sidebar names them.
SCORE_RULES = {"paper": "paper (Eq. 10)", "free": "free (forced blocks left out)"}


def default_source() -> str:
    """The launcher's checkpoint as a source string, else the best shipped NSA sample."""
    given = os.environ.get(ENV_CHECKPOINT, "").strip()
    if not given:
        return cache.SAMPLE + cache.default_sample()
    if given in cache.sample_names():
        return cache.SAMPLE + given
    return cache.PATH + os.path.abspath(given)


def device_choice() -> cache.DeviceChoice:
    return cache.choose_device(os.environ.get(ENV_DEVICE, "auto") or "auto")


def token_limit() -> int:
    """The longest input a page offers: the fixed cap, lowered to what the device's free memory can trace."""
    cap = GPU_TOKEN_LIMIT if device_choice().device == "cuda" else CPU_TOKEN_LIMIT
    loaded = st.session_state.get(_THIS_RUN)
    if loaded is None:
        return cap
    fits = limits.model_max_context(loaded.model, trace=True, analyses=limits.ANALYSES)
    return min(cap, max(64, fits))  # 64: the input panel's minimum; a longer input is then refused with numbers


def open_model() -> cache.LoadedModel | None:
    """Load (or fetch from the process cache) the session's model for this run; None, with an error shown,
    on failure. The entry script calls this once per run; pages read the result with `model()`."""
    loaded = _load_session_model()
    st.session_state[_THIS_RUN] = loaded
    return loaded


def model() -> cache.LoadedModel:
    """The model open in this run; stops the page with a hint when there is none."""
    loaded = st.session_state.get(_THIS_RUN)
    if loaded is None:
        st.info("No model is open. Pick a checkpoint on the **Model** page.")
        st.stop()
    return loaded


def switch_model(source: str) -> bool:
    """Open another checkpoint for this session; False (with the error shown) when it cannot be loaded."""
    choice = device_choice()
    try:
        cache.load_model(source, choice.device, choice.dtype)
    except Exception as err:  # any failed load must leave the app serving; the message says what broke
        st.error(f"Could not open checkpoint **{cache.source_label(source)}**: {err}")
        return False
    st.session_state["ckpt"] = source
    return True


def _load_session_model() -> cache.LoadedModel | None:
    if not st.session_state.get("ckpt"):
        try:
            st.session_state["ckpt"] = default_source()
        except FileNotFoundError as err:  # no shipped checkpoint at all: the Model page can still upload one
            st.warning(str(err))
            return None
    source = st.session_state["ckpt"]
    choice = device_choice()
    try:
        loaded = cache.load_model(source, choice.device, choice.dtype)
    except Exception as err:  # any failed load must leave the app serving; the message says what broke
        st.error(f"Could not open checkpoint **{cache.source_label(source)}**: {err}")
        # Fall back to the last model that worked in this session, else the default one.
        try:
            fallback = st.session_state.get(_LAST_GOOD) or default_source()
        except FileNotFoundError:
            return None
        if fallback == source:
            return None
        st.session_state["ckpt"] = fallback
        return _load_session_model()
    st.session_state[_LAST_GOOD] = source
    return loaded


def run_panel(loaded: cache.LoadedModel | None) -> None:
    """Sidebar: which model, where it runs, and why."""
    choice = device_choice()
    with st.sidebar:
        st.markdown("### NSA Explorer")
        if loaded is None:
            st.warning("No model loaded. Pick one on the **Model** page.")
            return
        c = loaded.model.config
        st.markdown(
            f"**Model** `{loaded.label}`  \n{c.n_layer} layers · {c.n_head} query heads · "
            f"{c.n_kv_head} KV heads · {loaded.model.num_parameters() / 1e6:.2f} M parameters"
        )
        badge = (
            ":green-badge[GPU · Triton]"
            if "Triton" in loaded.backend_reason
            else (":orange-badge[GPU · reference]" if choice.device == "cuda" else ":blue-badge[CPU · reference]")
        )
        st.markdown(f"**Runs on** {badge}")
        st.caption(f"Device: {choice.reason}. Attention: {loaded.backend_reason}.")
        st.caption(
            f"NSA: l={c.cmp_block}, d={c.cmp_stride}, l'={c.slc_block}, n={c.top_n}, w={c.window} · "
            f"loaded in {loaded.load_seconds:.2f} s"
        )
        if c.attention == "nsa":
            _selection_rule_picker(loaded)


def _selection_rule_picker(loaded: cache.LoadedModel) -> None:
    """Serve the open checkpoint with either block-selection rule; the weights stay the same."""
    st.session_state[_RULE_PICK] = loaded.model.config.slc_scores  # follows the model, whichever page opened it
    st.radio(
        "Block selection",
        list(SCORE_RULES),
        format_func=SCORE_RULES.get,
        key=_RULE_PICK,
        on_change=_switch_rule,
        help="How the top-n blocks are ranked. *paper*: each KV group sums its heads' compressed-attention "
        "probabilities (Eq. 10). *free*: each head's probabilities are first renormalised over the blocks "
        "that are not forced (block 0 and the local blocks), so a head whose mass sits on a forced block "
        "still votes for the others. The weights are the same; every page follows the choice.",
    )


def _switch_rule() -> None:
    # on_change runs before the rerun: the session opens the checkpoint under the picked rule.
    source = st.session_state["ckpt"]
    try:
        target = cache.with_scores(source, st.session_state[_RULE_PICK])
    except Exception as err:  # the checkpoint's files changed or went away since it was opened
        st.error(f"Could not switch the selection rule of **{cache.source_label(source)}**: {err}")
        return
    switch_model(target)
