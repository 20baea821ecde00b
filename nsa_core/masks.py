"""NSA index math, stated once and shared by the reference, the trace, the tests and the plots.

Positions are 0-indexed; a query at position t sees keys 0..t.

- Compressed token i summarises raw tokens [i*d, i*d + l - 1] (Eq. 7); a query at t sees it iff
  i*d + l - 1 <= t, so t sees floor((t + 1 - l) / d) + 1 of them once t >= l - 1 and none before.
- Selection block j covers raw tokens [j*l', (j+1)*l' - 1] (Eq. 12); a query at t may select blocks
  0..floor(t / l') and, inside its own block, only keys <= t.
- The window of a query at t is [t - w + 1, t]: w tokens, the query included.
"""

from __future__ import annotations

import torch


def num_compressed(seq_len: int, cmp_block: int, cmp_stride: int) -> int:
    """Tc: complete compression windows in a sequence of seq_len tokens (never negative)."""
    if seq_len < cmp_block:
        return 0
    return (seq_len - cmp_block) // cmp_stride + 1


def num_selection_blocks(seq_len: int, slc_block: int) -> int:
    """Ns: selection blocks covering seq_len tokens, the last one possibly partial."""
    return -(-seq_len // slc_block)


def visible_compressed(pos: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """How many compressed tokens each query position sees: floor((t + 1 - l) / d) + 1, at least 0."""
    return torch.div(pos + 1 - cmp_block, cmp_stride, rounding_mode="floor").add(1).clamp_min(0)


def span_overlap(start, end, lo, hi):
    """Tokens shared by the spans [start, end) and [lo, hi) (tensors, broadcast), at least 0."""
    return (torch.minimum(end, hi) - torch.maximum(start, lo)).clamp_min(0)


def overlap_weights(num_cmp: int, num_slc: int, *, cmp_block: int, cmp_stride: int, slc_block: int,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The Eq. 9 remap as a [Tc, Ns] matrix: W[i, j] = |C_i ∩ S_j| / d.

    C_i = [i*d, i*d + l) is compression window i and S_j = [j*l', (j+1)*l') selection block j, so
    p_slc = p_cmp @ W. In the paper configuration (l=32, d=16, l'=64) column j holds the weights
    1, 2, 2, 2, 1 on rows 4j-1 .. 4j+3.
    """
    start = torch.arange(num_cmp, device=device).unsqueeze(1) * cmp_stride  # [Tc, 1]
    block = torch.arange(num_slc, device=device).unsqueeze(0) * slc_block  # [1, Ns]
    return span_overlap(start, start + cmp_block, block, block + slc_block).to(dtype) / cmp_stride  # [Tc, Ns]


def query_positions(q_start: int | torch.Tensor | None, batch: int, num_q: int, default_start: int,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Absolute positions [B, TQ] of the queries; q_start is an int, a [B] tensor, or None (default_start)."""
    offsets = torch.arange(num_q, device=device)
    if q_start is None:
        q_start = default_start
    if isinstance(q_start, torch.Tensor):
        if q_start.shape != (batch,):
            raise ValueError(f"q_start must be an int or a [B={batch}] tensor, got shape {tuple(q_start.shape)}")
        return q_start.to(device=device, dtype=torch.long).unsqueeze(1) + offsets  # [B, TQ]
    if q_start < 0:
        raise ValueError(f"q_start must be >= 0, got {q_start}")
    return (offsets + int(q_start)).unsqueeze(0).expand(batch, num_q)  # [B, TQ]


def forced_blocks(pos: torch.Tensor, *, slc_block: int, init_blocks: int, local_blocks: int,
                  num_slc: int) -> torch.Tensor:
    """Bool [..., Ns]: blocks every query at pos selects: 0..init_blocks-1 and c-local_blocks+1..c."""
    current = (pos // slc_block).unsqueeze(-1)  # [..., 1]
    j = torch.arange(num_slc, device=pos.device)  # [Ns]
    initial = j < init_blocks
    local = (j > current - local_blocks) & (j <= current)
    return (initial | local) & (j <= current)
