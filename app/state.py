"""The view state (checkpoint, layer, head, query, zoom, needle cell) and its permalink in the URL.

Every shareable choice lives in `st.session_state` under the names in `VIEW_KEYS`, so widgets bind to
it directly, and is mirrored into `st.query_params` so that a copied link reopens the same view.
Parsing is strict but forgiving: a malformed or out-of-range parameter is dropped with a note, and
the app opens with its default instead of failing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import streamlit as st

# Query parameter -> parser. zoom is "q_lo,q_hi,k_lo,k_hi" (half-open token ranges); tokens is the
# input length limit (session key max_tokens); len and depth are the needle page's cell.
VIEW_KEYS = ("ckpt", "tokens", "layer", "head", "query", "zoom", "len", "depth")
# URL name -> session state key, where they differ.
_SESSION_KEYS = {"tokens": "max_tokens"}
_URL_LOADED = "_url_loaded"
_URL_NOTES = "_url_notes"


@dataclass(frozen=True)
class Zoom:
    """A region of an attention map in tokens: queries [q_lo, q_hi), keys [k_lo, k_hi)."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int

    def __post_init__(self) -> None:
        if not (0 <= self.q_lo < self.q_hi and 0 <= self.k_lo < self.k_hi):
            raise ValueError(f"zoom needs 0 <= q_lo < q_hi and 0 <= k_lo < k_hi, got {self.as_tuple()}")

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.q_lo, self.q_hi, self.k_lo, self.k_hi)

    def to_param(self) -> str:
        return ",".join(str(v) for v in self.as_tuple())

    @classmethod
    def from_param(cls, text: str) -> Zoom:
        parts = text.split(",")
        if len(parts) != 4:
            raise ValueError(f"zoom must be four integers q_lo,q_hi,k_lo,k_hi, got {text!r}")
        return cls(*(int(p) for p in parts))

    @classmethod
    def from_box(cls, x_range, y_range, *, length: int) -> Zoom:
        """The token region of a box selection (x = keys, y = queries, in plot coordinates), clipped to
        the sequence; a box thinner than one token on either side widens to one token."""

        def span(lo_hi):
            lo, hi = sorted(float(v) for v in lo_hi)
            a = min(max(int(round(lo + 0.5)), 0), length - 1)
            b = min(max(int(round(hi + 0.5)), a + 1), length)
            return a, b

        q_lo, q_hi = span(y_range)
        k_lo, k_hi = span(x_range)
        return cls(q_lo, q_hi, k_lo, k_hi)


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _depth(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1], got {value}")
    return value


def _checkpoint(text: str) -> str:
    if not text or len(text) > 512:
        raise ValueError("must be a non-empty name of at most 512 characters")
    return text


def _tokens(text: str) -> int:
    value = int(text)
    if value < 2:
        raise ValueError(f"must be >= 2, got {value}")
    return value


_PARSERS = {
    "ckpt": _checkpoint,
    "tokens": _tokens,
    "layer": _nonnegative_int,
    "head": _nonnegative_int,
    "query": _nonnegative_int,
    "zoom": Zoom.from_param,
    "len": _nonnegative_int,
    "depth": _depth,
}


def parse_params(params: Mapping[str, str]) -> tuple[dict, list[str]]:
    """(valid view values, notes on the parameters that were dropped) from URL query parameters."""
    values, notes = {}, []
    for key, parse in _PARSERS.items():
        if key not in params:
            continue
        try:
            values[key] = parse(str(params[key]))
        except ValueError as err:
            notes.append(f"ignored URL parameter {key}={params[key]!r}: {err}")
    return values, notes


def encode_params(values: Mapping[str, object]) -> dict[str, str]:
    """URL query parameters for the view values that are set."""
    out = {}
    for key in VIEW_KEYS:
        value = values.get(key)
        if value is None:
            continue
        out[key] = value.to_param() if isinstance(value, Zoom) else str(value)
    return out


def load_url_once() -> None:
    """On a session's first run, copy the URL's view parameters into session state."""
    if st.session_state.get(_URL_LOADED):
        return
    values, notes = parse_params({k: st.query_params[k] for k in st.query_params})
    for key, value in values.items():
        st.session_state[_SESSION_KEYS.get(key, key)] = value
    st.session_state[_URL_NOTES] = notes
    st.session_state[_URL_LOADED] = True


def url_notes() -> list[str]:
    return list(st.session_state.get(_URL_NOTES, []))


def publish(keys: tuple[str, ...]) -> None:
    """Mirror the given view keys from session state into the URL (dropping those that are unset)."""
    wanted = encode_params({k: st.session_state.get(_SESSION_KEYS.get(k, k)) for k in keys})
    for key in keys:
        if key not in wanted and key in st.query_params:
            del st.query_params[key]
    for key, value in wanted.items():
        if st.query_params.get(key) != value:
            st.query_params[key] = value


def clamp(key: str, upper: int, default: int = 0) -> int:
    """The int view value `key` clamped to [0, upper) (default when unset), written back to the state."""
    value = st.session_state.get(key)
    value = default if not isinstance(value, int) else min(max(value, 0), max(upper - 1, 0))
    st.session_state[key] = value
    return value
