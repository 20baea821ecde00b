"""NSA Explorer, the Streamlit entry point: `nsa-explorer` (or `streamlit run app/streamlit_app.py`).

This file only sets the page up, restores the view from the URL, loads the session's model into the
sidebar's run panel and hands over to the chosen page.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run` puts app/ on sys.path, not the repository root; a source checkout that was never
# pip-installed still finds the `app` and `nsa_core` packages this way.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from app import inputs, session, state  # noqa: E402
from nsa_core import limits  # noqa: E402

st.set_page_config(page_title="NSA Explorer", page_icon=":material/grain:", layout="wide")
state.load_url_once()
inputs.keep_inputs()

PAGES = [
    st.Page("views/explorer.py", title="Explorer", icon=":material/grid_on:", default=True),
    st.Page("views/model.py", title="Model", icon=":material/memory:"),
    st.Page("views/gates.py", title="Gates", icon=":material/tune:"),
    st.Page("views/needle.py", title="Needle", icon=":material/search:"),
    st.Page("views/performance.py", title="Performance", icon=":material/speed:"),
]
page = st.navigation(PAGES, position="top")
for note in state.url_notes():
    st.toast(note, icon=":material/link_off:")
session.run_panel(session.open_model())
try:
    page.run()
except (limits.ContextTooLong, limits.DeviceOutOfMemory) as err:
    # Too long for this device, or out of memory anyway (memory already released): say so, keep serving.
    st.error(str(err), icon=":material/memory:")
