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
compression MLP and the keys it reads), or the compression MLPs alone when the caller passes queries and
compressed keys built from detached inputs (`Recipe.select_align_trains`, docs/training.md).
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

from . import masks
from .config import NSAConfig

# Stands in for log 0 on the side that carries gradient: logsumexp over nothing but -inf has NaN gradients.
# exp(LOG_ZERO) is 0 in float32, so it changes no sum that has a real term.
LOG_ZERO = -1e4


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
    dtype = torch.promote_types(q.dtype, torch.float32)  # bf16 activations are scored in float32
    with torch.autocast(q.device.type, enabled=False):
        q_at = q.to(dtype)[torch.arange(B, device=q.device)[:, None], pos].unflatten(2, (H, HQ // H))  # [B,M,H,G,Dk]
        with torch.no_grad():
            dense = dense_block_mass(q_at, k.to(dtype), pos, slc_block=config.slc_block, scale=scale)
        log_importance = compressed_block_log_mass(q_at, k_cmp.to(dtype), pos, seq_len=T, config=config, scale=scale)
        candidate = candidate_blocks(pos, dense.shape[-1], config=config)  # [B, M, Ns]
        target = _group_distribution(dense, candidate, config.slc_scores)  # [B, M, H, Ns]
        log_model = _group_log_distribution(log_importance, candidate, config.slc_scores)
        kl = (torch.xlogy(target, target) - target * log_model).sum(-1)  # [B, M, H]; log_model is finite
        # A mean over the used (query, KV head) pairs, without a host-side branch: 0 when there are none.
        keep = ((positions >= 0) & candidate.any(-1))[..., None].expand_as(kl)
        return (kl * keep).sum() / keep.sum().clamp_min(1)


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


def compressed_block_log_mass(q_at: torch.Tensor, k_cmp: torch.Tensor, pos: torch.Tensor, *, seq_len: int,
                              config: NSAConfig, scale: float) -> torch.Tensor:
    """The log of Eq. 8-9 per query head, with gradient: compressed probabilities over the visible compressed
    tokens, remapped onto the selection blocks of a seq_len sequence.

    q_at [B, M, H, G, Dk], k_cmp [B, Tc, H, Dk], pos [B, M] -> [B, M, H, G, Ns] (LOG_ZERO or less where no
    visible token overlaps). In log space: a trained head can put so little on a far block that its
    probability underflows float32, and a block the loss cannot see it cannot move.
    """
    Tc = k_cmp.shape[1]
    scores = torch.einsum("bmhgd,bchd->bmhgc", q_at, k_cmp) * scale  # [B, M, H, G, Tc]
    visible = torch.arange(Tc, device=k_cmp.device) < masks.visible_compressed(pos, config.cmp_block,
                                                                                config.cmp_stride)[..., None]
    # A row that sees no compressed token (an unused position) attends to all of them instead: finite values
    # keep its zero gradient from turning into NaN (0 * NaN) on the way back.
    visible = visible | ~visible.any(-1, keepdim=True)
    log_p = torch.log_softmax(scores.masked_fill(~visible[:, :, None, None], -torch.inf), -1).clamp_min(LOG_ZERO)
    # Eq. 9 as a gather: block j's mass is the sum over the few compressed tokens that overlap it.
    tokens, log_weight = _overlapping_tokens(Tc, masks.num_selection_blocks(seq_len, config.slc_block),
                                             config.cmp_block, config.cmp_stride, config.slc_block,
                                             k_cmp.device)  # [Ns, K] each
    gathered = log_p[..., tokens.flatten()].unflatten(-1, tokens.shape)  # [B, M, H, G, Ns, K]
    return torch.logsumexp(gathered + log_weight.to(log_p.dtype), -1)


def candidate_blocks(pos: torch.Tensor, num_slc: int, *, config: NSAConfig) -> torch.Tensor:
    """Bool [B, M, Ns]: the blocks a query at pos may select that are not forced, the ones top-n ranks."""
    forced = masks.forced_blocks(pos, slc_block=config.slc_block, init_blocks=config.init_blocks,
                                 local_blocks=config.local_blocks, num_slc=num_slc)
    return (torch.arange(num_slc, device=pos.device) <= (pos // config.slc_block)[..., None]) & ~forced


@functools.lru_cache(maxsize=16)
def _overlapping_tokens(num_cmp: int, num_slc: int, cmp_block: int, cmp_stride: int, slc_block: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each selection block, the compressed tokens overlapping it and the log of their Eq. 9 weights
    (`masks.overlap_weights`): tokens [Ns, K] and log_weight [Ns, K] (LOG_ZERO on padding), K the most any
    block has. Cached: every layer of every step asks for the same table, and K is read back from the device."""
    weights = masks.overlap_weights(num_cmp, num_slc, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                    slc_block=slc_block, device=device).T  # [Ns, Tc]
    top = weights.topk(int((weights > 0).sum(-1).max()), dim=-1)  # the nonzero weights, padded with zeros
    return top.indices, torch.where(top.values > 0, top.values.log(), LOG_ZERO)


def _group_log_distribution(log_mass: torch.Tensor, candidate: torch.Tensor, slc_scores: str) -> torch.Tensor:
    """log_mass [B, M, H, G, Ns] per query head -> [B, M, H, Ns]: the log of a distribution over the candidate
    blocks (about LOG_ZERO elsewhere), the heads of each group summed as `slc_scores` sums them."""
    log_mass = log_mass.masked_fill(~candidate[:, :, None, None, :], LOG_ZERO)
    if slc_scores == "free":  # every head casts a whole vote on the candidates (reference.selection_lse)
        log_mass = log_mass - torch.logsumexp(log_mass, -1, keepdim=True)
    group = torch.logsumexp(log_mass, 3)  # [B, M, H, Ns]
    return group - torch.logsumexp(group, -1, keepdim=True)


def _group_distribution(mass: torch.Tensor, candidate: torch.Tensor, slc_scores: str) -> torch.Tensor:
    """mass [B, M, H, G, Ns] per query head -> [B, M, H, Ns]: a distribution over the candidate blocks (0
    elsewhere); a head with no mass on them casts no vote."""
    mass = mass * candidate[:, :, None, None, :]
    if slc_scores == "free":
        mass = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    group = mass.sum(3)
    return group / group.sum(-1, keepdim=True).clamp_min(1e-30)
