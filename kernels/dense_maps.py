"""Flash-style Triton passes over the dense causal attention map that never write a probability.

The analyses (`nsa_core/analysis.py`) need three quadratic quantities of the dense map of a layer:
each query row's log-sum-exp, the share of its mass NSA covered (selected blocks plus window), and
its mass summed into key cells. Two passes give them with memory linear in T:

1. `dense_lse`: one online-softmax sweep per (query tile, query head) over keys 0..t that keeps the
   running max, the running sum and the running covered sum: lse [TQ, HQ] and covered share.
2. `binned_mass`: a second sweep that recomputes s = q.k, turns it into p = exp(s - lse) with the
   lse of pass 1 and sums p over consecutive key cells in registers: [TQ, HQ, C] with C = #cells.

Shapes: q [TQ, HQ, Dk] (queries at positions q_start.., rotated), k [TK, H, Dk], G = HQ // H query
heads per KV head, block_idx [TQ, H, n] int (-1 padding). Scores are computed in float32 with
IEEE products (tf32 would shift the maps by ~1e-3), whatever the input dtype. A key cell holds `cell`
tokens: a power of two up to 64 (several cells per 64-key tile, reduced by a reshape) or a
multiple of 64 (several tiles per cell); `supports_cell` says which. The host functions match the
chunked PyTorch path in `nsa_core/analysis.py` argument for argument.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Compiled kernels read module globals only as constexpr (the interpreter is laxer).
_LOG2E_K = tl.constexpr(LOG2E)
_LN2_K = tl.constexpr(0.6931471805599453)
BLOCK_M = 64  # query rows per program
BLOCK_N = 64  # keys per tile


def supports_cell(cell: int) -> bool:
    """Whether `binned_mass` runs for key cells of this many tokens."""
    return cell >= 1 and ((cell <= BLOCK_N and cell & (cell - 1) == 0) or cell % BLOCK_N == 0)


@triton.jit
def _covered(pos, rows, row_ok, keys, h, BIDX, stride_bt, stride_bh, window, slc_block, N_SLOTS: tl.constexpr):
    """[BM, BN] bool: key inside the query's window or in one of its KV head's selected blocks."""
    inside = (pos[:, None] - keys[None, :]) < window
    key_block = keys // slc_block
    for slot in tl.static_range(N_SLOTS):
        chosen = tl.load(BIDX + rows * stride_bt + h * stride_bh + slot, mask=row_ok, other=-1)  # [BM]
        inside = inside | (chosen[:, None] == key_block[None, :])
    return inside


# Sizes and offsets change with every input and zoom: specialising on them (Triton's default for ints
# equal to 1 or divisible by 16) would recompile the kernel for new lengths and regions.
_RUNTIME_INTS = ["TQ", "q_start", "window", "slc_block"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _lse_kernel(Q, K, LSE, COV, BIDX,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_bt, stride_bh,
                TQ, q_start, scale_log2, window, slc_block,
                G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                N_SLOTS: tl.constexpr, HAS_COVER: tl.constexpr):
    pid_m = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // G
    rows = pid_m * BM + tl.arange(0, BM)  # [BM]
    row_ok = rows < TQ
    pos = q_start + rows
    dims = tl.arange(0, BD)
    q = tl.load(Q + rows[:, None] * stride_qt + hq * stride_qh + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)  # [BM, BD]
    m = tl.full([BM], float("-inf"), tl.float32)
    total = tl.zeros([BM], tl.float32)
    covered = tl.zeros([BM], tl.float32)
    key_end = q_start + tl.minimum(pid_m * BM + BM, TQ)  # the tile's last query + 1: causal bound
    for k0 in range(0, key_end, BN):
        keys = k0 + tl.arange(0, BN)  # [BN]
        kt = tl.load(K + keys[None, :] * stride_kt + h * stride_kh + dims[:, None],
                     mask=(keys[None, :] < key_end) & (dims[:, None] < D), other=0.0).to(tl.float32)  # [BD, BN]
        s = tl.dot(q, kt, input_precision="ieee") * scale_log2  # [BM, BN], log2 units
        s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
        # Key 0 is in the first tile and visible to every row, so m is finite from the first tile on.
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        if HAS_COVER:
            inside = _covered(pos, rows, row_ok, keys, h, BIDX, stride_bt, stride_bh, window, slc_block, N_SLOTS)
            covered = covered * alpha + tl.sum(tl.where(inside, p, 0.0), 1)
        m = m_new
    HQ = tl.num_programs(1)
    tl.store(LSE + rows * HQ + hq, (m + tl.log2(total)) * _LN2_K, mask=row_ok)
    if HAS_COVER:
        tl.store(COV + rows * HQ + hq, covered / total, mask=row_ok)


@triton.jit(do_not_specialize=[*_RUNTIME_INTS, "k_lo", "k_hi", "cell", "num_cells", "tiles_per_step"])
def _binned_kernel(Q, K, LSE, OUT, OUTC, BIDX,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_bt, stride_bh,
                   TQ, q_start, k_lo, k_hi, cell, num_cells, tiles_per_step, scale_log2, window, slc_block,
                   G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   SUB: tl.constexpr, N_SLOTS: tl.constexpr, HAS_COVER: tl.constexpr):
    # One step covers NB = BN // SUB cells of SUB keys (cell < BN), or one cell of tiles_per_step tiles.
    NB: tl.constexpr = BN // SUB
    pid_m = tl.program_id(0)
    hq = tl.program_id(1)
    HQ = tl.num_programs(1)
    h = hq // G
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < TQ
    pos = q_start + rows
    dims = tl.arange(0, BD)
    q = tl.load(Q + rows[:, None] * stride_qt + hq * stride_qh + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)  # [BM, BD]
    lse2 = tl.load(LSE + rows * HQ + hq, mask=row_ok, other=0.0) * _LOG2E_K  # [BM]
    key_end = tl.minimum(k_hi, q_start + tl.minimum(pid_m * BM + BM, TQ))  # keys past it carry no mass
    live_cells = tl.maximum(tl.cdiv(key_end - k_lo, cell), 0)
    cells = tl.arange(0, NB)
    for c0 in range(0, live_cells, NB):
        acc = tl.zeros([BM, BN], tl.float32)
        acc_cov = tl.zeros([BM, BN], tl.float32)
        for t in range(0, tiles_per_step):
            keys = k_lo + c0 * cell + t * BN + tl.arange(0, BN)
            key_ok = keys < key_end
            kt = tl.load(K + keys[None, :] * stride_kt + h * stride_kh + dims[:, None],
                         mask=key_ok[None, :] & (dims[:, None] < D), other=0.0).to(tl.float32)  # [BD, BN]
            s = tl.dot(q, kt, input_precision="ieee") * scale_log2
            visible = key_ok[None, :] & (keys[None, :] <= pos[:, None])
            p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)  # [BM, BN]
            acc += p
            if HAS_COVER:
                inside = _covered(pos, rows, row_ok, keys, h, BIDX, stride_bt, stride_bh, window, slc_block,
                                  N_SLOTS)
                acc_cov += tl.where(inside, p, 0.0)
        out_cols = c0 + cells  # [NB]
        out_ptr = rows[:, None] * (HQ * num_cells) + hq * num_cells + out_cols[None, :]
        out_mask = row_ok[:, None] & (out_cols[None, :] < num_cells)
        tl.store(OUT + out_ptr, tl.sum(tl.reshape(acc, (BM, NB, SUB)), 2), mask=out_mask)
        if HAS_COVER:
            tl.store(OUTC + out_ptr, tl.sum(tl.reshape(acc_cov, (BM, NB, SUB)), 2), mask=out_mask)


def _check(q: torch.Tensor, k: torch.Tensor, block_idx: torch.Tensor | None) -> int:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q must be [TQ, HQ, Dk] and k [TK, H, Dk], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head dim {q.shape[2]} differs from k head dim {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if block_idx is not None and (block_idx.dim() != 3 or block_idx.shape[:2] != (q.shape[0], k.shape[1])):
        raise ValueError(f"block_idx must be [TQ={q.shape[0]}, H={k.shape[1]}, n], got {tuple(block_idx.shape)}")
    return q.shape[1] // k.shape[1]


def _prepare(q, k, block_idx):
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    if block_idx is None:
        return q, k, torch.full((1, 1, 1), -1, dtype=torch.int32, device=q.device)
    return q, k, block_idx.to(torch.int32).contiguous()


def dense_lse(q, k, *, scale, q_start=0, block_idx=None, slc_block=1, window=0):
    """Pass 1: lse [TQ, HQ] float32 of each query's dense causal row (keys 0..t), and with block_idx
    the share of the row's mass inside its selected blocks or the window [TQ, HQ] (else None)."""
    G = _check(q, k, block_idx)
    TQ, HQ, D = q.shape
    q, k, bidx = _prepare(q, k, block_idx)
    lse = torch.empty(TQ, HQ, dtype=torch.float32, device=q.device)
    cov = torch.empty_like(lse) if block_idx is not None else lse
    if TQ:
        _lse_kernel[(triton.cdiv(TQ, BLOCK_M), HQ)](
            q, k, lse, cov, bidx, q.stride(0), q.stride(1), k.stride(0), k.stride(1), bidx.stride(0), bidx.stride(1),
            TQ, q_start, scale * LOG2E, window, slc_block,
            G=G, D=D, BD=max(16, triton.next_power_of_2(D)), BM=BLOCK_M, BN=BLOCK_N,
            N_SLOTS=bidx.shape[-1], HAS_COVER=block_idx is not None, num_warps=4)
    return lse, (cov if block_idx is not None else None)


def binned_mass(q, k, lse, *, scale, q_start=0, k_lo=0, k_hi=None, cell=1, block_idx=None, slc_block=1, window=0):
    """Pass 2: dense mass of each query row summed over key cells [k_lo + c*cell, k_lo + (c+1)*cell)
    clipped to [k_lo, k_hi): mass [TQ, HQ, C] float32 with C = ceil((k_hi - k_lo) / cell), and with
    block_idx the covered part of it (else None). lse [TQ, HQ] comes from `dense_lse`."""
    G = _check(q, k, block_idx)
    if not supports_cell(cell):
        raise ValueError(f"cell must be a power of two up to {BLOCK_N} or a multiple of {BLOCK_N}, got {cell}")
    TQ, HQ, D = q.shape
    k_hi = k.shape[0] if k_hi is None else k_hi
    num_cells = -(-(k_hi - k_lo) // cell)
    q, k, bidx = _prepare(q, k, block_idx)
    lse = lse.float().contiguous()
    mass = torch.zeros(TQ, HQ, num_cells, dtype=torch.float32, device=q.device)
    cov = torch.zeros_like(mass) if block_idx is not None else mass
    if TQ and num_cells:
        _binned_kernel[(triton.cdiv(TQ, BLOCK_M), HQ)](
            q, k, lse, mass, cov, bidx, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            bidx.stride(0), bidx.stride(1), TQ, q_start, k_lo, k_hi, cell, num_cells, max(1, cell // BLOCK_N),
            scale * LOG2E, window, slc_block,
            G=G, D=D, BD=max(16, triton.next_power_of_2(D)), BM=BLOCK_M, BN=BLOCK_N, SUB=min(cell, BLOCK_N),
            N_SLOTS=bidx.shape[-1], HAS_COVER=block_idx is not None, num_warps=4)
    return mass, (cov if block_idx is not None else None)
