"""The input panel shared by the Explorer and Gates pages: what text the model reads.

Choices: a standard-library source file, a passkey prompt (the needle task the models were trained
on, built by nsa_core.niah), pasted text, or an uploaded text file. Its widget keys are kept across
page switches (see PERSISTENT_KEYS), so both pages look at the same input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import streamlit as st

from nsa_core import data, niah

from . import cache, texts

KINDS = ("Source file", "Passkey prompt", "Paste", "Upload")
PERSISTENT_KEYS = ("text_kind", "max_tokens", "text_file", "text_depth", "text_seed", "text_paste")
TEXT_TYPES = ["txt", "py", "md", "json", "csv", "c", "h", "rs", "js", "html", "tex"]
MIN_TOKENS = 64


@dataclass(frozen=True)
class ModelInput:
    ids: tuple[int, ...]
    needle_span: tuple[int, int] | None  # inclusive token range of a hidden needle, if any
    note: str  # one line on what was read


def input_panel(limit: int) -> ModelInput:
    """Widgets choosing the input; returns its token ids (at most `limit`, at least 2 or the page stops)."""
    with st.container(border=True):
        left, right = st.columns([3, 1])
        with left:
            kind = st.segmented_control("Input", KINDS, key="text_kind", default=KINDS[0], required=True)
        with right:
            # The URL or another page may have set it; keep it inside this device's range.
            wanted = st.session_state.get("max_tokens", min(1024, limit))
            st.session_state["max_tokens"] = min(max(int(wanted), MIN_TOKENS), limit)
            max_tokens = int(
                st.number_input(
                    "Max tokens",
                    min_value=MIN_TOKENS,
                    max_value=limit,
                    step=256,
                    key="max_tokens",
                    help=f"Longer inputs are cut. Limit on this device: {limit} tokens.",
                )
            )
        choice = _read(kind, max_tokens)
        if choice.note:
            st.caption(choice.note)
    if len(choice.ids) < 2:
        st.info("Give the model some text to read.")
        st.stop()
    return choice


def _read(kind: str, max_tokens: int) -> ModelInput:
    if kind == "Source file":
        files = texts.source_files()
        name = st.selectbox("Python standard-library module", list(files), key="text_file")
        ids, cut = cache.encode_text(texts.read_source(files[name]), max_tokens)
        return ModelInput(ids, None, _cut_note(cut, max_tokens))
    if kind == "Passkey prompt":
        c1, c2 = st.columns(2)
        depth = c1.slider("Needle depth", 0.0, 1.0, 0.3, 0.05, key="text_depth")
        seed = int(c2.number_input("Seed", 0, 10_000, 0, key="text_seed"))
        length = max(max_tokens, niah.prompt_overhead() + 16)
        key = data.random_key(np.random.default_rng(seed))
        prompt = niah.build_prompt(cache.heldout_haystack(), length=length, depth=depth, key=key, offset=seed * 7919)
        span = (prompt.needle_at, prompt.needle_at + len(data.NEEDLE.format(key=key)) - 1)
        return ModelInput(
            tuple(prompt.ids),
            span,
            f"Hidden pass key **{key}** at tokens {span[0]}–{span[1]}; the "
            "prompt ends with the question, so the last query is where the model must recall it.",
        )
    if kind == "Paste":
        pasted = st.text_area("Text", key="text_paste", height=160, placeholder="Paste any text…")
        ids, cut = cache.encode_text(pasted, max_tokens)
        return ModelInput(ids, None, _cut_note(cut, max_tokens))
    upload = st.file_uploader("Text file", type=TEXT_TYPES, key="text_upload", max_upload_size=8)
    text = upload.getvalue().decode("utf-8", errors="replace") if upload is not None else ""
    ids, cut = cache.encode_text(text, max_tokens)
    return ModelInput(ids, None, _cut_note(cut, max_tokens))


def _cut_note(cut: bool, max_tokens: int) -> str:
    return f"The text was cut to its first {max_tokens} tokens." if cut else ""


def keep_inputs() -> None:
    """Keep the input widgets' values while another page (without them) is shown: Streamlit drops the
    state of widgets a run does not draw, unless the value is written back explicitly."""
    for key in PERSISTENT_KEYS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]
