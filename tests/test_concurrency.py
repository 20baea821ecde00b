"""Many sessions, one cached model: concurrent traces of different texts each get their own correct
result, and the shared model is never mutated.

Streamlit runs every browser session's script in its own thread, and `app.cache.load_model` hands all
of them the same NSALM object; these tests reproduce that with threads calling the app's cached
runners, and with two AppTest sessions running at the same time.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from app import cache
from nsa_core import launch

TOKENS = 128  # AppTest sessions: short inputs keep a run to seconds on a 2-core CPU
APP = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")
TEXTS = (
    "def merge(a, b):\n    out = []\n    while a and b:\n        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))\n"
    "    return out + a + b\n" * 3,
    "The pass key is 71432. Remember it. The grass is green, the sky is blue, the sun is yellow. " * 3,
)


def model_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer, names included: any in-place change shows."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def trace_arrays(run: cache.TraceRun) -> list[np.ndarray]:
    return [run.trace.token_ids] + [getattr(layer, f) for layer in run.trace.layers
                                    for f in ("gates", "block_idx", "block_scores", "lse_cmp", "branch_norms")]


@pytest.fixture
def source() -> str:
    st.cache_data.clear()
    return cache.SAMPLE + cache.default_sample()


def test_concurrent_traces_match_single_threaded_runs_and_leave_the_model_untouched(source):
    loaded = cache.load_model(source, "cpu", "float32")
    before = model_checksum(loaded.model)
    # Each session traces its own text, at a different length in each round (so no round hits the cache).
    lengths = (128, 96)
    inputs = [[cache.encode_text(text, n)[0] for n in lengths] for text in TEXTS]
    assert inputs[0][0] != inputs[1][0]
    # Single-threaded answers, computed first, then dropped from the data cache.
    expected = [[trace_arrays(cache.trace_ids(source, "cpu", "float32", ids)) for ids in runs] for runs in inputs]
    st.cache_data.clear()

    start = threading.Barrier(len(TEXTS))
    results: dict[int, list] = {i: [] for i in range(len(TEXTS))}
    spans: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(TEXTS))}
    errors: list[BaseException] = []

    def session(i: int) -> None:
        try:
            for ids in inputs[i]:
                start.wait(timeout=60)
                t0 = time.perf_counter()
                results[i].append(cache.trace_ids(source, "cpu", "float32", ids))
                spans[i].append((t0, time.perf_counter()))
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    # The two traces really ran at the same time at least once.
    assert any(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in zip(spans[0], spans[1], strict=True))
    for i, runs in results.items():
        assert len(runs) == len(lengths)
        for run, want in zip(runs, expected[i], strict=True):
            got = trace_arrays(run)
            assert len(got) == len(want)
            for g, e in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, e)
    assert model_checksum(loaded.model) == before
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert cache.load_model(source, "cpu", "float32").model is loaded.model  # one shared object


def _explorer_session(text: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["text_kind"] = "Paste"
    at.session_state["text_paste"] = text
    at.session_state["max_tokens"] = TOKENS
    return at


def test_two_app_sessions_tracing_different_texts_at_once_each_see_their_own(source, monkeypatch):
    monkeypatch.delenv(launch.ENV_CHECKPOINT, raising=False)
    monkeypatch.setenv(launch.ENV_DEVICE, "cpu")
    loaded = cache.load_model(source, "cpu", "float32")
    before = model_checksum(loaded.model)
    texts = (TEXTS[0][:100], TEXTS[1][:60])  # different lengths, so each session's token count is its own
    sessions = [_explorer_session(text) for text in texts]
    errors: list[BaseException] = []

    def run(at: AppTest) -> None:
        try:
            at.run()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(at,)) for at in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for at, text in zip(sessions, texts, strict=True):
        assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
        ids, _ = cache.encode_text(text, TOKENS)
        tokens = next(m for m in at.metric if m.label == "Tokens")
        assert tokens.value == f"{len(ids):,}"
        # The session's trace is the one of its own text.
        run = cache.trace_ids(source, "cpu", "float32", ids)
        assert run.trace.token_ids.tolist() == list(ids)
    assert model_checksum(loaded.model) == before
