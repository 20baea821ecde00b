"""NSA attention in readable PyTorch: the ground truth for the Triton kernels and the source of the trace.

Legend: B batch, TQ queries, TK keys, HQ query heads, H KV heads, G = HQ // H query heads per KV head,
Dk query/key dim, Dv value dim, Tc compressed tokens, Ns selection blocks, n top-n, w window.
Layout is [B, T, H, D] everywhere. Index rules live in `masks.py`.

Every function takes `q_start`, the absolute position of the first query (an int or a [B] tensor).
For the functions over raw keys, None means the queries are the last TQ of the TK keys; for the
compressed ones, which cannot infer TK from k_cmp, None means the queries start at position 0.

The math runs in float32 (float64 stays float64) and in chunks of queries, so that an 8k-token
forward on a CPU stays within a few hundred MB per call; outputs come back in q's dtype, lse in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import masks

# Score elements one chunk of queries may hold; bounds memory independently of T.
_CHUNK_ELEMENTS = 1 << 24
# Gathered key/value elements per chunk in selected_attention (measured fastest on a 2-core CPU).
_GATHER_ELEMENTS = 1 << 21

# Below this share of a head's importance on blocks that are not forced, slc_scores "free" gives the head
# no vote: 1 - share is then float32 rounding (a sum of ~10 terms near 1), which the renormalisation
# would blow up into a full vote.
MIN_FREE_SHARE = 1e-5


def compressed_attention(q, k_cmp, v_cmp, *, cmp_block, cmp_stride, scale=None, q_start=None):
    """Attention of each query over the compressed tokens whose whole window lies in its past.

    q [B, TQ, HQ, Dk], k_cmp [B, Tc, H, Dk], v_cmp [B, Tc, H, Dv]
    -> o [B, TQ, HQ, Dv] (q.dtype), lse [B, TQ, HQ] (float32; -inf where the query sees no compressed token).

    A query at t sees compressed token i iff i*d + l - 1 <= t. Rows that see none return 0 and get
    zero gradient, never NaN.
    """
    B, TQ, HQ, _ = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    G = _group_size(HQ, H)
    scale = _scale(q, scale)
    pos = masks.query_positions(q_start, B, TQ, 0, q.device)  # [B, TQ]
    visible = masks.visible_compressed(pos, cmp_block, cmp_stride)  # [B, TQ]
    kc, vc = _compute_dtype(k_cmp), _compute_dtype(v_cmp)
    o_chunks, lse_chunks = [], []
    for lo, hi in _chunks(TQ, HQ * max(Tc, 1)):
        qc = _compute_dtype(q[:, lo:hi]).unflatten(2, (H, G))  # [B, C, H, G, Dk]
        scores = torch.einsum("bqhgd,bkhd->bqhgk", qc, kc) * scale  # [B, C, H, G, Tc]
        mask = torch.arange(Tc, device=q.device) < visible[:, lo:hi, None]  # [B, C, Tc]
        p, lse = _masked_softmax(scores, mask[:, :, None, None, :])
        o_chunks.append(torch.einsum("bqhgk,bkhd->bqhgd", p, vc).flatten(2, 3))  # [B, C, HQ, Dv]
        lse_chunks.append(lse.flatten(2, 3))  # [B, C, HQ]
    o = torch.cat(o_chunks, 1) if o_chunks else q.new_zeros(B, 0, HQ, v_cmp.shape[-1])
    lse = torch.cat(lse_chunks, 1) if lse_chunks else q.new_zeros(B, 0, HQ)
    return o.to(q.dtype), lse.float()


def importance_scores(q, k_cmp, lse, *, cmp_block, cmp_stride, slc_block, scale=None, q_start=None, num_slc=None):
    """Block importance p_slc' of Eq. 8-10: compressed probabilities, remapped, summed over the group.

    q [B, TQ, HQ, Dk], k_cmp [B, Tc, H, Dk], lse [B, TQ, HQ] from `compressed_attention`
    -> scores [B, TQ, H, Ns] (float32), with Ns = num_slc or enough blocks for the last query.

    p_cmp = exp(q . k_cmp * scale - lse) over the visible compressed tokens (0 elsewhere and on empty
    rows); Eq. 9 as the overlap-weighted remap p_slc[j] = sum_i p_cmp[i] |C_i ∩ S_j| / d; Eq. 10 sums
    over the G query heads of each KV head. No gradient flows through the scores.
    """
    B, TQ, HQ, _ = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    G = _group_size(HQ, H)
    scale = _scale(q, scale)
    pos = masks.query_positions(q_start, B, TQ, 0, q.device)  # [B, TQ]
    if num_slc is None:
        num_slc = int(pos.max()) // slc_block + 1 if pos.numel() else 0
    visible = masks.visible_compressed(pos, cmp_block, cmp_stride)  # [B, TQ]
    weights = masks.overlap_weights(Tc, num_slc, cmp_block=cmp_block, cmp_stride=cmp_stride, slc_block=slc_block,
                                    dtype=torch.float32, device=q.device)  # [Tc, Ns]
    kc = k_cmp.detach().float()
    out = []
    for lo, hi in _chunks(TQ, HQ * max(Tc, num_slc, 1)):
        qc = q[:, lo:hi].detach().float().unflatten(2, (H, G))  # [B, C, H, G, Dk]
        scores = torch.einsum("bqhgd,bkhd->bqhgk", qc, kc) * scale  # [B, C, H, G, Tc]
        row_lse = lse[:, lo:hi].detach().float().unflatten(2, (H, G))[..., None]  # [B, C, H, G, 1]
        mask = (torch.arange(Tc, device=q.device) < visible[:, lo:hi, None])[:, :, None, None, :]
        p_cmp = torch.where(mask & torch.isfinite(row_lse), torch.exp(scores - row_lse), 0.0)
        p_slc = p_cmp @ weights  # [B, C, H, G, Ns]
        out.append(p_slc.sum(3))  # [B, C, H, Ns]
    return torch.cat(out, 1) if out else q.new_zeros(B, 0, H, num_slc, dtype=torch.float32)


def forced_token_counts(*, cmp_block, cmp_stride, slc_block, init_blocks, local_blocks) -> tuple[int, int]:
    """(compressed tokens starting inside the initial forced blocks, the most that overlap a query's local
    forced blocks): the tokens `forced_share` reads per query."""
    n_init = -(-init_blocks * slc_block // cmp_stride)
    n_local = local_blocks * slc_block // cmp_stride + cmp_block // cmp_stride
    return n_init, n_local


def forced_share(q, k_cmp, lse, *, cmp_block, cmp_stride, slc_block, init_blocks, local_blocks, scale=None,
                 q_start=None):
    """The share of each query head's block importance (Eq. 9, before the group sum) on its forced blocks.

    q [B, TQ, HQ, Dk], k_cmp [B, Tc, H, Dk], lse [B, TQ, HQ] -> [B, TQ, HQ] in [0, 1] (0 on empty rows).
    Compressed token i gives the blocks it overlaps weights summing to l / d, so a head's importance over
    all blocks is l / d; only the tokens overlapping a forced block (the first init_blocks, or the
    local_blocks ending at the query's) are read: at most l'/d * init_blocks + l'/d * local_blocks + l/d.
    """
    B, TQ, HQ, Dk = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    G = _group_size(HQ, H)
    scale = _scale(q, scale)
    l, d, ls = cmp_block, cmp_stride, slc_block
    pos = masks.query_positions(q_start, B, TQ, 0, q.device)  # [B, TQ]
    visible = masks.visible_compressed(pos, l, d)  # [B, TQ]
    init_end = init_blocks * ls  # forced range A = [0, init_end)
    local_lo = ((pos // ls - local_blocks + 1).clamp_min(0) * ls)[..., None]  # forced range B = [local_lo, local_hi)
    local_hi = (pos // ls + 1)[..., None] * ls
    n_init, n_local = forced_token_counts(cmp_block=l, cmp_stride=d, slc_block=ls, init_blocks=init_blocks,
                                          local_blocks=local_blocks)
    n_init = min(Tc, n_init)
    first = torch.maximum(torch.div(local_lo - l, d, rounding_mode="floor") + 1, torch.full_like(local_lo, n_init))
    tokens = torch.cat([torch.arange(n_init, device=q.device).expand(B, TQ, n_init),
                        first + torch.arange(n_local, device=q.device)], -1)  # [B, TQ, K], no token twice
    live = tokens < visible[..., None]
    start, end = tokens * d, tokens * d + l
    # Overlap with A ∪ B = A + B - A ∩ B (they meet when the local blocks reach back to the initial ones).
    zero, a_end = torch.zeros_like(local_lo), torch.full_like(local_lo, init_end)
    weight = (masks.span_overlap(start, end, zero, a_end) + masks.span_overlap(start, end, local_lo, local_hi)
              - masks.span_overlap(start, end, local_lo, torch.minimum(local_hi, a_end)))
    weight = torch.where(live, weight.float() / l, 0.0)  # [B, TQ, K], share of the token's l / d in A ∪ B
    tokens = tokens.clamp(0, max(Tc - 1, 0))
    kc = k_cmp.detach().float()
    out = []
    for lo, hi in _chunks(TQ, tokens.shape[-1] * HQ * Dk):
        keys = kc[torch.arange(B, device=q.device)[:, None, None], tokens[:, lo:hi]] if Tc else \
            kc.new_zeros(B, hi - lo, tokens.shape[-1], H, Dk)  # [B, C, K, H, Dk]
        qc = q[:, lo:hi].detach().float().unflatten(2, (H, G))  # [B, C, H, G, Dk]
        s = torch.einsum("bchgd,bckhd->bchgk", qc, keys) * scale
        row_lse = lse[:, lo:hi].detach().float().unflatten(2, (H, G))[..., None]  # [B, C, H, G, 1]
        p = torch.where(torch.isfinite(row_lse), torch.exp(s - row_lse), 0.0)
        out.append((p * weight[:, lo:hi, None, None, :]).sum(-1).flatten(2))  # [B, C, HQ]
    return torch.cat(out, 1).clamp(0.0, 1.0) if out else q.new_zeros(B, 0, HQ, dtype=torch.float32)


def selection_lse(q, k_cmp, lse, *, config, scale=None, q_start=None):
    """The lse the block scores are computed with: config.slc_scores "paper" gives lse itself (Eq. 8-10).

    "free" renormalises each query head's importance over the blocks that are not forced, before the
    group sum: a head whose compressed attention sits on the always-selected blocks (the query's own
    text, for instance) still casts a whole vote on the blocks that compete. Dividing p = exp(s - lse)
    by the free share is a shift of lse: lse + log(1 - forced share). A head with at most MIN_FREE_SHARE
    free casts no vote (lse -inf): that little is float32 rounding of the forced mass, not attention.
    """
    if config.slc_scores == "paper":
        return lse
    share = forced_share(q, k_cmp, lse, cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
                         slc_block=config.slc_block, init_blocks=config.init_blocks,
                         local_blocks=config.local_blocks, scale=scale, q_start=q_start)
    free = 1.0 - share
    return torch.where(free > MIN_FREE_SHARE, lse.float() + torch.log(free.clamp_min(MIN_FREE_SHARE)), -torch.inf)


def top_n_blocks(scores, pos, *, slc_block, top_n, init_blocks=1, local_blocks=2):
    """Top-n selection over block scores with forced blocks and causality.

    scores [B, TQ, H, Ns], pos [B, TQ] absolute query positions -> block_idx [B, TQ, H, n] int32,
    valid ids ascending, -1 padding at the end.

    Blocks after the query's own block c = t // l' are never chosen; blocks 0..init_blocks-1 and
    c-local_blocks+1..c always are. Ties go to the lower block id (a stable sort), so the result is
    deterministic; other implementations may break ties differently.
    """
    num_slc = scores.shape[-1]
    current = (pos // slc_block)[:, :, None, None]  # [B, TQ, 1, 1]
    j = torch.arange(num_slc, device=scores.device)
    forced = masks.forced_blocks(pos, slc_block=slc_block, init_blocks=init_blocks, local_blocks=local_blocks,
                                 num_slc=num_slc)[:, :, None, :]  # [B, TQ, 1, Ns]
    if not torch.isfinite(scores[(j <= current).expand_as(scores)]).all():
        raise ValueError("block importance scores must be finite; got NaN or inf")
    ranked = torch.where(forced, math.inf, scores)
    ranked = torch.where(j > current, -math.inf, ranked)
    k = min(top_n, num_slc)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :k]  # [B, TQ, H, k]
    chosen_valid = torch.gather(ranked, -1, order) > -math.inf
    # Ascending valid ids, then -1: sort with invalid slots pushed past every real id.
    ids = torch.where(chosen_valid, order, num_slc).sort(-1).values
    ids = torch.where(ids == num_slc, -1, ids)
    if k < top_n:
        ids = torch.cat([ids, ids.new_full((*ids.shape[:-1], top_n - k), -1)], -1)
    return ids.to(torch.int32)


def select_blocks(q, k_cmp, lse, *, cmp_block, cmp_stride, slc_block, top_n, scale=None, q_start=None,
                  init_blocks=1, local_blocks=2):
    """Eq. 8-12: the n selection blocks each KV head attends to, per query.

    q [B, TQ, HQ, Dk], k_cmp [B, Tc, H, Dk], lse [B, TQ, HQ] -> block_idx [B, TQ, H, n] int32
    (valid ids ascending, -1 padding at the end). See `importance_scores` and `top_n_blocks`.
    """
    B, TQ = q.shape[:2]
    pos = masks.query_positions(q_start, B, TQ, 0, q.device)
    scores = importance_scores(q, k_cmp, lse, cmp_block=cmp_block, cmp_stride=cmp_stride, slc_block=slc_block,
                               scale=scale, q_start=q_start)
    return top_n_blocks(scores, pos, slc_block=slc_block, top_n=top_n, init_blocks=init_blocks,
                        local_blocks=local_blocks)


def selected_attention(q, k, v, block_idx, *, slc_block, scale=None, q_start=None):
    """Attention of each query over the tokens of its KV head's selected blocks, causally masked.

    q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv], block_idx [B, TQ, H, n] int (-1 = empty slot;
    valid ids unique) -> o [B, TQ, HQ, Dv]. A query at t attends to tokens s of its blocks with s <= t.
    """
    B, TQ, HQ, _ = q.shape
    TK, H = k.shape[1], k.shape[2]
    G = _group_size(HQ, H)
    n = block_idx.shape[-1]
    scale = _scale(q, scale)
    pos = masks.query_positions(q_start, B, TQ, TK - TQ, q.device)  # [B, TQ]
    k_blocks, v_blocks = _as_blocks(_compute_dtype(k), slc_block), _as_blocks(_compute_dtype(v), slc_block)
    num_slc = k_blocks.shape[2]
    offsets = torch.arange(slc_block, device=q.device)
    batch = torch.arange(B, device=q.device)[:, None, None, None]
    head = torch.arange(H, device=q.device)[None, None, :, None]
    outs = []
    # The gathered keys and values dominate memory here; small chunks also keep them in cache.
    gathered = H * n * slc_block * (k.shape[-1] + v.shape[-1] + G)
    for lo, hi in _chunks(TQ, gathered, budget=_GATHER_ELEMENTS):
        idx = block_idx[:, lo:hi].long()  # [B, C, H, n]
        if (idx >= num_slc).any():
            raise ValueError(f"block_idx holds a block id >= {num_slc}, past the last of {TK} keys")
        tok = (idx[..., None] * slc_block + offsets).flatten(-2)  # [B, C, H, n*l']
        valid = (idx >= 0).repeat_interleave(slc_block, -1) & (tok <= pos[:, lo:hi, None, None]) & (tok < TK)
        # Gather whole blocks (l' contiguous rows each) rather than single tokens: same data, far fewer indices.
        k_sel = k_blocks[batch, head, idx.clamp_min(0)].flatten(3, 4)  # [B, C, H, n*l', Dk]
        v_sel = v_blocks[batch, head, idx.clamp_min(0)].flatten(3, 4)  # [B, C, H, n*l', Dv]
        qc = _compute_dtype(q[:, lo:hi]).unflatten(2, (H, G))  # [B, C, H, G, Dk]
        scores = torch.einsum("bqhgd,bqhkd->bqhgk", qc, k_sel) * scale  # [B, C, H, G, n*l']
        p, _ = _masked_softmax(scores, valid[:, :, :, None, :])
        outs.append(torch.einsum("bqhgk,bqhkd->bqhgd", p, v_sel).flatten(2, 3))  # [B, C, HQ, Dv]
    o = torch.cat(outs, 1) if outs else q.new_zeros(B, 0, HQ, v.shape[-1])
    return o.to(q.dtype)


def window_attention(q, k, v, *, window, scale=None, q_start=None):
    """Sliding-window attention: a query at t attends to keys [t - w + 1, t] (w tokens, itself included).

    q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv] -> o [B, TQ, HQ, Dv].
    """
    B, TQ, HQ, _ = q.shape
    TK, H = k.shape[1], k.shape[2]
    G = _group_size(HQ, H)
    scale = _scale(q, scale)
    pos = masks.query_positions(q_start, B, TQ, TK - TQ, q.device)  # [B, TQ]
    kf, vf = _compute_dtype(k), _compute_dtype(v)
    outs = []
    # Chunks of at most w queries keep the key range (chunk + w) proportional to the window.
    for lo, hi in _chunks(TQ, HQ * 2 * window, max_size=window):
        chunk_pos = pos[:, lo:hi]  # [B, C]
        k_lo = max(int(chunk_pos.min()) - window + 1, 0)
        k_hi = min(int(chunk_pos.max()) + 1, TK)
        key_pos = torch.arange(k_lo, k_hi, device=q.device)  # [S]
        delta = pos[:, lo:hi, None] - key_pos  # [B, C, S]
        mask = (delta >= 0) & (delta < window)
        qc = _compute_dtype(q[:, lo:hi]).unflatten(2, (H, G))  # [B, C, H, G, Dk]
        scores = torch.einsum("bqhgd,bkhd->bqhgk", qc, kf[:, k_lo:k_hi]) * scale  # [B, C, H, G, S]
        p, _ = _masked_softmax(scores, mask[:, :, None, None, :])
        outs.append(torch.einsum("bqhgk,bkhd->bqhgd", p, vf[:, k_lo:k_hi]).flatten(2, 3))  # [B, C, HQ, Dv]
    o = torch.cat(outs, 1) if outs else q.new_zeros(B, 0, HQ, v.shape[-1])
    return o.to(q.dtype)


class NSAParts(NamedTuple):
    """Everything one NSA call computed; what the trace records and the gated sum consumes."""

    o: torch.Tensor  # [B, TQ, HQ, Dv] gated sum
    o_cmp: torch.Tensor  # [B, TQ, HQ, Dv]
    o_slc: torch.Tensor  # [B, TQ, HQ, Dv]
    o_win: torch.Tensor  # [B, TQ, HQ, Dv]
    lse_cmp: torch.Tensor  # [B, TQ, HQ] float32
    block_idx: torch.Tensor  # [B, TQ, H, n] int32
    lse_slc: torch.Tensor  # [B, TQ, HQ] the lse the block scores used (`selection_lse`; lse_cmp under "paper")


def gated_sum(gates, o_cmp, o_slc, o_win):
    """Eq. 5: o = g_cmp o_cmp + g_slc o_slc + g_win o_win per query head; gates [B, TQ, HQ, 3]."""
    g = gates.to(o_cmp.dtype)
    return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win


def nsa_attention(q, k, v, k_cmp, v_cmp, gates, *, config, scale=None, q_start=None, k_win=None, v_win=None,
                  return_parts=False):
    """The whole NSA attention of one layer (paper section 2.7 of our spec), in paper order.

    q [B, TQ, HQ, Dk] (rotated), k/v [B, TK, H, D] for the selection branch (k rotated),
    k_cmp/v_cmp [B, Tc, H, D] compressed tokens, gates [B, TQ, HQ, 3] in (cmp, slc, win) order.
    k_win/v_win: the window branch's own keys and values when config.kv_mode == "independent"
    (default: k and v). Returns o [B, TQ, HQ, Dv], or NSAParts when return_parts.
    """
    TQ, TK = q.shape[1], k.shape[1]
    if q_start is None:
        q_start = TK - TQ
    k_win = k if k_win is None else k_win
    v_win = v if v_win is None else v_win
    # 1. compressed branch
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
                                      scale=scale, q_start=q_start)
    # 2. top-n selection from the compressed branch's probabilities
    lse_slc = selection_lse(q, k_cmp, lse, config=config, scale=scale, q_start=q_start)
    block_idx = select_blocks(q, k_cmp, lse_slc, cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
                              slc_block=config.slc_block, top_n=config.top_n, scale=scale, q_start=q_start,
                              init_blocks=config.init_blocks, local_blocks=config.local_blocks)
    # 3. selected branch
    o_slc = selected_attention(q, k, v, block_idx, slc_block=config.slc_block, scale=scale, q_start=q_start)
    # 4. sliding window
    o_win = window_attention(q, k_win, v_win, window=config.window, scale=scale, q_start=q_start)
    # 5. gated sum
    o = gated_sum(gates, o_cmp, o_slc, o_win)
    if return_parts:
        return NSAParts(o, o_cmp, o_slc, o_win, lse, block_idx, lse_slc)
    return o


def dense_attention(q, k, v, *, scale=None, q_start=None):
    """Full causal attention (the dense twin and the "dense" side of every comparison).

    q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv] -> o [B, TQ, HQ, Dv]; a query at t sees 0..t.
    """
    TK = k.shape[1]
    return window_attention(q, k, v, window=max(TK, 1), scale=scale, q_start=q_start)


# helpers ---------------------------------------------------------------------------------------


def _masked_softmax(scores, mask):
    """Softmax over the last dim restricted to mask; all-masked rows give p = 0 and lse = -inf, no NaN.

    The row max is a numerical shift only, so it is detached; the denominator is clamped so that an
    empty row divides 0 by a positive number and its gradient stays 0.
    """
    if scores.shape[-1] == 0:
        return scores, scores.new_full(scores.shape[:-1], -math.inf)
    masked = scores.masked_fill(~mask, -math.inf)
    row_max = masked.amax(-1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
    e = torch.exp(masked - shift)
    denom = e.sum(-1, keepdim=True)
    p = e / denom.clamp_min(torch.finfo(e.dtype).tiny)
    lse = torch.where(denom > 0, shift + torch.log(denom.clamp_min(torch.finfo(e.dtype).tiny)), -math.inf)
    return p, lse.squeeze(-1)


def _chunks(total, per_query, max_size=None, budget=None):
    """Split range(total) into chunks of queries holding about `budget` (default _CHUNK_ELEMENTS) elements."""
    size = max(1, (budget or _CHUNK_ELEMENTS) // max(per_query, 1))
    if max_size is not None:
        size = max(1, min(size, max_size))
    return [(lo, min(lo + size, total)) for lo in range(0, total, size)]


def _as_blocks(x, block):
    """x [B, T, H, D] -> [B, H, Ns, block, D], zero-padded to whole blocks."""
    B, T, H, D = x.shape
    pad = -T % block
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, H, D)], 1)
    return x.unflatten(1, (-1, block)).permute(0, 3, 1, 2, 4).contiguous()


def _group_size(hq, h):
    if h == 0 or hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    return hq // h


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


def _compute_dtype(x):
    return x if x.dtype == torch.float64 else x.float()
