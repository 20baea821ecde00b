"""Float64 brute-force NSA, written from the paper's rules as plainly as possible.

Independent of nsa_core on purpose (no masks, no reference): every rule is restated here from the
spec, so a mistake in nsa_core's index math cannot hide by being shared. Speed does not matter beyond
keeping the tests small: masks are dense [TQ, TK] booleans, attention is one matmul per (batch, head),
and top-n is a Python loop.

Legend: B batch, TQ queries, TK keys, HQ query heads, H KV heads, G = HQ // H, Tc compressed tokens,
Ns selection blocks. Every function takes the absolute query positions q_pos [B, TQ] explicitly.
"""

from __future__ import annotations

import functools
import math

import torch


def positions(batch: int, num_q: int, start) -> torch.Tensor:
    """q_pos [B, TQ]: start is an int or a [B] tensor of first positions."""
    start = torch.as_tensor(start, dtype=torch.long).reshape(-1, 1).expand(batch, 1)
    return start + torch.arange(num_q)


def masked_attention(q, k, v, allowed, scale):
    """Softmax attention where allowed [B, TQ, H, TK] (per KV head) says which keys each query may use.

    q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv] -> o [B, TQ, HQ, Dv], lse [B, TQ, HQ] (float64).
    A row with no allowed key gets o = 0 and lse = -inf.
    """
    B, TQ, HQ, _ = q.shape
    H = k.shape[2]
    G = HQ // H
    o = torch.zeros(B, TQ, HQ, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, TQ, HQ), -math.inf, dtype=torch.float64)
    for b in range(B):
        for hq in range(HQ):
            h = hq // G  # query head hq reads KV head h
            scores = q[b, :, hq].double() @ k[b, :, h].double().T * scale  # [TQ, TK]
            mask = allowed[b, :, h]  # [TQ, TK]
            scores = scores.masked_fill(~mask, -math.inf)
            seen = mask.any(-1)  # [TQ]
            row_lse = torch.logsumexp(scores[seen], -1)
            p = torch.exp(scores[seen] - row_lse[:, None])
            o[b, seen, hq] = p @ v[b, :, h].double()
            lse[b, seen, hq] = row_lse
    return o, lse


# Compressed branch (Eq. 7-8) --------------------------------------------------------------------


def compressed_visibility(q_pos, num_cmp, cmp_block, cmp_stride):
    """Bool [B, TQ, Tc]: compressed token i covers [i*d, i*d + l - 1]; t sees it iff its last token <= t."""
    last_token = torch.arange(num_cmp) * cmp_stride + cmp_block - 1  # [Tc]
    return last_token <= q_pos[:, :, None]


def compressed_attention(q, k_cmp, v_cmp, q_pos, *, cmp_block, cmp_stride, scale):
    """-> o [B, TQ, HQ, Dv], lse [B, TQ, HQ] (float64; -inf and o = 0 where no compressed token is visible)."""
    H = k_cmp.shape[2]
    visible = compressed_visibility(q_pos, k_cmp.shape[1], cmp_block, cmp_stride)  # [B, TQ, Tc]
    return masked_attention(q, k_cmp, v_cmp, visible[:, :, None, :].expand(-1, -1, H, -1), scale)


def compressed_probabilities(q, k_cmp, q_pos, *, cmp_block, cmp_stride, scale):
    """p_cmp [B, TQ, HQ, Tc] of Eq. 8 (rows with nothing visible are all zero)."""
    B, TQ, HQ, _ = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // H
    visible = compressed_visibility(q_pos, Tc, cmp_block, cmp_stride)  # [B, TQ, Tc]
    p = torch.zeros(B, TQ, HQ, Tc, dtype=torch.float64)
    for b in range(B):
        for hq in range(HQ):
            scores = q[b, :, hq].double() @ k_cmp[b, :, hq // G].double().T * scale  # [TQ, Tc]
            scores = scores.masked_fill(~visible[b], -math.inf)
            seen = visible[b].any(-1)
            p[b, seen, hq] = torch.softmax(scores[seen], -1)
    return p


# Importance and top-n (Eq. 9-12) ----------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _remap(num_cmp, num_slc, cmp_block, cmp_stride, slc_block):
    weights = torch.zeros(num_cmp, num_slc, dtype=torch.float64)
    for i in range(num_cmp):
        window = set(range(i * cmp_stride, i * cmp_stride + cmp_block))
        for j in range(num_slc):
            block = set(range(j * slc_block, (j + 1) * slc_block))
            weights[i, j] = len(window & block) / cmp_stride
    return weights


def remap_matrix(num_cmp, num_slc, *, cmp_block, cmp_stride, slc_block):
    """W [Tc, Ns] of the overlap-weighted Eq. 9: W[i, j] = |tokens of window i ∩ tokens of block j| / d."""
    return _remap(num_cmp, num_slc, cmp_block, cmp_stride, slc_block).clone()


def importance(q, k_cmp, q_pos, *, cmp_block, cmp_stride, slc_block, num_slc, scale):
    """p_slc' [B, TQ, H, Ns]: p_cmp remapped to selection blocks (Eq. 9), summed over each group (Eq. 10)."""
    B, TQ, HQ, _ = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    p_cmp = compressed_probabilities(q, k_cmp, q_pos, cmp_block=cmp_block, cmp_stride=cmp_stride, scale=scale)
    p_slc = p_cmp @ remap_matrix(Tc, num_slc, cmp_block=cmp_block, cmp_stride=cmp_stride, slc_block=slc_block)
    return p_slc.reshape(B, TQ, H, HQ // H, num_slc).sum(3)


def free_importance(q, k_cmp, q_pos, *, cmp_block, cmp_stride, slc_block, num_slc, scale, init_blocks,
                    local_blocks, min_free=1e-5):
    """slc_scores "free": each head's Eq. 9 importance divided by its share on blocks that are not forced
    (a head with at most `min_free` of it free counts 0), then summed over each group: [B, TQ, H, Ns]."""
    B, TQ, HQ, _ = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    p_cmp = compressed_probabilities(q, k_cmp, q_pos, cmp_block=cmp_block, cmp_stride=cmp_stride, scale=scale)
    p_slc = p_cmp @ remap_matrix(Tc, num_slc, cmp_block=cmp_block, cmp_stride=cmp_stride, slc_block=slc_block)
    for b in range(B):
        for i in range(TQ):
            t = int(q_pos[b, i])
            free = [j for j in range(num_slc) if j not in forced(t, slc_block=slc_block, init_blocks=init_blocks,
                                                                 local_blocks=local_blocks)]
            for hq in range(HQ):
                total, free_mass = float(p_slc[b, i, hq].sum()), float(p_slc[b, i, hq, free].sum())
                p_slc[b, i, hq] *= total / free_mass if free_mass > min_free * total else 0.0
    return p_slc.reshape(B, TQ, H, HQ // H, num_slc).sum(3)


def forced(t, *, slc_block, init_blocks, local_blocks):
    """Blocks a query at t always selects: the first init_blocks and the local_blocks ending at its own."""
    current = t // slc_block
    chosen = set(range(init_blocks)) | {current - m for m in range(local_blocks)}
    return {j for j in chosen if 0 <= j <= current}


def top_n(scores, q_pos, *, slc_block, top_n, init_blocks, local_blocks):
    """Selected block sets: list over (b, t, h) in row-major order of sets of block ids.

    Candidates are blocks 0..t // l'; forced blocks are in; the rest of the n slots go to the highest
    scores, ties to the lower id.
    """
    B, TQ, H, _ = scores.shape
    result = []
    for b in range(B):
        for i in range(TQ):
            t = int(q_pos[b, i])
            must = forced(t, slc_block=slc_block, init_blocks=init_blocks, local_blocks=local_blocks)
            for h in range(H):
                others = [j for j in range(t // slc_block + 1) if j not in must]
                others.sort(key=lambda j: (-float(scores[b, i, h, j]), j))
                result.append(must | set(others[: max(top_n - len(must), 0)]))
    return result


# Selected and window branches ---------------------------------------------------------------------


def selected_attention(q, k, v, block_idx, q_pos, *, slc_block, scale):
    """Attention over the tokens s <= t of the selected blocks; block_idx [B, TQ, H, n], -1 = empty slot."""
    TK = k.shape[1]
    key_block = torch.arange(TK) // slc_block  # [TK]
    in_selected = (block_idx[..., None] == key_block).any(-2)  # [B, TQ, H, TK]; -1 matches no block
    causal = torch.arange(TK) <= q_pos[:, :, None]  # [B, TQ, TK]
    return masked_attention(q, k, v, in_selected & causal[:, :, None, :], scale)[0]


def window_attention(q, k, v, q_pos, *, window, scale):
    """Attention over keys s with t - w < s <= t: w tokens, the query included."""
    H = k.shape[2]
    s = torch.arange(k.shape[1])
    t = q_pos[:, :, None]
    allowed = (s <= t) & (s > t - window)  # [B, TQ, TK]
    return masked_attention(q, k, v, allowed[:, :, None, :].expand(-1, -1, H, -1), scale)[0]


def dense_attention(q, k, v, q_pos, *, scale):
    """Full causal attention: t sees keys 0..t."""
    return window_attention(q, k, v, q_pos, window=k.shape[1] + 1, scale=scale)
