"""Block selection (Eq. 8-12) in one kernel: scores, overlap remap, group sum, forced blocks, online top-n.

For each query t and KV head h, with p_cmp = exp(q . k_cmp * scale - lse) over the visible compressed
tokens (lse from the compressed branch; rows with lse = -inf contribute nothing):
  score[j] = sum_{g in group h} sum_i p_cmp[g, i] * |C_i ∩ S_j| / d      (Eq. 9 overlap form, Eq. 10)
then blocks 0..init-1 and c-local+1..c (c = t // l') are forced, blocks after c are excluded, and the
n best are written ascending with -1 padding: block_idx [B, TQ, H, n] int32.

No [T, Tc] or [T, Ns] matrix is ever stored. One program owns BT queries x the G heads of one KV head
(row r -> query r // GP, head r % GP, GP = G rounded up to a power of two so that the group sum is
a reshape). It walks the candidate blocks in chunks of NB, reading the NB * l'/d compressed keys that
start inside them; the last l/d - 1 of those also overlap the next chunk's first block, and that
share is carried over in a [BT] register instead of re-reading keys. After each chunk, its NB
candidates are merged into the running top-n set: while a candidate beats the weakest chosen block,
the best candidate replaces it. The state stays [BT, n] whatever the sequence length, and the rounds
(cross-thread reductions) shrink as the set improves; when n = NB the first chunk fills the empty
set without rounds (FILL_FIRST). When the launch has too few query tiles to fill the GPU (decode), the
chunks of each tile are shared out among KEY_SPLITS programs (common.key_splits); each keeps its own
set, starting one chunk early for the carry alone, and a second kernel keeps the n best of their sets
(equal scores to the lower id).

The merge compares int32 keys: the score's float32 bits (non-negative, so integer order is score
order) with the lowest KEY_BITS of the mantissa replaced by a tag that makes every key of a row
unique: NB - 1 - jl for a candidate (ties within a chunk go to the lower block id) and NB + slot for
a chosen block (ties with a later chunk's candidate go to the chosen, lower id). The block ids live
beside the keys in an int32 [BT, n] array. Scores that agree in their top 23 - KEY_BITS mantissa
bits (18 for the paper's n = 16) count as ties, which may be broken differently from the reference's
stable sort. Among chosen blocks of equal score, the one a better candidate displaces is the one in
the lowest slot, not always the highest id as in the reference: with uniform compressed attention
and n = 16, for instance, a query can keep blocks 2-14 where the reference keeps 1-13. The chosen
scores are the same either way. The profile that led here: with int64 keys holding the whole score
and the id, the merge rounds were half of the kernel's instructions and the ALU pipe was the
bottleneck (Nsight Compute, G = 4, 64k, H200). Excluded blocks get the smallest int32. The group sum
leaves every candidate key held by GP lanes (4 copies at G = 4), and the merge state takes the
candidates' layout, so every round did its work GP times over; an identity gather first moves the
candidates to one copy per key (COMPACT_MERGE_MAX_GP). Compiled for sm_90 (Triton 3.9), a round is
then 49 PTX instructions per thread instead of 98 at G = 4, and a chunk's work outside the rounds 629
instead of 699; on an H100 select took 2.71 against 2.97 ms (G = 4, 64k). At G = 16 (28 against 47
per round) it was slower, 9.13 against 8.54 ms, so small groups only.

The Eq. 9 remap runs first, per (query, head) row, as one tensor-core product of p (float16 for
16-bit inputs, like flash attention's P) with the [BC, NB] overlap weights; the group sum then adds
G rows of the NB-wide result (REMAP_FIRST; the earlier order summed the [R, BC] probabilities first).

Shapes: any G from 1 to 64, Dk up to 256, any T, TQ < TK with q_start (int or [B]), l/d and l'/d any
positive integers with l - d <= l'. Tested: float32 under TRITON_INTERPRET=1 (Triton 3.9) and
bfloat16 on an NVIDIA H200 and an NVIDIA H100 (Triton 3.6) up to T = 16k; key splits on the H100
(decode over a 16k cache, G 4 and 16); the compressed keys through a tensor descriptor (SELECT_TMA) under
the interpreter (the same ids as pointer loads) and in the H100's GPU tests; the compact merge layout under
the interpreter (the same ids as without it) and in the H100's GPU tests. Known limits: forward only;
near-ties as above; a NaN score (from NaN inputs) is ranked above every finite one instead of raising.
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
    key_splits,
    last_dim_contiguous,
    pow2,
    query_starts,
    resolve_scale,
    tile_descriptors,
)

# Eq. 9 remap before the group sum, as one tensor-core product per (query, head) row (True), or the
# group sum first on the [BT, BC] probabilities and the remap after it (False, the earlier kernel).
REMAP_FIRST = True
# Chunks that every row of a tile sees whole skip the visibility mask (False: every chunk masked).
# With 64-row programs it is faster at every benchmark shape (H200, 64k: G=4 6.51 -> 5.52 ms, G=16
# 15.08 -> 14.07, Dk 192 21.35 -> 20.51); with 128-row programs it had been slower at G=16.
SPLIT_MASK = True
# (rows per program = BT * GP, num_warps, num_stages) on a GPU; rows drop to 64 for Dk or chunks over 128.
SELECT_LAUNCH = (64, 4, 3)
# With n = NB, put the first chunk's candidates straight into the empty set (False: merge them in rounds).
FILL_FIRST = True
# Query rows per program of the key-split merge: one, so that a decode step's B * H rows spread over the SMs.
# H100, B = 8 over a 64k cache (CUDA-graph replays): select with its merge 0.040 ms against 0.076 for 16
# rows per program, the whole step 0.118 against 0.153.
MERGE_ROWS = 1
# The compressed keys' chunks through a tensor descriptor (TMA on Hopper) where the layout allows it, instead
# of pointer loads: the same bits, and 8.57 against 10.18 ms at paper128, 2.98 against 3.32 at the small
# shape (H100, 64k; fewer address instructions in a kernel bound by its ALU pipe).
SELECT_TMA = True
# Groups (GP, G rounded up to a power of two) from 2 up to this size move the candidates to one copy per key
# before the merge (an identity tl.gather), so that the merge state and its rounds are not replicated over the
# GP lanes of the group sum. H100, 64k: select 2.97 -> 2.71 ms at G = 4, but 8.54 -> 9.13 at G = 16, where a
# program holds 4 queries and the rounds are fewer (G = 1 has no copies to remove; G = 8 was not measured).
COMPACT_MERGE_MAX_GP = 4


@triton.jit(do_not_specialize=["TQ", "TC"])
def _select_blocks_kernel(
    Q, KC, KCD, LSE, POS0, IDX, KEYS_PART,
    scale_log2, TQ, TC, H,
    sqb, sqt, sqh, skb, skt, skh, slb, slt, slh,
    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, DK: tl.constexpr, BLOCK_DK: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr,
    TOP_N: tl.constexpr, NP: tl.constexpr, NB: tl.constexpr, BC: tl.constexpr,
    INIT: tl.constexpr, LOCAL: tl.constexpr, PREC: tl.constexpr, REMAP_FIRST: tl.constexpr,
    SPLIT: tl.constexpr, FILL: tl.constexpr, KEY_BITS: tl.constexpr, KEY_SPLITS: tl.constexpr,
    TMA: tl.constexpr, COMPACT: tl.constexpr,
):
    R: tl.constexpr = BT * GP
    PER_BLOCK: tl.constexpr = SLC_BLOCK // CMP_STRIDE  # compressed tokens starting in one selection block
    SPAN: tl.constexpr = CMP_BLOCK // CMP_STRIDE  # stride units one compressed token covers
    CHUNK: tl.constexpr = NB * PER_BLOCK  # compressed tokens starting in one chunk of NB blocks (<= BC)
    TAG: tl.constexpr = (1 << KEY_BITS) - 1  # the low key bits that hold the tag
    NONE: tl.constexpr = -(1 << 31)  # the key of an excluded block or a taken candidate

    # The work grows with the position: the longest tiles go first, so that the short ones fill the tail.
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    t0 = pid_t * BT
    b64 = b.to(tl.int64)
    pos0 = tl.load(POS0 + b)

    # Rows: (query, head) pairs.
    r = tl.arange(0, R)
    t_row = t0 + r // GP
    g_row = r % GP
    row_ok = (g_row < G) & (t_row < TQ)
    pos_row = pos0 + t_row
    seen_row = tl.where(pos_row + 1 >= CMP_BLOCK, (pos_row + 1 - CMP_BLOCK) // CMP_STRIDE + 1, 0)
    dk = tl.arange(0, BLOCK_DK)
    q = tl.load(Q + b64 * sqb + t_row.to(tl.int64)[:, None] * sqt + (h * G + g_row)[:, None] * sqh + dk[None, :],
                mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)  # [R, BDK]
    lse = tl.load(LSE + b64 * slb + t_row.to(tl.int64) * slt + (h * G + g_row) * slh, mask=row_ok,
                  other=float("-inf")) * 1.4426950408889634
    row_live = row_ok & (lse > float("-inf"))
    lse = tl.where(row_live, lse, 0.0)
    # Chunks whose compressed tokens every row of the tile sees need no mask: a dead row (no visible
    # token, or padding) subtracts +inf instead, which gives p = 0.
    lse_dead_inf = tl.where(row_live, lse, float("inf"))
    first_pos = pos0 + t0
    seen_all = tl.minimum(tl.where(first_pos + 1 >= CMP_BLOCK, (first_pos + 1 - CMP_BLOCK) // CMP_STRIDE + 1, 0), TC)
    seen_all_or_0 = seen_all if SPLIT else 0

    # Queries of this tile.
    tq = t0 + tl.arange(0, BT)
    tq_ok = tq < TQ
    cur = (pos0 + tq) // SLC_BLOCK  # [BT] the query's own block c
    last_block = (pos0 + tl.minimum(t0 + BT, TQ) - 1) // SLC_BLOCK

    # Eq. 9 weights in stride units, chunk-local: compressed token i covers units [i, i + SPAN), block jl
    # covers units [jl * PER_BLOCK, (jl + 1) * PER_BLOCK). Column NB is the next chunk's first block.
    i_loc = tl.arange(0, BC)
    jl = tl.arange(0, NB)
    w = (tl.minimum(i_loc[:, None] + SPAN, (jl[None, :] + 1) * PER_BLOCK)
         - tl.maximum(i_loc[:, None], jl[None, :] * PER_BLOCK))
    w = tl.where(i_loc[:, None] < CHUNK, tl.maximum(w, 0), 0).to(tl.float32)  # [BC, NB]
    w_next = tl.minimum(i_loc + SPAN, (NB + 1) * PER_BLOCK) - tl.maximum(i_loc, NB * PER_BLOCK)
    w_next = tl.where(i_loc < CHUNK, tl.maximum(w_next, 0), 0).to(tl.float32)  # [BC]

    carry = tl.zeros([BT], tl.float32)
    col = tl.arange(0, NP)
    # Keys and ids of the chosen blocks so far, as an unordered set. Empty slots hold distinct negative
    # keys (so that the minimum is always one slot) and slots past TOP_N a key nothing can displace.
    slots = tl.zeros([BT, NP], tl.int32) + col[None, :]
    top = tl.where(slots < TOP_N, -1 - slots, (1 << 31) - 1)
    top_id = tl.full([BT, NP], -1, tl.int32)
    slot_tag = NB + col  # [NP]
    kc_base = KC + b64 * skb + h * skh
    if KEY_SPLITS > 1:
        # This program's share of the chunks, [c_lo, c_hi), whose candidates it merges. It starts one chunk
        # earlier (if any) for the carry alone: the tokens there overlap its first block.
        chunks = last_block // NB + 1
        per_split = tl.cdiv(chunks, KEY_SPLITS)
        c_lo = tl.minimum(tl.program_id(2) * per_split, chunks)
        c_hi = tl.minimum(c_lo + per_split, chunks)
        j_first = c_lo * NB
        j_start = tl.where(c_lo < c_hi, tl.maximum(c_lo - 1, 0), c_hi) * NB
        j_end = c_hi * NB
    else:
        j_first = 0
        j_start = 0
        j_end = last_block + 1
    for j0 in range(j_start, j_end, NB):
        i = j0 * PER_BLOCK + i_loc  # [BC] compressed token ids
        i_ok = (i_loc < CHUNK) & (i < TC)
        if TMA:
            # Tokens past TC read as zeros; those past the chunk (BC > CHUNK) are real keys that the zero
            # rows of w drop, and that p never overflows on: they lie inside the unmasked range or are masked.
            kt = tl.reshape(KCD.load([b, tl.cast(j0 * PER_BLOCK, tl.int32), h, 0]), [BC, BLOCK_DK]).T
        else:
            kt = tl.load(kc_base + i.to(tl.int64)[None, :] * skt + dk[:, None],
                         mask=i_ok[None, :] & (dk[:, None] < DK), other=0.0)  # [BDK, BC]
        s = tl.dot(q, kt, input_precision=PREC) * scale_log2  # [R, BC]
        if j0 * PER_BLOCK + BC <= seen_all_or_0:
            p = tl.exp2(s - lse_dead_inf[:, None])
        else:
            live = row_live[:, None] & i_ok[None, :] & (i[None, :] < seen_row[:, None])
            p = tl.where(live, tl.exp2(s - lse[:, None]), 0.0)
        if REMAP_FIRST:
            # Eq. 9 on the tensor cores for every (query, head) row, then the group sum on the
            # NB-wide result: the reshape moves [R, NB] through shared memory instead of [R, BC].
            if PREC == "ieee":  # noqa: SIM108 (a constexpr branch: only the taken side compiles)
                x = tl.dot(p, w, input_precision="ieee")  # [R, NB]
            else:
                # p in [0, 1] as float16 (the mantissa of tf32) stays in registers as the A operand,
                # like the P of flash attention; the weights are small integers, exact.
                x = tl.dot(p.to(tl.float16), w.to(tl.float16))
            blk = tl.sum(tl.reshape(x, [BT, GP, NB]), 1)  # [BT, NB] group sum (Eq. 10)
            blk = tl.where(jl[None, :] == 0, blk + carry[:, None], blk)
            carry = tl.sum(tl.reshape(tl.sum(p * w_next[None, :], 1), [BT, GP]), 1)
        else:
            p = tl.sum(tl.reshape(p, [BT, GP, BC]), 1)  # [BT, BC] group sum (Eq. 10)
            # A statement-level constexpr branch: Triton compiles only the taken side (tl.dot needs 16 rows).
            if BT >= 16:  # noqa: SIM108
                blk = tl.dot(p, w, input_precision="ieee")  # [BT, NB]
            else:
                blk = tl.sum(p[:, :, None] * w[None, :, :], 1)
            blk = tl.where(jl[None, :] == 0, blk + carry[:, None], blk)
            carry = tl.sum(p * w_next[None, :], 1)

        j = j0 + jl  # [NB] global block ids
        forced = (j[None, :] < INIT) | ((j[None, :] > cur[:, None] - LOCAL) & (j[None, :] <= cur[:, None]))
        score = tl.where(forced, float("inf"), blk)
        cand = (score.to(tl.int32, bitcast=True) & ~TAG) | (NB - 1 - jl)[None, :]
        cand = tl.where(j[None, :] <= cur[:, None], cand, NONE)
        if COMPACT:
            # An identity gather: it moves the candidates out of the layout the group sum leaves them in
            # (every key held by GP lanes) into one copy per key, and the merge state below follows them.
            cand = tl.gather(cand, tl.zeros([BT, NB], tl.int32) + jl[None, :], 1)
        if KEY_SPLITS > 1:
            cand = tl.where(j0 >= j_first, cand, NONE)  # the carry-only chunk before this program's share
        if FILL:
            # n = NB: every candidate of the first chunk is taken, straight into its slot.
            take = (j0 == j_first) & (cand >= 0)
            top = tl.where(take, (cand & ~TAG) | slot_tag[None, :], top)
            top_id = tl.where(take, j.to(tl.int32)[None, :], top_id)
            cand = tl.where(j0 == j_first, NONE, cand)
        # Merge: while some candidate beats the weakest chosen block, the best candidate replaces it.
        # Keys are unique, so each round moves exactly one block per row; rows with nothing left skip.
        weakest = tl.min(top, 1)
        rounds = tl.minimum(tl.max(tl.sum((cand > weakest[:, None]).to(tl.int32), 1)), TOP_N)
        for _ in range(rounds):
            best = tl.max(cand, 1)
            weakest = tl.min(top, 1)
            displaced = (top == weakest[:, None]) & (best > weakest)[:, None]
            top = tl.where(displaced, (best & ~TAG)[:, None] | slot_tag[None, :], top)
            top_id = tl.where(displaced, (j0 + NB - 1 - (best & TAG)).to(tl.int32)[:, None], top_id)
            cand = tl.where(cand == best[:, None], NONE, cand)

    row = (b64 * TQ + tq) * H + h  # [BT] (b, t, h)
    if KEY_SPLITS > 1:
        # This share's set, unordered: keys to KEYS_PART, ids (-1: empty) to IDX, [KEY_SPLITS, B, TQ, H, NP].
        row += tl.program_id(2).to(tl.int64) * tl.num_programs(1) * TQ
        part = row[:, None] * NP + col[None, :]
        tl.store(KEYS_PART + part, top, mask=tq_ok[:, None])
        tl.store(IDX + part, tl.where(col[None, :] < TOP_N, top_id, -1), mask=tq_ok[:, None])
        return
    out_ids = _ascending_ids(top_id, col[None, :] < TOP_N, BT, NP, TOP_N)
    tl.store(IDX + row[:, None] * TOP_N + col[None, :], out_ids, mask=tq_ok[:, None] & (col[None, :] < TOP_N))


@triton.jit
def _ascending_ids(ids, valid, ROWS: tl.constexpr, NP: tl.constexpr, TOP_N: tl.constexpr):
    """[ROWS, W] block ids (valid ones distinct) -> [ROWS, NP]: the valid ids ascending, then -1 (at most TOP_N).

    TOP_N rounds of "take the smallest remaining id"."""
    col = tl.arange(0, NP)
    ids = tl.where(valid & (ids >= 0), ids, (1 << 31) - 1)
    out_ids = tl.full([ROWS, NP], -1, tl.int32)
    for slot in tl.static_range(TOP_N):
        least = tl.min(ids, 1)[:, None]
        out_ids = tl.where(col[None, :] == slot, tl.where(least == (1 << 31) - 1, -1, least), out_ids)
        ids = tl.where(ids == least, (1 << 31) - 1, ids)
    return out_ids


@triton.jit
def _merge_split_sets_kernel(KEYS_PART, IDS_PART, IDX, ROWS, KEY_BITS: tl.constexpr, SPLITS: tl.constexpr,
                             SP: tl.constexpr, NP: tl.constexpr, TOP_N: tl.constexpr, ROWS_PER: tl.constexpr):
    """The n best of the key splits' sets, ids ascending then -1: IDX [ROWS, TOP_N] from [SPLITS, ROWS, NP].

    A key's score is its bits above the tag; equal scores go to the lower block id, as in the reference."""
    TAG: tl.constexpr = (1 << KEY_BITS) - 1
    NONE: tl.constexpr = -(1 << 31)
    W: tl.constexpr = SP * NP
    row = tl.program_id(0).to(tl.int64) * ROWS_PER + tl.arange(0, ROWS_PER)  # [RP]
    e = tl.arange(0, W)  # entry: split e // NP, slot e % NP
    row_ok = row < ROWS
    ok = row_ok[:, None] & (e[None, :] // NP < SPLITS)
    offs = ((e[None, :] // NP) * ROWS + row[:, None]) * NP + e[None, :] % NP
    ids = tl.load(IDS_PART + offs, mask=ok, other=-1)
    score = tl.where(ids >= 0, tl.load(KEYS_PART + offs, mask=ok, other=NONE) & ~TAG, NONE)  # [RP, W]
    chosen = tl.zeros([ROWS_PER, W], tl.int32)
    for _ in tl.static_range(TOP_N):
        best = tl.max(score, 1)[:, None]
        pick = tl.min(tl.where(score == best, ids, (1 << 31) - 1), 1)[:, None]  # the lowest id of the best
        hit = (ids == pick) & (best > NONE)
        chosen = tl.where(hit, 1, chosen)
        score = tl.where(hit, NONE, score)
    out_ids = _ascending_ids(ids, chosen > 0, ROWS_PER, NP, TOP_N)
    col = tl.arange(0, NP)
    tl.store(IDX + row[:, None] * TOP_N + col[None, :], out_ids, mask=row_ok[:, None] & (col[None, :] < TOP_N))


def key_bits(nb: int, top_n: int) -> int:
    """Low key bits the merge's tags take: candidates are tagged 0..NB-1, chosen slots NB..NB+NP-1."""
    return (nb + pow2(top_n) - 1).bit_length()


def _launch_config(G: int, dk: int, top_n: int, per_block: int, on_gpu: bool):
    """(GP, BT, NB, BC, num_warps, num_stages) for the selection kernel."""
    gp = pow2(G)
    nb = 16
    # Chunks of about 64..128 compressed keys keep the score tile [R, BC] in registers.
    while nb * per_block < 64 and on_gpu:
        nb *= 2
    bc = pow2(nb * per_block, 16)
    if not on_gpu:  # the interpreter pays per operation, not per element: few, large programs
        return gp, max(1, 64 // gp), nb, bc, 4, 1
    rows, warps, stages = SELECT_LAUNCH
    rows = min(rows, 64) if max(pow2(dk), bc) > 128 else rows
    bt = max(1, rows // gp)
    return gp, bt, nb, bc, warps, stages


def select_blocks(q, k_cmp, lse, *, cmp_block, cmp_stride, slc_block, top_n, scale=None, q_start=None,
                  init_blocks=1, local_blocks=2):
    """q [B, TQ, HQ, Dk], k_cmp [B, Tc, H, Dk], lse [B, TQ, HQ] -> block_idx [B, TQ, H, n] int32.

    Valid ids ascending, -1 padding at the end. q_start None means the queries start at position 0.
    """
    forward_only(q, k_cmp)
    check_qkv(q, k_cmp, k_cmp, k_name="k_cmp", v_name="k_cmp")
    B, TQ, HQ, DK = q.shape
    if lse.shape != (B, TQ, HQ):
        raise ValueError(f"lse must be [B, TQ, HQ] = {(B, TQ, HQ)}, got {tuple(lse.shape)}")
    check_selection_config(cmp_block, cmp_stride, slc_block, top_n, init_blocks, local_blocks)
    pos0 = query_starts(q_start, B, 0, q.device)
    return _select(q, k_cmp, lse, pos0, cmp_block=cmp_block, cmp_stride=cmp_stride, slc_block=slc_block,
                   top_n=top_n, scale=resolve_scale(q, scale), init_blocks=init_blocks, local_blocks=local_blocks)


def check_selection_config(cmp_block, cmp_stride, slc_block, top_n, init_blocks, local_blocks):
    if min(cmp_block, cmp_stride, slc_block, top_n) < 1 or min(init_blocks, local_blocks) < 0:
        raise ValueError(f"block sizes and top_n must be >= 1 (got l={cmp_block}, d={cmp_stride}, l'={slc_block}, "
                         f"n={top_n}) and forced block counts >= 0")
    if cmp_block % cmp_stride or slc_block % cmp_stride:
        raise ValueError(f"cmp_stride d ({cmp_stride}) must divide cmp_block l ({cmp_block}) and slc_block l' "
                         f"({slc_block})")
    if cmp_block - cmp_stride > slc_block:
        raise ValueError(f"the selection kernel needs l - d <= l' (got l={cmp_block}, d={cmp_stride}, "
                         f"l'={slc_block}): a compressed token may overlap at most two selection blocks")
    if top_n > 256:
        raise ValueError(f"top_n ({top_n}) exceeds the kernel's limit of 256")


def _select(q, k_cmp, lse, pos0, *, cmp_block, cmp_stride, slc_block, top_n, scale, init_blocks, local_blocks,
            splits=None):
    """Launch without argument checks. splits: programs per query tile, each over a share of the candidate
    blocks, their sets merged after (None: as many as fill the GPU when the launch alone would not)."""
    B, TQ, HQ, DK = q.shape
    TC, H = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // H
    q, k_cmp = last_dim_contiguous(q), last_dim_contiguous(k_cmp)
    lse = lse.float()
    idx = torch.empty(B, TQ, H, top_n, device=q.device, dtype=torch.int32)
    gp, bt, nb, bc, warps, stages = _launch_config(G, DK, top_n, slc_block // cmp_stride, q.is_cuda)
    if B * TQ * H == 0:
        return idx
    chunks = triton.cdiv(triton.cdiv(TC * cmp_stride + cmp_block, slc_block), nb)  # at most, for any query
    splits = key_splits(triton.cdiv(TQ, bt) * B * H, chunks, q.device, splits)
    np_ = pow2(top_n)
    if splits > 1:  # each split's set, unordered, for _merge_split_sets_kernel
        keys_part = torch.empty(splits, B, TQ, H, np_, device=q.device, dtype=torch.int32)
        ids_part = torch.empty_like(keys_part)
    else:
        keys_part = ids_part = idx  # the kernel writes the ascending ids to idx and no keys
    descriptors = tile_descriptors(bc, k_cmp) if SELECT_TMA else None
    grid = (triton.cdiv(TQ, bt), B * H, splits)
    _select_blocks_kernel[grid](
        q, k_cmp, *(descriptors or (k_cmp,)), lse, pos0, ids_part, keys_part, scale * LOG2E, TQ, TC, H,
        q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        G=G, GP=gp, BT=bt, DK=DK, BLOCK_DK=pow2(DK, 16), CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride,
        SLC_BLOCK=slc_block, TOP_N=top_n, NP=np_, NB=nb, BC=bc, INIT=init_blocks,
        LOCAL=local_blocks, PREC=dot_precision(q.dtype), REMAP_FIRST=REMAP_FIRST,
        SPLIT=SPLIT_MASK, FILL=FILL_FIRST and nb == top_n, KEY_BITS=key_bits(nb, top_n),
        KEY_SPLITS=splits, TMA=descriptors is not None, COMPACT=1 < gp <= COMPACT_MERGE_MAX_GP, num_warps=warps,
        num_stages=stages,
    )
    if splits > 1:
        rows = B * TQ * H
        _merge_split_sets_kernel[(triton.cdiv(rows, MERGE_ROWS),)](
            keys_part, ids_part, idx, rows, KEY_BITS=key_bits(nb, top_n), SPLITS=splits, SP=pow2(splits), NP=np_,
            TOP_N=top_n, ROWS_PER=MERGE_ROWS,
        )
    return idx
