"""An auxiliary training loss that teaches NSA's block ranking where the attention would go.

The selection of Eq. 10-11 passes no gradient. The compressed branch's probabilities, which rank the
blocks, learn only through that branch's own output, scaled by its gate; in small models the gate
settles near zero and the ranking is left almost untrained (docs/training.md). A model can then read a
passkey from a block once it is selected and still never select it.

This loss gives the ranking a direct signal, the way DeepSeek-V3.2's indexer is trained toward the main
attention. For sampled queries of one layer:
- target: the dense attention of each query head over every key it may see (the selected branch's keys),
  pooled into selection blocks;
- model: the compressed branch's probabilities remapped onto the same blocks (Eq. 9), with gradient;
- both summed over each KV head's query heads as the config's `slc_scores` does ("paper": Eq. 10;
  "free": each head renormalised over the candidates first), then renormalised over the candidate
  blocks: the visible blocks that are not forced, the only ones the ranking decides;
- loss: KL(target || model), averaged over the sampled (query, KV head) pairs.

The target carries no gradient; the model side trains the queries and the compressed keys (the
compression MLP and the keys it reads).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from . import masks
from .config import NSAConfig


def first_ranked_position(config: NSAConfig) -> int:
    """The first query position with more candidate blocks than free slots, where the ranking decides."""
    return config.top_n * config.slc_block


def sample_positions(answer: torch.Tensor, count: int, *, first: int, generator: torch.Generator | None = None):
    """Query positions for the loss: answer[B, T] bool marks the queries whose next token is an answer token.

    -> positions [B, count] long, answer queries first (they are where retrieval happens), the rest drawn
    uniformly from [first, T); -1 where a row has fewer than `count` positions at or past `first`.
    """
    B, T = answer.shape
    t = torch.arange(T, device=answer.device)
    priority = torch.rand(B, T, device=answer.device, generator=generator) + 2.0 * answer.float()
    priority = torch.where(t >= first, priority, -1.0)
    top = priority.topk(min(count, T), dim=1)
    positions = torch.where(top.values >= 0, top.indices, -1)
    return F.pad(positions, (0, count - positions.shape[1]), value=-1)


def selection_alignment_loss(q: torch.Tensor, k: torch.Tensor, k_cmp: torch.Tensor, positions: torch.Tensor, *,
                             config: NSAConfig, scale: float | None = None) -> torch.Tensor:
    """KL(dense attention's block mass || the compressed branch's block importance) at sampled queries.

    q [B, T, HQ, Dk] (rotated), k [B, T, H, Dk] (the selected branch's keys, rotated), k_cmp [B, Tc, H, Dk]
    (rotated at their window starts), positions [B, M] long (-1 = unused) -> scalar float32; 0 (with the
    inputs' graph) when no position is used.
    """
    B, T, HQ, Dk = q.shape
    H = k.shape[2]
    scale = Dk ** -0.5 if scale is None else scale
    pos = positions.clamp_min(0)
    with torch.autocast(q.device.type, enabled=False):
        q_at = q.float()[torch.arange(B, device=q.device)[:, None], pos].unflatten(2, (H, HQ // H))  # [B, M, H, G, Dk]
        with torch.no_grad():
            dense = dense_block_mass(q_at, k.float(), pos, slc_block=config.slc_block, scale=scale)
        importance = compressed_block_mass(q_at, k_cmp.float(), pos, seq_len=T, config=config, scale=scale)
        candidate = candidate_blocks(pos, importance.shape[-1], config=config)  # [B, M, Ns]
        target = _group_distribution(dense, candidate, config.slc_scores)  # [B, M, H, Ns]
        model = _group_distribution(importance, candidate, config.slc_scores)
        kl = (torch.xlogy(target, target) - target * model.clamp_min(1e-30).log()).sum(-1)  # [B, M, H]
        keep = ((positions >= 0) & candidate.any(-1))[..., None].expand_as(kl)
        if not keep.any():
            return importance.sum() * 0.0
        return kl[keep].mean()


def dense_block_mass(q_at: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, *, slc_block: int,
                     scale: float) -> torch.Tensor:
    """Each query head's softmax attention over keys 0..t, summed per selection block.

    q_at [B, M, H, G, Dk] (the queries at pos), k [B, T, H, Dk], pos [B, M] -> [B, M, H, G, Ns].
    """
    T = k.shape[1]
    num_slc = masks.num_selection_blocks(T, slc_block)
    scores = torch.einsum("bmhgd,bthd->bmhgt", q_at, k) * scale  # [B, M, H, G, T]
    seen = torch.arange(T, device=k.device) <= pos[..., None]  # [B, M, T]
    p = torch.softmax(scores.masked_fill(~seen[:, :, None, None], -torch.inf), -1)
    return F.pad(p, (0, num_slc * slc_block - T)).unflatten(-1, (num_slc, slc_block)).sum(-1)


def compressed_block_mass(q_at: torch.Tensor, k_cmp: torch.Tensor, pos: torch.Tensor, *, seq_len: int,
                          config: NSAConfig, scale: float) -> torch.Tensor:
    """Eq. 8-9 per query head, with gradient: compressed probabilities over the visible compressed tokens,
    remapped onto the selection blocks of a seq_len sequence.

    q_at [B, M, H, G, Dk], k_cmp [B, Tc, H, Dk], pos [B, M]
    -> [B, M, H, G, Ns].
    """
    Tc = k_cmp.shape[1]
    num_slc = masks.num_selection_blocks(seq_len, config.slc_block)
    scores = torch.einsum("bmhgd,bchd->bmhgc", q_at, k_cmp) * scale  # [B, M, H, G, Tc]
    visible = torch.arange(Tc, device=k_cmp.device) < masks.visible_compressed(pos, config.cmp_block,
                                                                                config.cmp_stride)[..., None]
    # A row that sees no compressed token (an unused position) attends to all of them instead: a finite
    # softmax keeps its zero gradient from turning into NaN (0 * NaN) on the way back.
    visible = visible | ~visible.any(-1, keepdim=True)
    p_cmp = torch.softmax(scores.masked_fill(~visible[:, :, None, None], -torch.inf), -1)
    weights = masks.overlap_weights(Tc, num_slc, cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
                                    slc_block=config.slc_block, dtype=p_cmp.dtype, device=k_cmp.device)
    return p_cmp @ weights  # [B, M, H, G, Ns]


def candidate_blocks(pos: torch.Tensor, num_slc: int, *, config: NSAConfig) -> torch.Tensor:
    """Bool [B, M, Ns]: the blocks a query at pos may select that are not forced, the ones top-n ranks."""
    forced = masks.forced_blocks(pos, slc_block=config.slc_block, init_blocks=config.init_blocks,
                                 local_blocks=config.local_blocks, num_slc=num_slc)
    return (torch.arange(num_slc, device=pos.device) <= (pos // config.slc_block)[..., None]) & ~forced


def _group_distribution(mass: torch.Tensor, candidate: torch.Tensor, slc_scores: str) -> torch.Tensor:
    """mass [B, M, H, G, Ns] per query head -> [B, M, H, Ns]: a distribution over the candidate blocks."""
    mass = mass * candidate[:, :, None, None, :]
    if slc_scores == "free":  # every head casts a whole vote on the candidates (reference.selection_lse)
        mass = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    group = mass.sum(3)
    return group / group.sum(-1, keepdim=True).clamp_min(1e-30)
