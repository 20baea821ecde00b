"""Selected-block attention (Eq. 11-12): the paper's group-centric kernel and a block-centric one.

Each query at t attends, per KV head h, to the tokens s <= t of the blocks block_idx[b, t, h, :]
(-1 slots skipped; valid ids unique). One program owns one query and the G query heads of one KV
head (paper Fig. 3: group-centric loading, shared KV fetching, outer loop on the grid), so each
selected K/V tile is read once for the whole group. The tensor-core M dimension is the group,
padded to 16 rows: with G < 16 most of each MMA is idle, and every query still streams n * l'
keys, whatever the group size.

The block-centric path (for small groups, chosen by `run_selected`) inverts the loop, as FSA does:
the (query, slot) pairs are grouped by the block they selected (a counting sort, no [T, Ns] matrix),
and one program takes up to BLOCK_R // G pairs that chose the same block, gathers their G heads
into BLOCK_R rows and attends to that block once, so the tensor-core tile is full and each block is
read once per BLOCK_R // G queries instead of once per query. Each pair writes its partial output
and log-sum-exp; a second kernel merges the n partials of every query. The partials cost
2 * B * TQ * HQ * n * (Dv + 2) bytes of extra traffic, which pays off while G is small.

When nsa_attention has attended to the forced blocks already (interval kernel, MODE_FORCED, one dense
launch for every query), both paths take that (o_f, lse_f) as one more softmax part and skip the
forced slots: the group path loops only over the run of slots between them (ids ascend), the block
path leaves those pairs out of its groups, and its merge adds the part.

Shapes (both paths): q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv], block_idx [B, TQ, H, n] int32/int64,
Dk/Dv up to 256, any G from 1 to 64, TQ <= TK with q_start. Tested: float32 under TRITON_INTERPRET=1
(Triton 3.9) and bfloat16 on an NVIDIA H100 and an NVIDIA H200 (Triton 3.6) up to T = 16k. The
precomputed-forced variant: both paths on the CPU, the H200 and the H100 (the whole-layer tests at 8k:
the block path at G = 4, the group path at G = 16; the logits test). The group path's tensor-descriptor
loads (GROUP_TMA): under the interpreter (bit-identical to pointer loads) and in the H100's GPU tests.
The block path's counting sort: against a torch sort under the interpreter, and on the H100 (the
kernel tests, and the same output bits as the sort it replaced at 64k).
Known limits: forward only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    check_qkv,
    dot_precision,
    forward_only,
    last_dim_contiguous,
    pow2,
    query_starts,
    resolve_scale,
    tile_descriptors,
)


@triton.jit(do_not_specialize=["TQ", "TK"])
def _selected_group_kernel(
    Q, K, V, KD, VD, IDX, O, POS0, O_F, LSE_F,
    scale_log2, TQ, TK, H,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sib, sit, sih,
    G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, SLC_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    TOP_N: tl.constexpr, PREC: tl.constexpr, FORCED: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    NP: tl.constexpr, TMA: tl.constexpr,
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

    HQ = H * G
    rows = (b64 * TQ + t64) * HQ + h * G + g
    if FORCED:
        # Start from the forced blocks' softmax (o_f, lse_f): m = lse, l = 1, acc = o_f; their slots are skipped.
        lse_f = tl.load(LSE_F + rows, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        m_i = lse_f
        l_i = tl.where(lse_f > float("-inf"), 1.0, 0.0)
        acc = tl.load(O_F + rows[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV),
                      other=0.0).to(tl.float32)
        # Valid ids ascend, so the slots that are not forced are one run [first, end): the loop skips the rest.
        slot = tl.arange(0, NP)
        ids = tl.load(IDX + b64 * sib + t64 * sit + h * sih + slot, mask=slot < TOP_N, other=-1)
        first = tl.sum(((ids >= 0) & (ids < INIT)).to(tl.int32), 0)
        end = tl.sum(((ids >= 0) & (ids <= pos // SLC_BLOCK - LOCAL)).to(tl.int32), 0)
    else:
        first = 0
        end = TOP_N
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, BLOCK_DV], tl.float32)
    k_base = K + b64 * skb + h * skh
    v_base = V + b64 * svb + h * svh
    idx_base = IDX + b64 * sib + t64 * sit + h * sih
    offs = tl.arange(0, BLOCK_N)
    TILES: tl.constexpr = (SLC_BLOCK + BLOCK_N - 1) // BLOCK_N
    # One flat loop with no branch, so that the compiler can pipeline the next tile's loads; an empty
    # slot (-1) masks all its loads and contributes exp2(-inf) = 0.
    for it in range(first * TILES, end * TILES):
        blk = tl.load(idx_base + it // TILES)
        off = (it % TILES) * BLOCK_N
        n = blk.to(tl.int64) * SLC_BLOCK + off + offs  # [N] key positions
        # blk = -1 gives n in [-l', 0): the n >= 0 test masks empty slots.
        n_ok = (n >= 0) & (off + offs < SLC_BLOCK) & (n <= pos) & (n < TK)
        if TMA:  # an empty slot's negative start and keys past TK read as zeros; n_ok masks the scores
            kt = tl.reshape(KD.load([b, (blk * SLC_BLOCK + off).to(tl.int32), h, 0]), [BLOCK_N, BLOCK_DK]).T
        else:
            kt = tl.load(k_base + n[None, :] * skt + dk[:, None], mask=n_ok[None, :] & (dk[:, None] < DK),
                         other=0.0)  # [BDK, N]
        s = tl.dot(q, kt, input_precision=PREC) * scale_log2  # [GP, N]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            vt = tl.reshape(VD.load([b, (blk * SLC_BLOCK + off).to(tl.int32), h, 0]), [BLOCK_N, BLOCK_DV])
        else:
            vt = tl.load(v_base + n[:, None] * svt + dv[None, :], mask=n_ok[:, None] & (dv[None, :] < DV),
                         other=0.0)  # [N, BDV]
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
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


def run_selected(q, k, v, block_idx, pos0, *, slc_block, scale, path=None, forced=None):
    """Launch without argument checks (callers validated them).

    path: "group" (paper kernel), "block" (block-centric) or None to choose: the block path for groups up to
    BLOCK_PATH_MAX_GROUP when the queries share blocks (BLOCK_PATH_MIN_SHARE), the group path otherwise.
    forced: None, or (o_f, lse_f, init_blocks, local_blocks) with the attention of every query over its
    forced blocks already computed (interval kernel, MODE_FORCED): their slots are then skipped and
    that softmax is merged in, so the output is the same attention over all the selected blocks.
    """
    B, TQ, HQ, DK = q.shape
    TK, H, DV = k.shape[1], k.shape[2], v.shape[3]
    G = HQ // H
    if path is None:
        slots = TQ * block_idx.shape[-1]
        shared = slots >= BLOCK_PATH_MIN_SHARE * triton.cdiv(TK, slc_block) and B * H * slots >= BLOCK_PATH_MIN_SLOTS
        path = "block" if G <= BLOCK_PATH_MAX_GROUP and shared else "group"
    if path not in ("group", "block"):
        raise ValueError(f"path must be 'group', 'block' or None, got {path!r}")
    q, k, v, block_idx = (last_dim_contiguous(x) for x in (q, k, v, block_idx))
    o = torch.empty(B, TQ, HQ, DV, device=q.device, dtype=q.dtype)
    if B * TQ * H == 0 or block_idx.shape[-1] == 0:
        return o.zero_()
    wide = max(pow2(DK), pow2(DV)) > 128
    block_n = min(pow2(slc_block, 16), 32 if wide else 64)
    common = {"G": G, "DK": DK, "DV": DV, "BLOCK_DK": pow2(DK, 16), "BLOCK_DV": pow2(DV, 16),
              "SLC_BLOCK": slc_block, "BLOCK_N": block_n, "PREC": dot_precision(q.dtype)}
    if forced is None:
        o_f, lse_f, init, local = o, o, 0, 0
    else:
        o_f, lse_f, init, local = forced
        o_f, lse_f = o_f.contiguous(), lse_f.contiguous()
    flags = {"FORCED": forced is not None, "INIT": init, "LOCAL": local}
    if path == "group":
        block_n, warps, stages = GROUP_LAUNCH["wide" if wide else "narrow"]
        block_n = min(pow2(slc_block, 16), block_n)
        descriptors = tile_descriptors(block_n, k, v) if GROUP_TMA else None
        _selected_group_kernel[(TQ, B * H)](
            q, k, v, *(descriptors or (k, v)), block_idx, o, pos0, o_f, lse_f, scale * LOG2E, TQ, TK, H,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
            GP=pow2(G, 16), TOP_N=block_idx.shape[-1], NP=pow2(block_idx.shape[-1]), num_warps=warps,
            num_stages=stages,
            TMA=descriptors is not None, **{**common, "BLOCK_N": block_n}, **flags,
        )
        return o
    return _run_block_centric(q, k, v, block_idx.contiguous(), pos0, o, scale, common, o_f, lse_f, flags)


# Group path launch (BLOCK_N, num_warps, num_stages) for head dims up to 128 ("narrow") and above: the
# fastest of benchmarks/bench_attention.py --tune's candidates, narrow at paper128 (H200), wide at
# paper192 (H100: (64, 4, 2) 23.8 ms against 27.9 for (32, 4, 3) over the slots that are not forced).
GROUP_LAUNCH = {"narrow": (64, 4, 3), "wide": (64, 4, 2)}
# The group path's K and V tiles through tensor descriptors (TMA on Hopper) where the layout allows it, instead
# of pointer loads: the same bits, and the selected stage with its forced part 15.75 against 16.72 ms at
# paper128, 64k (H100; TMA in the forced-block launch too). An empty slot's tile starts at a negative
# row, which the descriptor reads as zeros.
GROUP_TMA = True
# Groups up to this size take the block-centric path by default, when the queries' slots per key block
# (TQ * n / blocks, how many pairs could share one load) reach BLOCK_PATH_MIN_SHARE and there are at
# least BLOCK_PATH_MIN_SLOTS slots in all: a decode step or a short chunk over a long cache shares too
# little to pay for the sort, the partials and the launches. Measured at G = 4 over a 64k cache (H100):
# B = 8, 1024 queries (16 per block) 1.34 ms against 2.31 for the group path, 256 queries 1.11 against
# 0.61; B = 1, 4096 queries 0.51 against 1.16, 1024 queries 0.52 against 0.31.
BLOCK_PATH_MAX_GROUP = 8
BLOCK_PATH_MIN_SHARE = 16
BLOCK_PATH_MIN_SLOTS = 1 << 18
# Block-centric launch on a GPU: (rows = pairs x G per program, keys per tile, num_warps, num_stages). More
# pairs per program, fewer re-reads of a block. The key tile is at most the selection block, and 32 keys for
# head dims over 128 (run_selected's BLOCK_N).
BLOCK_PATH_LAUNCH = (128, 64, 4, 2)


def _run_block_centric(q, k, v, block_idx, pos0, o, scale, common, o_f, lse_f, flags):
    B, TQ, HQ, DK = q.shape
    TK, H, DV = k.shape[1], k.shape[2], v.shape[3]
    G, n = HQ // H, block_idx.shape[-1]
    num_slc = triton.cdiv(TK, common["SLC_BLOCK"])
    num_seg = B * H * num_slc
    rows, block_n, warps, stages = BLOCK_PATH_LAUNCH if q.is_cuda else (32, common["BLOCK_N"], 4, 1)
    common = {**common, "BLOCK_N": min(common["BLOCK_N"], block_n)}
    block_r = max(rows, pow2(G, 16))
    per_prog = block_r // G  # (query, slot) pairs per program

    order, seg_start, counts = _bucket_pairs(block_idx, pos0, num_slc, common["SLC_BLOCK"], flags)
    chunks = (counts + per_prog - 1) // per_prog
    chunk_end = torch.cumsum(chunks, 0)
    # Upper bound on the number of programs, so that no device-to-host sync is needed.
    grid = triton.cdiv(order.numel(), per_prog) + num_seg
    prog_seg = torch.searchsorted(chunk_end, torch.arange(grid, device=q.device), right=True).to(torch.int32)
    chunk_start = (chunk_end - chunks).to(torch.int32)

    o_part = torch.empty(B * TQ * H * n, G, DV, device=q.device, dtype=q.dtype)
    lse_part = torch.empty(B * TQ * H * n, G, device=q.device, dtype=torch.float32)
    _selected_block_kernel[(grid,)](
        q, k, v, order, prog_seg, chunk_start, seg_start, counts, o_part, lse_part, pos0,
        scale * LOG2E, TQ, TK, H, num_seg, num_slc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        N_SLOTS=n, BLOCK_R=block_r, num_warps=warps, num_stages=stages, **common,
    )
    gp, block_dv = pow2(G), pow2(DV, 16)  # a [GP, BLOCK_DV] tile per slot: one warp per 512 elements, up to 4
    _merge_partials_kernel[(B * TQ * H,)](
        o_part, lse_part, block_idx, o, pos0, o_f, lse_f, TQ, H, G=G, GP=gp, N_SLOTS=n, NP=pow2(n), DV=DV,
        BLOCK_DV=block_dv, SLC_BLOCK=common["SLC_BLOCK"], num_warps=min(4, max(1, gp * block_dv // 512)), **flags,
    )
    return o


# Pairs per program of the bucketing passes.
BUCKET_BLOCK = 1024


def _bucket_pairs(block_idx, pos0, num_slc, slc_block, flags):
    """Group the (b, t, h, slot) pairs by segment (b, h, block) without sorting them: a counting sort.

    block_idx [B, TQ, H, n] contiguous. Returns order [B*TQ*H*n] int64 (flat pair indices, those of
    segment s at order[seg_start[s] : seg_start[s] + counts[s]]), seg_start and counts [B*H*num_slc]
    int64. Empty slots (and forced blocks when their attention comes precomputed) are left out; the
    tail of order past the kept pairs is never written. Within a segment the order is whatever the
    atomics made it: each pair's partial output depends on its own row only, so the outputs are the
    same bits in any order. Two passes over the ids (count, then place at a per-segment cursor) and
    a cumsum of the counts: no sort of every pair.
    """
    B, TQ, H, n = block_idx.shape
    num_pairs = block_idx.numel()
    counts = torch.zeros(B * H * num_slc, device=block_idx.device, dtype=torch.int64)
    order = torch.empty(num_pairs, device=block_idx.device, dtype=torch.int64)
    grid = (triton.cdiv(num_pairs, BUCKET_BLOCK),)
    args = (block_idx, pos0, order, num_pairs, TQ, H, num_slc)
    meta = {"N_SLOTS": n, "SLC_BLOCK": slc_block, "BLOCK": BUCKET_BLOCK, **flags}
    _bucket_pairs_kernel[grid](counts, *args, PLACE=False, **meta)
    seg_start = torch.cumsum(counts, 0) - counts
    _bucket_pairs_kernel[grid](seg_start.clone(), *args, PLACE=True, **meta)
    return order, seg_start, counts


@triton.jit
def _bucket_pairs_kernel(CURSOR, IDX, POS0, ORDER, NUM_PAIRS, TQ, H, NUM_SLC,
                         N_SLOTS: tl.constexpr, SLC_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                         FORCED: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr, PLACE: tl.constexpr):
    """One pass of `_bucket_pairs`: PLACE=False counts the kept pairs of each segment into CURSOR;
    PLACE=True takes a position from each pair's segment cursor and writes the pair's index there."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat (b, t, h, slot)
    in_range = e < NUM_PAIRS
    ids = tl.load(IDX + e, mask=in_range, other=-1).to(tl.int64)
    bh = e // (N_SLOTS * H * TQ) * H + (e // N_SLOTS) % H
    cur = (tl.load(POS0 + bh // H, mask=in_range, other=0) + (e // (N_SLOTS * H)) % TQ) // SLC_BLOCK if FORCED else 0
    keep = in_range & _merged_slot(ids, cur, FORCED, INIT, LOCAL)
    at = tl.atomic_add(CURSOR + bh * NUM_SLC + ids, 1, mask=keep)
    if PLACE:
        tl.store(ORDER + at, e, mask=keep)


@triton.jit
def _selected_block_kernel(
    Q, K, V, ORDER, PROG_SEG, CHUNK_START, SEG_START, COUNTS, O_PART, LSE_PART, POS0,
    scale_log2, TQ, TK, H, NUM_SEG, NUM_SLC,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    SLC_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, N_SLOTS: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
):
    PAIRS: tl.constexpr = BLOCK_R // G
    pid = tl.program_id(0)
    seg = tl.load(PROG_SEG + pid)
    if seg < NUM_SEG:
        j = seg % NUM_SLC  # the block every pair of this program selected
        bh = seg // NUM_SLC
        b = bh // H
        h = bh % H
        b64 = b.to(tl.int64)
        first = tl.load(SEG_START + seg) + (pid - tl.load(CHUNK_START + seg)).to(tl.int64) * PAIRS
        last = tl.load(SEG_START + seg) + tl.load(COUNTS + seg)

        r = tl.arange(0, BLOCK_R)
        pair = first + r // G
        row_ok = (r < PAIRS * G) & (pair < last)
        e = tl.load(ORDER + pair, mask=row_ok, other=0)  # flat (b, t, h, slot) index
        t = (e // (H * N_SLOTS)) % TQ
        g = r % G
        pos = tl.load(POS0 + b) + t  # [R]
        dk = tl.arange(0, BLOCK_DK)
        dv = tl.arange(0, BLOCK_DV)
        q = tl.load(Q + b64 * sqb + t[:, None] * sqt + (h * G + g)[:, None] * sqh + dk[None, :],
                    mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)  # [R, BDK]

        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
        offs = tl.arange(0, BLOCK_N)
        for off in range(0, SLC_BLOCK, BLOCK_N):
            n = j.to(tl.int64) * SLC_BLOCK + off + offs  # [N]
            n_ok = (off + offs < SLC_BLOCK) & (n < TK)
            kt = tl.load(K + b64 * skb + h * skh + n[None, :] * skt + dk[:, None],
                         mask=n_ok[None, :] & (dk[:, None] < DK), other=0.0)  # [BDK, N]
            s = tl.dot(q, kt, input_precision=PREC) * scale_log2  # [R, N]
            s = tl.where(n_ok[None, :] & (n[None, :] <= pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(V + b64 * svb + h * svh + n[:, None] * svt + dv[None, :],
                         mask=n_ok[:, None] & (dv[None, :] < DV), other=0.0)  # [N, BDV]
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
            m_i = m_new

        nonempty = l_i > 0
        o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))  # log2 units
        row = e * G + g
        tl.store(O_PART + row[:, None] * DV + dv[None, :], o.to(O_PART.dtype.element_ty),
                 mask=row_ok[:, None] & (dv[None, :] < DV))
        tl.store(LSE_PART + row, lse, mask=row_ok)


@triton.jit
def _merged_slot(ids, cur, FORCED: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr):
    """Whether a slot's block id has a partial to merge: chosen (not -1) and, with FORCED, not a forced
    block (the first INIT blocks and the LOCAL blocks ending at the query's block `cur`)."""
    ok = ids >= 0
    if FORCED:
        ok = ok & (ids >= INIT) & (ids <= cur - LOCAL)
    return ok


@triton.jit
def _merge_partials_kernel(O_PART, LSE_PART, IDX, O, POS0, O_F, LSE_F, TQ, H,
                           G: tl.constexpr, GP: tl.constexpr, N_SLOTS: tl.constexpr,
                           NP: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, SLC_BLOCK: tl.constexpr,
                           FORCED: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr):
    """o[b, t, h*G + g] = sum_slot 2^(lse_slot - lse_all) o_slot: the softmax over the union of the blocks
    (FORCED: the precomputed forced-block softmax (o_f, lse_f) is one more part, and the forced slots none).

    The partials are summed one slot at a time in [GP, BLOCK_DV] tiles: a single [NP, GP, BLOCK_DV] load
    held 16x more registers per thread and made this kernel slower than the attention it merges.
    """
    row = tl.program_id(0).to(tl.int64)  # (b, t, h)
    slot = tl.arange(0, NP)
    g = tl.arange(0, GP)
    dv = tl.arange(0, BLOCK_DV)
    cur = (tl.load(POS0 + row // (TQ * H)) + (row // H) % TQ) // SLC_BLOCK if FORCED else 0
    ids = tl.load(IDX + row * N_SLOTS + slot, mask=slot < N_SLOTS, other=-1)
    valid = (slot < N_SLOTS) & _merged_slot(ids, cur, FORCED, INIT, LOCAL)  # [NP]
    sg_ok = valid[:, None] & (g[None, :] < G)  # [NP, GP]
    lse = tl.load(LSE_PART + (row * N_SLOTS + slot)[:, None] * G + g[None, :], mask=sg_ok, other=float("-inf"))
    lse = tl.where(sg_ok, lse, float("-inf"))  # the buffer of an empty slot is never written
    m = tl.max(lse, 0)  # [GP]
    if FORCED:
        lse_f = tl.load(LSE_F + row * G + g, mask=g < G, other=float("-inf")) * 1.4426950408889634
        m = tl.maximum(m, lse_f)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp2(lse - m_safe[None, :]), 0)
    gd_ok = (g[:, None] < G) & (dv[None, :] < DV)  # [GP, BDV]
    o = tl.zeros([GP, BLOCK_DV], tl.float32)
    if FORCED:
        w_f = tl.exp2(lse_f - m_safe)  # [GP]
        denom += w_f
        o_f = tl.load(O_F + (row * G + g[:, None]) * DV + dv[None, :], mask=gd_ok, other=0.0).to(tl.float32)
        o = w_f[:, None] * o_f
    for s in tl.static_range(N_SLOTS):
        e = row * N_SLOTS + s
        sid = tl.load(IDX + e + g * 0)  # [GP], the slot's block id on every head's row
        ok = _merged_slot(sid, cur, FORCED, INIT, LOCAL) & (g < G)
        w = tl.exp2(tl.load(LSE_PART + e * G + g, mask=ok, other=float("-inf")) - m_safe)  # [GP]
        part = tl.load(O_PART + (e * G + g[:, None]) * DV + dv[None, :], mask=ok[:, None] & gd_ok, other=0.0)
        o += w[:, None] * part.to(tl.float32)
    denom = tl.where(denom > 0, denom, 1.0)
    tl.store(O + (row * G + g[:, None]) * DV + dv[None, :], (o / denom[:, None]).to(O.dtype.element_ty), mask=gd_ok)
