"""Sliding-window attention, optionally fused with the gated sum of the three branches (Eq. 5).

A query at t attends to raw keys [t - w + 1, t] (w tokens, itself included). With gates, the same
kernel reads o_cmp and o_slc and writes o = g_cmp o_cmp + g_slc o_slc + g_win o_win in one pass
(and o_win itself only when the caller keeps the parts). The kernel is `interval_attention` in
MODE_WIN; see that module for the tile layout, the shapes and dtypes tested and the limits.
"""

from __future__ import annotations

import torch

from .common import check_qkv, forward_only, query_starts, resolve_scale
from .interval_attention import MODE_WIN, interval_attention


def window_attention(q, k, v, *, window, scale=None, q_start=None):
    """q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv] -> o [B, TQ, HQ, Dv].

    q_start None means the queries are the last TQ of the TK keys.
    """
    forward_only(q, k, v)
    check_qkv(q, k, v)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    pos0 = query_starts(q_start, q.shape[0], k.shape[1] - q.shape[1], q.device)
    with torch.no_grad():
        return interval_attention(q, k, v, pos0, mode=MODE_WIN, scale=resolve_scale(q, scale), window=window)


def window_gated_sum(q, k, v, gates, o_cmp, o_slc, pos0, *, window, scale, store_win):
    """Window branch plus Eq. 5 in one launch: o, or (o, o_win) when store_win. gates [B, TQ, HQ, 3]."""
    return interval_attention(q, k, v, pos0, mode=MODE_WIN, scale=scale, window=window, gates=gates,
                              o_cmp=o_cmp, o_slc=o_slc, store_win=store_win)
