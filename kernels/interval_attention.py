"""Flash-attention forward where each query row attends to one contiguous key interval [lo, hi).

Serves two NSA branches and part of a third, chosen by the compile-time MODE:
- MODE_CMP, compressed attention: row at absolute position t sees compressed tokens [0, N(t)) with
  N(t) = floor((t + 1 - l) / d) + 1 (0 while t < l - 1), i.e. token i iff i*d + l - 1 <= t;
- MODE_WIN, sliding window: row at t sees raw keys [t - w + 1, t] (w keys, itself included);
- MODE_FORCED, the forced selection blocks: row at t sees keys s <= t of the first `init` blocks of l'
  and of the `local` blocks ending at its own (two intervals); its (o, lse) is merged into the
  selected branch, which then skips those slots (selected.py).
Rows that see no key (compressed branch, t < l - 1) write o = 0 and lse = -inf, never NaN.

GQA packing: one program owns BLOCK_R rows = BT consecutive queries x the G query heads of one KV
head (row r -> query r // G, head r % G), so each K/V tile is loaded once for all G heads and the
tensor-core M dimension is full for any G from 1 to 64 (for G = 3, BLOCK_R = 64 holds 21 queries
and one idle row). The window kernel can also apply the gated sum (Eq. 5) in its epilogue, reading
o_cmp, o_slc and the gates, which saves a pass over the outputs. Tiles that every row of a program
sees whole run without the visibility mask (SPLIT_MASK: masked head, unmasked body, masked tail), and
compressed-branch programs run longest first. When a compressed-branch launch has too few row tiles to
fill the GPU (decode: B * H programs), each tile's keys are shared out among KEY_SPLITS programs
(flash-decoding) whose partial (o, lse) a second kernel merges (common.key_splits picks the count).
On GPUs with TMA (Hopper and later), where the head dims are powers of two and the strides 16-byte
aligned, the K and V tiles come through tensor descriptors over [B, TK, H, D] (common.tile_descriptors):
rows past TK read as zeros, and the keys of a tile that a row does not see are real values its mask
gives p = 0, so the output is the same as with masked pointer loads, bit for bit.

Shapes: q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv], Dk and Dv up to 256 and independent
(192 is padded to a 256 tile with masked loads); any TQ <= TK, per-batch query offsets (q_start).
Tested: float32 under TRITON_INTERPRET=1 (Triton 3.9, small shapes, G in 1, 3, 4, 16) and bfloat16
on an NVIDIA H100 and an NVIDIA H200 (Triton 3.6) up to T = 16k, Dk 128 and 192; key splits on the
H100 (decode over a 16k cache, G 4 and 16); the tensor-descriptor loads under the interpreter (bit-identical
to pointer loads) and in the H100's GPU tests. Known limits: forward only; MODE_FORCED masks every tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E, dot_precision, key_splits, last_dim_contiguous, pow2, tile_descriptors

MODE_CMP = 0
MODE_WIN = 1
MODE_FORCED = 2


@triton.jit
def _row_interval(pos, TK, MODE: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, WINDOW,
                  SLC_BLOCK: tl.constexpr, LOCAL: tl.constexpr):
    """Key interval [lo, hi) of a query at absolute position pos (any shape); MODE_FORCED: its local blocks."""
    if MODE == 0:
        seen = tl.where(pos + 1 >= CMP_BLOCK, (pos + 1 - CMP_BLOCK) // CMP_STRIDE + 1, 0)
        lo = tl.zeros_like(pos)
        hi = tl.minimum(seen, TK)
    elif MODE == 1:
        lo = tl.maximum(pos - WINDOW + 1, 0)
        hi = tl.minimum(pos + 1, TK)
    else:
        lo = tl.maximum((pos // SLC_BLOCK - LOCAL + 1) * SLC_BLOCK, 0)
        hi = tl.minimum(pos + 1, TK)
    return lo, hi


@triton.jit
def _tile(acc, m_i, l_i, q, k_base, v_base, start, lo, hi, k_hi, skt, svt, scale_log2,
          BLOCK_N: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
          BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr, FORCED_A: tl.constexpr = 0,
          k_desc=None, v_desc=None, b=0, h=0, TMA: tl.constexpr = False):
    """One online-softmax step over keys [start, start + BLOCK_N). MASKED = False: every row sees every key.

    A row sees key n iff lo <= n < hi, or (FORCED_A > 0) n < min(FORCED_A, hi). TMA: the K and V tiles
    come through tensor descriptors over [B, TK, H, D] (zero past TK); keys in [k_hi, TK) are then real
    values, which the visibility mask gives p = 0."""
    n = start + tl.arange(0, BLOCK_N)  # [N]
    if TMA:
        kt = tl.reshape(k_desc.load([b, tl.cast(start, tl.int32), h, 0]), [BLOCK_N, BLOCK_DK]).T
        vt = tl.reshape(v_desc.load([b, tl.cast(start, tl.int32), h, 0]), [BLOCK_N, BLOCK_DV])
    else:
        n64 = n.to(tl.int64)
        dk = tl.arange(0, BLOCK_DK)
        dv = tl.arange(0, BLOCK_DV)
        k_ptrs = k_base + n64[None, :] * skt + dk[:, None]
        v_ptrs = v_base + n64[:, None] * svt + dv[None, :]
        if MASKED:
            n_ok = n < k_hi
            kt = tl.load(k_ptrs, mask=n_ok[None, :] & (dk[:, None] < DK), other=0.0)
            vt = tl.load(v_ptrs, mask=n_ok[:, None] & (dv[None, :] < DV), other=0.0)
        else:
            kt = tl.load(k_ptrs, mask=dk[:, None] < DK, other=0.0) if BLOCK_DK > DK else tl.load(k_ptrs)
            vt = tl.load(v_ptrs, mask=dv[None, :] < DV, other=0.0) if BLOCK_DV > DV else tl.load(v_ptrs)
    s = tl.dot(q, kt, input_precision=PREC) * scale_log2  # [R, N]
    if MASKED:
        if FORCED_A > 0:
            visible = ((n[None, :] >= lo[:, None]) | (n[None, :] < FORCED_A)) & (n[None, :] < hi[:, None])
        else:
            visible = (n[None, :] >= lo[:, None]) & (n[None, :] < hi[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; shifting by 0 then gives exp2(-inf) = 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["TQ", "TK", "WINDOW"])
def _interval_attn_fwd_kernel(
    Q, K, V, KD, VD, O, LSE, POS0, GATES, O_CMP, O_SLC, O_WIN,
    scale_log2, TQ, TK, H, WINDOW,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MODE: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
    WRITE_LSE: tl.constexpr, FUSE_GATE: tl.constexpr, STORE_WIN: tl.constexpr, PREC: tl.constexpr,
    SPLIT: tl.constexpr, SLC_BLOCK: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    KEY_SPLITS: tl.constexpr, TMA: tl.constexpr,
):
    BT: tl.constexpr = BLOCK_R // G  # queries per program
    # Compressed rows see more keys the later they are: the longest tiles go first.
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0) if MODE == 0 else tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    HQ = H * G
    t0 = pid_t * BT

    r = tl.arange(0, BLOCK_R)
    t = t0 + r // G  # [R] query index
    hq = h * G + r % G  # [R] query head
    row_ok = (r < BT * G) & (t < TQ)
    pos0 = tl.load(POS0 + b)
    pos = pos0 + t  # [R] absolute positions
    lo, hi = _row_interval(pos, TK, MODE, CMP_BLOCK, CMP_STRIDE, WINDOW, SLC_BLOCK, LOCAL)
    hi = tl.where(row_ok, hi, 0)

    # Key range of the whole tile: rows are in position order, so first and last valid rows bound it.
    first = pos0 + t0
    last = pos0 + tl.minimum(t0 + BT, TQ) - 1
    k_lo, _ = _row_interval(first, TK, MODE, CMP_BLOCK, CMP_STRIDE, WINDOW, SLC_BLOCK, LOCAL)
    _, k_hi = _row_interval(last, TK, MODE, CMP_BLOCK, CMP_STRIDE, WINDOW, SLC_BLOCK, LOCAL)
    k_lo = (k_lo // BLOCK_N) * BLOCK_N
    if KEY_SPLITS > 1:
        # This program's share of the tile's keys: whole tiles [s_lo, s_hi) on the k_lo grid.
        split = tl.program_id(2)
        per_split = tl.cdiv(tl.cdiv(tl.maximum(k_hi - k_lo, 0), BLOCK_N), KEY_SPLITS) * BLOCK_N
        s_lo = tl.minimum(k_lo + split * per_split, k_hi)
        s_hi = tl.minimum(s_lo + per_split, k_hi)
    else:
        s_lo = k_lo
        s_hi = k_hi

    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * sqb + t.to(tl.int64)[:, None] * sqt + hq[:, None] * sqh + dk[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)  # [R, BDK]

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    k_base = K + b64 * skb + h * skh
    v_base = V + b64 * svb + h * svh
    if SPLIT:
        # Tiles inside every row's interval ([lo of the last query, hi of the first)) need no mask: a
        # masked head, an unmasked body, a masked tail.
        lo_last, _ = _row_interval(last, TK, MODE, CMP_BLOCK, CMP_STRIDE, WINDOW, SLC_BLOCK, LOCAL)
        _, hi_first = _row_interval(first, TK, MODE, CMP_BLOCK, CMP_STRIDE, WINDOW, SLC_BLOCK, LOCAL)
        body_lo = tl.minimum(k_lo + tl.cdiv(tl.maximum(lo_last - k_lo, 0), BLOCK_N) * BLOCK_N, k_hi)
        body_hi = body_lo + (tl.maximum(hi_first - body_lo, 0) // BLOCK_N) * BLOCK_N
        if KEY_SPLITS > 1:  # the three ranges cut to this program's share
            head_lo, head_hi = s_lo, tl.minimum(body_lo, s_hi)
            body_lo = tl.maximum(body_lo, s_lo)
            tail_lo = tl.maximum(body_hi, s_lo)
            body_hi = tl.minimum(body_hi, s_hi)
        else:
            head_lo, head_hi, tail_lo = k_lo, body_lo, body_hi
        for start in range(head_lo, head_hi, BLOCK_N):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base, v_base, start, lo, hi, k_hi, skt, svt, scale_log2,
                                  BLOCK_N, DK, DV, BLOCK_DK, BLOCK_DV, True, PREC, 0, KD, VD, b, h, TMA)
        for start in range(body_lo, body_hi, BLOCK_N):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base, v_base, start, lo, hi, k_hi, skt, svt, scale_log2,
                                  BLOCK_N, DK, DV, BLOCK_DK, BLOCK_DV, False, PREC, 0, KD, VD, b, h, TMA)
        for start in range(tail_lo, s_hi, BLOCK_N):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base, v_base, start, lo, hi, k_hi, skt, svt, scale_log2,
                                  BLOCK_N, DK, DV, BLOCK_DK, BLOCK_DV, True, PREC, 0, KD, VD, b, h, TMA)
    elif MODE == 2:
        # Forced blocks: the initial ones [0, INIT * l'), then the local ones; every tile is visited once.
        FORCED_A: tl.constexpr = INIT * SLC_BLOCK
        init_hi = tl.minimum(tl.cdiv(FORCED_A, BLOCK_N) * BLOCK_N, k_lo)
        for start in range(0, init_hi, BLOCK_N):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base, v_base, start, lo, hi, k_hi, skt, svt, scale_log2,
                                  BLOCK_N, DK, DV, BLOCK_DK, BLOCK_DV, True, PREC, FORCED_A, KD, VD, b, h, TMA)
        for start in range(k_lo, k_hi, BLOCK_N):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base, v_base, start, lo, hi, k_hi, skt, svt, scale_log2,
                                  BLOCK_N, DK, DV, BLOCK_DK, BLOCK_DV, True, PREC, FORCED_A, KD, VD, b, h, TMA)
    else:
        for start in range(s_lo, s_hi, BLOCK_N):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base, v_base, start, lo, hi, k_hi, skt, svt, scale_log2,
                                  BLOCK_N, DK, DV, BLOCK_DK, BLOCK_DV, True, PREC, 0, KD, VD, b, h, TMA)

    nonempty = l_i > 0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]  # [R, BDV]; empty rows stay exactly 0
    row64 = ((b64 * TQ + t) * HQ + hq).to(tl.int64)  # outputs are contiguous [B, TQ, HQ, ...]
    out_mask = row_ok[:, None] & (dv[None, :] < DV)
    if KEY_SPLITS > 1:
        # A partial (o in float32, lse in log2 units) per split, [KEY_SPLITS, B, TQ, HQ]; _combine_splits merges.
        row64 += tl.program_id(2).to(tl.int64) * tl.num_programs(1) * TQ * G
        tl.store(LSE + row64, tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf")),
                 mask=row_ok)
        tl.store(O + row64[:, None] * DV + dv[None, :], o, mask=out_mask)
        return
    out_ptrs = row64[:, None] * DV + dv[None, :]
    if WRITE_LSE:
        lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(LSE + row64, lse, mask=row_ok)
    if FUSE_GATE:
        o_win = o.to(O.dtype.element_ty)
        if STORE_WIN:
            tl.store(O_WIN + out_ptrs, o_win, mask=out_mask)
        g_cmp = tl.load(GATES + row64 * 3, mask=row_ok, other=0.0).to(tl.float32)
        g_slc = tl.load(GATES + row64 * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
        g_win = tl.load(GATES + row64 * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
        o_cmp = tl.load(O_CMP + out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        o_slc = tl.load(O_SLC + out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        o = g_cmp[:, None] * o_cmp + g_slc[:, None] * o_slc + g_win[:, None] * o_win.to(tl.float32)
    tl.store(O + out_ptrs, o.to(O.dtype.element_ty), mask=out_mask)


# (BLOCK_R, BLOCK_N, num_warps, num_stages) on a GPU per mode, for head dims up to 128 ("narrow") and
# above: the fastest of the candidates that benchmarks/bench_attention.py --tune sweeps (H100, Triton
# 3.6). The window's and the forced blocks' short intervals favour other settings than the compressed
# branch's long ones (64k on an H100: window + gate 4.07 ms against 4.26 with the compressed branch's
# setting at paper128, forced blocks 1.64 against 1.82); their wide settings were not swept. With the
# descriptor loads the window's 32-key tiles took 0.94 against 1.03 ms (small) and 3.76 against 3.89 / 3.80
# (paper128) for (64, 64, 4, 2), H100, 64k, the gated sum included.
LAUNCH = {
    (MODE_CMP, "narrow"): (64, 64, 4, 3), (MODE_CMP, "wide"): (128, 64, 8, 2),
    (MODE_WIN, "narrow"): (64, 32, 4, 3), (MODE_WIN, "wide"): (128, 64, 8, 2),
    (MODE_FORCED, "narrow"): (64, 32, 4, 3), (MODE_FORCED, "wide"): (128, 64, 8, 2),
}
# Rows per program of the key-split merge.
COMBINE_ROWS = 16


@triton.jit
def _combine_splits_kernel(O_PART, LSE_PART, O, LSE, ROWS, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                           SPLITS: tl.constexpr, SP: tl.constexpr, ROWS_PER: tl.constexpr,
                           WRITE_LSE: tl.constexpr):
    """o = sum_s 2^(lse_s - lse) o_s over the key splits, lse = log2 sum_s 2^lse_s (stored in natural units).

    O_PART [SPLITS, ROWS, DV] float32, LSE_PART [SPLITS, ROWS] (log2, -inf for a split that saw no key);
    a row no split saw keeps o = 0 and lse = -inf.
    """
    row = tl.program_id(0).to(tl.int64) * ROWS_PER + tl.arange(0, ROWS_PER)  # [RP]
    split = tl.arange(0, SP)
    dv = tl.arange(0, BLOCK_DV)
    row_ok = row < ROWS
    ok = row_ok[:, None] & (split[None, :] < SPLITS)  # [RP, SP]
    lse = tl.load(LSE_PART + split[None, :] * ROWS + row[:, None], mask=ok, other=float("-inf"))
    m = tl.max(lse, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe[:, None])  # [RP, SP]
    denom = tl.sum(w, 1)
    o = tl.zeros([ROWS_PER, BLOCK_DV], tl.float32)
    d_ok = row_ok[:, None] & (dv[None, :] < DV)
    for s in tl.static_range(SPLITS):
        w_s = tl.sum(tl.where(split[None, :] == s, w, 0.0), 1)  # [RP]
        part = tl.load(O_PART + (s * ROWS + row[:, None]) * DV + dv[None, :], mask=d_ok, other=0.0)
        o += w_s[:, None] * part
    nonempty = denom > 0
    o = o / tl.where(nonempty, denom, 1.0)[:, None]
    tl.store(O + row[:, None] * DV + dv[None, :], o.to(O.dtype.element_ty), mask=d_ok)
    if WRITE_LSE:
        lse_all = tl.where(nonempty, (m_safe + tl.log2(tl.where(nonempty, denom, 1.0))) / 1.4426950408889634,
                           float("-inf"))
        tl.store(LSE + row, lse_all, mask=row_ok)


# Split each row tile's key loop into masked edges and an unmasked body (False: every tile masked).
SPLIT_MASK = True
# Load the K and V tiles through tensor descriptors (TMA on Hopper) where the layout allows it, instead of
# pointer loads: the same bits, and at 64k on an H100 the compressed branch 9.17 against 10.03 ms, the window
# with the gate 3.88 against 4.08 and the forced blocks 1.50 against 1.62 (paper128); 2.42 / 1.02 / 0.39
# against 2.55 / 1.09 / 0.54 at the small shape.
TMA_LOADS = True


def _launch_config(mode: int, G: int, dk: int, dv: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps, num_stages); BLOCK_R holds at least one query's G heads."""
    if not on_gpu:  # the interpreter's cost grows with tile size, not with the number of programs
        return max(64, pow2(G)), 32, 4, 1
    block_r, block_n, warps, stages = LAUNCH[mode, "wide" if max(pow2(dk), pow2(dv)) > 128 else "narrow"]
    return max(block_r, pow2(G)), block_n, warps, stages


def interval_attention(q, k, v, pos0, *, mode, scale, cmp_block=1, cmp_stride=1, window=1, want_lse=False,
                       gates=None, o_cmp=None, o_slc=None, store_win=False, slc_block=1, init_blocks=0,
                       local_blocks=0, splits=None):
    """Launch the interval kernel.

    q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv], pos0 [B] int64 absolute position of query 0.
    Returns o [B, TQ, HQ, Dv] (the gated sum when gates are given), then lse [B, TQ, HQ] float32 when
    want_lse, then o_win when store_win. MODE_FORCED attends to the forced selection blocks of each
    query (the first init_blocks and the last local_blocks up to its own, keys <= its position).
    splits (MODE_CMP): programs per row tile, each over a share of its keys, merged after (None:
    as many as fill the GPU when the launch alone would not, common.key_splits).
    """
    B, TQ, HQ, DK = q.shape
    TK, H, DV = k.shape[1], k.shape[2], v.shape[3]
    G = HQ // H
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    o = torch.empty(B, TQ, HQ, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, TQ, HQ, device=q.device, dtype=torch.float32) if want_lse else o
    fuse = gates is not None
    o_win = torch.empty_like(o) if (fuse and store_win) else o
    if fuse:
        gates, o_cmp, o_slc = gates.contiguous(), o_cmp.contiguous(), o_slc.contiguous()
    else:
        gates = o_cmp = o_slc = o
    block_r, block_n, warps, stages = _launch_config(mode, G, DK, DV, q.is_cuda)
    bt = block_r // G
    if mode == MODE_CMP and B * TQ and HQ:
        splits = key_splits(triton.cdiv(TQ, bt) * B * H, triton.cdiv(TK, block_n), q.device, splits)
    else:
        splits = 1
    if splits > 1:
        # Each split writes a partial (o float32, lse log2) that _combine_splits_kernel merges into o and lse.
        o_part = torch.empty(splits, B, TQ, HQ, DV, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(splits, B, TQ, HQ, device=q.device, dtype=torch.float32)
        out, out_lse = o_part, lse_part
    else:
        out, out_lse = o, lse
    if B * TQ and HQ:
        descriptors = tile_descriptors(block_n, k, v) if TMA_LOADS else None
        grid = (triton.cdiv(TQ, bt), B * H, splits)
        _interval_attn_fwd_kernel[grid](
            q, k, v, *(descriptors or (k, v)), out, out_lse, pos0, gates, o_cmp, o_slc, o_win,
            scale * LOG2E, TQ, TK, H, window,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            G=G, BLOCK_R=block_r, BLOCK_N=block_n, DK=DK, DV=DV, BLOCK_DK=pow2(DK, 16), BLOCK_DV=pow2(DV, 16),
            MODE=mode, CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride,
            WRITE_LSE=want_lse, FUSE_GATE=fuse, STORE_WIN=fuse and store_win, PREC=dot_precision(q.dtype),
            SPLIT=SPLIT_MASK and mode != MODE_FORCED, SLC_BLOCK=slc_block, INIT=init_blocks, LOCAL=local_blocks,
            KEY_SPLITS=splits, TMA=descriptors is not None, num_warps=warps, num_stages=stages,
        )
    if splits > 1:
        rows = B * TQ * HQ
        _combine_splits_kernel[(triton.cdiv(rows, COMBINE_ROWS),)](
            o_part, lse_part, o, lse, rows, DV=DV, BLOCK_DV=pow2(DV, 16), SPLITS=splits, SP=pow2(splits),
            ROWS_PER=COMBINE_ROWS, WRITE_LSE=want_lse,
        )
    out = [o]
    if want_lse:
        out.append(lse)
    if fuse and store_win:
        out.append(o_win)
    return out[0] if len(out) == 1 else tuple(out)
