"""The compression function phi of Eq. 7: one key (or value) per window of l raw tokens, stride d.

Compressed token i summarises raw tokens [i*d, i*d + l). Only complete windows exist, so a sequence
of T tokens has max(0, (T - l) // d + 1) of them; the trailing tokens are reached through the
selection and window branches until their window completes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import masks


def compression_windows(x: torch.Tensor, *, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """x [B, T, H, D] -> windows [B, Tc, H, l, D] of l consecutive tokens every d tokens."""
    B, T, H, D = x.shape
    tc = masks.num_compressed(T, cmp_block, cmp_stride)
    if tc == 0:
        return x.new_zeros(B, 0, H, cmp_block, D)
    return x.unfold(1, cmp_block, cmp_stride)[:, :tc].transpose(-1, -2)  # [B, Tc, H, l, D]


class Compressor(nn.Module):
    """phi for one of k or v, separate per KV head.

    "mlp" (paper section 3.3.1): a learned intra-block position encoding [H, l, D] is added to the
    window, which is flattened and mapped by a per-head two-layer MLP (l*D -> hidden -> D, GELU).
    "mean": the plain average of the window (fla-core's choice, with no parameters).
    """

    def __init__(self, *, kind: str, n_kv_head: int, head_dim: int, cmp_block: int, cmp_stride: int,
                 hidden: int) -> None:
        super().__init__()
        self.kind, self.cmp_block, self.cmp_stride = kind, cmp_block, cmp_stride
        if kind == "mlp":
            fan_in = cmp_block * head_dim
            self.pos_emb = nn.Parameter(torch.zeros(n_kv_head, cmp_block, head_dim))
            self.w1 = nn.Parameter(torch.randn(n_kv_head, fan_in, hidden) * fan_in**-0.5)
            self.b1 = nn.Parameter(torch.zeros(n_kv_head, hidden))
            self.w2 = nn.Parameter(torch.randn(n_kv_head, hidden, head_dim) * hidden**-0.5)
            self.b2 = nn.Parameter(torch.zeros(n_kv_head, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D] (un-rotated) -> compressed [B, Tc, H, D]."""
        win = compression_windows(x, cmp_block=self.cmp_block, cmp_stride=self.cmp_stride)  # [B, Tc, H, l, D]
        if self.kind == "mean":
            return win.mean(-2)
        flat = (win + self.pos_emb.to(win.dtype)).flatten(-2)  # [B, Tc, H, l*D]
        hidden = F.gelu(torch.einsum("bthf,hfe->bthe", flat, self.w1.to(flat.dtype)) + self.b1.to(flat.dtype))
        return torch.einsum("bthe,hed->bthd", hidden, self.w2.to(flat.dtype)) + self.b2.to(flat.dtype)
