"""The whole NSA attention of one layer on the kernels, in paper order (design.md, spec section 2.7).

1. compressed branch: o_cmp and its lse (interval kernel, MODE_CMP);
2. block selection: scores, remap, group sum, forced blocks and top-n in one kernel (select.py), from
   the lse config.slc_scores asks for (`reference.selection_lse`: the paper's, or shifted in PyTorch);
3. selected branch (selected.py), the forced blocks densely first (interval kernel, MODE_FORCED);
4. sliding window with the gated sum of Eq. 5 fused into its epilogue (window.py).
The sum's output is bit-identical with and without return_parts: the same fused launch produces o,
and return_parts only adds a separate window launch for o_win (a variant of the fused kernel that
also stored o_win would compile differently and could round o differently).
"""

from __future__ import annotations

import torch

from nsa_core.reference import NSAParts, selection_lse

from .common import check_qkv, forward_only, query_starts, resolve_scale
from .interval_attention import MODE_CMP, MODE_FORCED, MODE_WIN, interval_attention
from .select import _select, check_selection_config
from .selected import run_selected
from .window import window_gated_sum

# The forced blocks (the first init_blocks and the local_blocks ending at the query's own) are shared by
# neighbouring queries: attend to them in one dense interval-kernel launch (MODE_FORCED) whose softmax
# the selected branch merges in, instead of gathering them again for every query (False: gathered).
FORCED_DENSE = True


def nsa_attention(q, k, v, k_cmp, v_cmp, gates, *, config, scale=None, q_start=None, k_win=None, v_win=None,
                  return_parts=False):
    """q [B, TQ, HQ, Dk] (rotated), k/v [B, TK, H, D], k_cmp/v_cmp [B, Tc, H, D], gates [B, TQ, HQ, 3].

    k_win/v_win: the window branch's own keys and values (default k and v). q_start None means the
    queries are the last TQ of the TK keys. Returns o [B, TQ, HQ, Dv], or NSAParts when return_parts.
    """
    k_win = k if k_win is None else k_win
    v_win = v if v_win is None else v_win
    forward_only(q, k, v, k_cmp, v_cmp, gates, k_win, v_win)
    check_qkv(q, k, v)
    check_qkv(q, k_cmp, v_cmp, k_name="k_cmp", v_name="v_cmp")
    check_qkv(q, k_win, v_win, k_name="k_win", v_name="v_win")
    B, TQ, HQ, _ = q.shape
    if gates.shape != (B, TQ, HQ, 3):
        raise ValueError(f"gates must be [B, TQ, HQ, 3] = {(B, TQ, HQ, 3)}, got {tuple(gates.shape)}")
    if k_cmp.shape[2] != k.shape[2] or k_win.shape[1] != k.shape[1] or k_win.shape[2] != k.shape[2]:
        raise ValueError("k, k_cmp and k_win must have the same KV heads, and k_win the same length as k")
    c = config
    check_selection_config(c.cmp_block, c.cmp_stride, c.slc_block, c.top_n, c.init_blocks, c.local_blocks)
    scale = resolve_scale(q, scale)
    pos0 = query_starts(q_start, B, k.shape[1] - TQ, q.device)
    with torch.no_grad():
        # 1. compressed branch
        o_cmp, lse = interval_attention(q, k_cmp, v_cmp, pos0, mode=MODE_CMP, scale=scale, cmp_block=c.cmp_block,
                                        cmp_stride=c.cmp_stride, want_lse=True)
        # 2. top-n selection from the compressed branch's probabilities
        lse_slc = selection_lse(q, k_cmp, lse, config=c, scale=scale, q_start=pos0)
        block_idx = _select(q, k_cmp, lse_slc, pos0, cmp_block=c.cmp_block, cmp_stride=c.cmp_stride,
                            slc_block=c.slc_block, top_n=c.top_n, scale=scale, init_blocks=c.init_blocks,
                            local_blocks=c.local_blocks)
        # 3. selected branch
        forced = None
        if FORCED_DENSE and c.init_blocks + c.local_blocks > 0:
            o_f, lse_f = interval_attention(q, k, v, pos0, mode=MODE_FORCED, scale=scale, slc_block=c.slc_block,
                                            init_blocks=c.init_blocks, local_blocks=c.local_blocks, want_lse=True)
            forced = (o_f, lse_f, c.init_blocks, c.local_blocks)
        o_slc = run_selected(q, k, v, block_idx, pos0, slc_block=c.slc_block, scale=scale, forced=forced)
        # 4. sliding window, 5. gated sum
        o = window_gated_sum(q, k_win, v_win, gates, o_cmp, o_slc, pos0, window=c.window, scale=scale,
                             store_win=False)
        if not return_parts:
            return o
        o_win = interval_attention(q, k_win, v_win, pos0, mode=MODE_WIN, scale=scale, window=c.window)
    return NSAParts(o, o_cmp, o_slc, o_win, lse, block_idx, lse_slc)
