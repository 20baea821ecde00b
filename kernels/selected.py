"""Selected-block attention (Eq. 11-12), the paper's group-centric kernel.

Each query at t attends, per KV head h, to the tokens s <= t of the blocks block_idx[b, t, h, :]
(-1 slots skipped; valid ids unique). One program owns one query and the G query heads of one KV
head (paper Fig. 3: group-centric loading, shared KV fetching, outer loop on the grid), so each
selected K/V tile is read once for the whole group. The tensor-core M dimension is the group,
padded to 16 rows: with G < 16 most of each MMA is idle, and every query still streams n * l'
keys, which is why `selected_small_group` (block-centric) exists for small groups.

Shapes: q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv], block_idx [B, TQ, H, n] int32/int64,
Dk/Dv up to 256, any G from 1 to 64, TQ <= TK with q_start. Tested: float32 under TRITON_INTERPRET=1
(Triton 3.9) and bfloat16 on an NVIDIA H100 (Triton 3.6) up to T = 16k. Known limits: forward only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E, check_qkv, dot_precision, forward_only, last_dim_contiguous, pow2, query_starts, \
    resolve_scale


@triton.jit(do_not_specialize=["TQ", "TK"])
def _selected_group_kernel(
    Q, K, V, IDX, O, POS0,
    scale_log2, TQ, TK, H,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sib, sit, sih,
    G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, SLC_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    TOP_N: tl.constexpr, PREC: tl.constexpr,
):
    t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    t64 = t.to(tl.int64)
    pos = tl.load(POS0 + b) + t

    g = tl.arange(0, GP)
    row_ok = g < G
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b64 * sqb + t64 * sqt + (h * G + g)[:, None] * sqh + dk[None, :],
                mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)  # [GP, BDK]

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BLOCK_DV], tl.float32)
    k_base = K + b64 * skb + h * skh
    v_base = V + b64 * svb + h * svh
    idx_base = IDX + b64 * sib + t64 * sit + h * sih
    offs = tl.arange(0, BLOCK_N)
    for slot in range(TOP_N):
        blk = tl.load(idx_base + slot)
        if blk >= 0:
            for off in range(0, SLC_BLOCK, BLOCK_N):
                n = blk.to(tl.int64) * SLC_BLOCK + off + offs  # [N] key positions
                n_ok = (off + offs < SLC_BLOCK) & (n <= pos) & (n < TK)
                kt = tl.load(k_base + n[None, :] * skt + dk[:, None], mask=n_ok[None, :] & (dk[:, None] < DK),
                             other=0.0)  # [BDK, N]
                s = tl.dot(q, kt, input_precision=PREC) * scale_log2  # [GP, N]
                s = tl.where(n_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                vt = tl.load(v_base + n[:, None] * svt + dv[None, :], mask=n_ok[:, None] & (dv[None, :] < DV),
                             other=0.0)  # [N, BDV]
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
                m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    HQ = H * G
    rows = (b64 * TQ + t64) * HQ + h * G + g
    tl.store(O + rows[:, None] * DV + dv[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))


def selected_attention(q, k, v, block_idx, *, slc_block, scale=None, q_start=None):
    """q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv], block_idx [B, TQ, H, n] -> o [B, TQ, HQ, Dv].

    A query at t attends to tokens s <= t of its KV head's selected blocks; q_start None means the
    queries are the last TQ of the TK keys.
    """
    forward_only(q, k, v)
    check_qkv(q, k, v)
    B, TQ, HQ, _ = q.shape
    TK, H = k.shape[1], k.shape[2]
    if block_idx.dim() != 4 or block_idx.shape[:3] != (B, TQ, H):
        raise ValueError(f"block_idx must be [B, TQ, H, n] = [{B}, {TQ}, {H}, n], got {tuple(block_idx.shape)}")
    if block_idx.is_floating_point():
        raise ValueError(f"block_idx must hold integers, got {block_idx.dtype}")
    if slc_block < 1:
        raise ValueError(f"slc_block must be >= 1, got {slc_block}")
    num_slc = -(-TK // slc_block)
    if block_idx.numel() and int(block_idx.max()) >= num_slc:
        raise ValueError(f"block_idx holds a block id >= {num_slc}, past the last of {TK} keys")
    pos0 = query_starts(q_start, B, TK - TQ, q.device)
    return run_selected(q, k, v, block_idx.to(q.device), pos0, slc_block=slc_block, scale=resolve_scale(q, scale))


def run_selected(q, k, v, block_idx, pos0, *, slc_block, scale):
    """Launch without argument checks (callers validated them): the group-centric kernel."""
    B, TQ, HQ, DK = q.shape
    TK, H, DV = k.shape[1], k.shape[2], v.shape[3]
    G = HQ // H
    q, k, v, block_idx = (last_dim_contiguous(x) for x in (q, k, v, block_idx))
    o = torch.empty(B, TQ, HQ, DV, device=q.device, dtype=q.dtype)
    n = block_idx.shape[-1]
    if B * TQ * H == 0:
        return o
    wide = max(pow2(DK), pow2(DV)) > 128
    block_n = min(pow2(slc_block, 16), 32 if wide else 64)
    _selected_group_kernel[(TQ, B * H)](
        q, k, v, block_idx, o, pos0, scale * LOG2E, TQ, TK, H,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
        G=G, GP=pow2(G, 16), DK=DK, DV=DV, BLOCK_DK=pow2(DK, 16), BLOCK_DV=pow2(DV, 16), SLC_BLOCK=slc_block,
        BLOCK_N=block_n, TOP_N=n, PREC=dot_precision(q.dtype), num_warps=4, num_stages=2,
    )
    return o
