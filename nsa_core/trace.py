"""The trace: what every NSA layer did on one input, stored in memory linear in the context length.

Per layer (T tokens, HQ query heads, H KV heads, n selected blocks):
- gates [T, HQ, 3]: sigmoid gates in (cmp, slc, win) order;
- block_idx [T, H, n]: selected blocks, ascending, -1 padding;
- block_scores [T, H, n]: importance p_slc' of each chosen block (NaN in -1 slots; forced blocks keep
  their real score, since forcing does not change it);
- lse_cmp [T, HQ]: log-sum-exp of the compressed branch (-inf where no compressed token is visible);
- branch_norms [T, HQ, 3]: L2 norm of each branch's output before gating.
The window of query t is [max(0, t - w + 1), t]; it is derived, not stored.
Nothing quadratic in T is kept: maps and single-query details are computed on demand from the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import reference
from .config import NSAConfig

# Queries per chunk when gathering the chosen blocks' scores, bounding the transient [C, H, Ns] matrix.
_SCORE_CHUNK = 4096


@dataclass
class LayerTrace:
    gates: np.ndarray  # [T, HQ, 3] float32
    block_idx: np.ndarray  # [T, H, n] int32
    block_scores: np.ndarray  # [T, H, n] float32
    lse_cmp: np.ndarray  # [T, HQ] float32
    branch_norms: np.ndarray  # [T, HQ, 3] float32

    @classmethod
    def from_parts(cls, config: NSAConfig, inputs, parts) -> LayerTrace:
        """Record batch row 0 of one layer's AttentionInputs and NSAParts."""
        with torch.no_grad():
            block_scores = _chosen_block_scores(config, inputs.q[:1], inputs.k_cmp[:1], parts.lse_cmp[:1],
                                                parts.block_idx[:1])
            norms = torch.stack([parts.o_cmp[0].float().norm(dim=-1), parts.o_slc[0].float().norm(dim=-1),
                                 parts.o_win[0].float().norm(dim=-1)], -1)  # [T, HQ, 3]
            return cls(
                gates=inputs.gates[0].float().cpu().numpy(),
                block_idx=parts.block_idx[0].cpu().numpy().astype(np.int32),
                block_scores=block_scores[0].cpu().numpy(),
                lse_cmp=parts.lse_cmp[0].float().cpu().numpy(),
                branch_norms=norms.cpu().numpy(),
            )


@dataclass
class ModelTrace:
    config: NSAConfig
    token_ids: np.ndarray  # [T] int64
    layers: list[LayerTrace]

    @classmethod
    def from_parts(cls, config: NSAConfig, ids: torch.Tensor, records: list) -> ModelTrace:
        """records: per layer (AttentionInputs, NSAParts) from NSALM.forward(trace=True)."""
        layers = [LayerTrace.from_parts(config, inputs, parts) for inputs, parts in records]
        return cls(config=config, token_ids=ids[0].cpu().numpy().astype(np.int64), layers=layers)

    def window_bounds(self) -> np.ndarray:
        """[T, 2] inclusive first and last key position of each query's window."""
        t = np.arange(len(self.token_ids))
        return np.stack([np.maximum(t - self.config.window + 1, 0), t], -1)


def _chosen_block_scores(config: NSAConfig, q, k_cmp, lse, block_idx) -> torch.Tensor:
    """Importance of each chosen block: scores [B, T, H, n] float32, NaN where block_idx is -1."""
    T = q.shape[1]
    num_slc = max(1, -(-T // config.slc_block))
    out = []
    for lo in range(0, T, _SCORE_CHUNK):
        hi = min(lo + _SCORE_CHUNK, T)
        scores = reference.importance_scores(q[:, lo:hi], k_cmp, lse[:, lo:hi], cmp_block=config.cmp_block,
                                             cmp_stride=config.cmp_stride, slc_block=config.slc_block,
                                             q_start=lo, num_slc=num_slc)  # [B, C, H, Ns]
        idx = block_idx[:, lo:hi].long()
        chosen = torch.gather(scores, -1, idx.clamp_min(0))
        out.append(torch.where(idx >= 0, chosen, torch.nan))
    return torch.cat(out, 1)
