"""Compressed-branch attention (paper Eq. 7 with causal visibility) on the interval kernel.

o [B, TQ, HQ, Dv] and lse [B, TQ, HQ] (float32) of each query over the compressed tokens whose whole
window lies in its past: token i is visible at position t iff i*d + l - 1 <= t. Rows that see none
get o = 0 and lse = -inf. The kernel is `interval_attention` in MODE_CMP; see that module for the
tile layout, the shapes and dtypes tested and the limits.
"""

from __future__ import annotations

import torch

from .common import check_qkv, forward_only, query_starts, resolve_scale
from .interval_attention import MODE_CMP, interval_attention


def compressed_attention(q, k_cmp, v_cmp, *, cmp_block, cmp_stride, scale=None, q_start=None):
    """q [B, TQ, HQ, Dk], k_cmp [B, Tc, H, Dk], v_cmp [B, Tc, H, Dv] -> (o [B, TQ, HQ, Dv], lse [B, TQ, HQ]).

    q_start: absolute position of the first query (int or [B] tensor); None means 0, since the
    number of raw keys cannot be inferred from k_cmp.
    """
    forward_only(q, k_cmp, v_cmp)
    check_qkv(q, k_cmp, v_cmp, k_name="k_cmp", v_name="v_cmp")
    if cmp_block < 1 or cmp_stride < 1:
        raise ValueError(f"cmp_block ({cmp_block}) and cmp_stride ({cmp_stride}) must be >= 1")
    pos0 = query_starts(q_start, q.shape[0], 0, q.device)
    with torch.no_grad():
        return interval_attention(q, k_cmp, v_cmp, pos0, mode=MODE_CMP, scale=resolve_scale(q, scale),
                                  cmp_block=cmp_block, cmp_stride=cmp_stride, want_lse=True)
