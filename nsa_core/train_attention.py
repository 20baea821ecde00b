"""Differentiable NSA attention for training on a GPU, through FlexAttention.

Same math and `nsa_attention` signature as `reference.nsa_attention` for whole sequences (q_start 0):
the three branches become FlexAttention calls with mask functions (compressed: i*d + l - 1 <= t;
selected: the query's selected blocks, causally; window: t - w < s <= t). FlexAttention keeps no
T x T score matrix and skips the key tiles no query of a query tile needs, which is what makes
16k-token training affordable while the Triton kernels are forward-only. No gradient flows through
the top-n selection, so it runs on the compressed branch's lse through the forward-only Triton
kernel where that can run (`kernels.select_blocks`, which never stores the [T, Tc] score matrix,
otherwise the largest intermediate of a 16k-token step) and through the reference elsewhere.

The selection branch's block mask changes every step, so it is built from block_idx directly
(`BlockMask.from_kv_blocks`) rather than by evaluating a mask function over the T x T grid; the
window and compressed masks depend on positions only and are built once per shape.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from . import masks, reference

try:  # newer torch asks for the lse through return_aux and deprecates return_lse
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:
    AuxRequest = None

# FlexAttention's tile: queries and keys are grouped in blocks of this many tokens.
FLEX_BLOCK = 128


class FlexNSA:
    """A drop-in `ops` object for NSALM's layers: only `nsa_attention` is provided (full sequences)."""

    def __init__(self, *, compile: bool, triton_select: bool = False) -> None:
        """triton_select: pick the top-n blocks with `kernels.select_blocks` (a CUDA device, or Triton's
        interpreter in tests; same math as the reference)."""
        # Eager FlexAttention materialises the scores (fine for tests on a CPU); compiled it is a fused kernel.
        self._flex = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
        self._static_masks: dict[tuple, BlockMask] = {}
        self.triton_select = triton_select

    def nsa_attention(self, q, k, v, k_cmp, v_cmp, gates, *, config, scale=None, q_start=None, k_win=None,
                      v_win=None, return_parts=False):
        """q [B, T, HQ, Dk], k/v [B, T, H, D], k_cmp/v_cmp [B, Tc, H, D], gates [B, T, HQ, 3] -> o [B, T, HQ, Dv]."""
        if q.shape[1] != k.shape[1] or q_start not in (None, 0):
            raise ValueError("the FlexAttention path runs whole sequences only (queries = keys, q_start 0)")
        if return_parts:
            raise ValueError("the FlexAttention path is for training; trace through the reference backend")
        c = config
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        k_win = k if k_win is None else k_win
        v_win = v if v_win is None else v_win
        o_cmp, lse = self.compressed(q, k_cmp, v_cmp, cmp_block=c.cmp_block, cmp_stride=c.cmp_stride, scale=scale)
        block_idx = self.select(q, k_cmp, lse, config=c, scale=scale)
        o_slc = self.selected(q, k, v, block_idx, slc_block=c.slc_block, scale=scale)
        o_win = self.window(q, k_win, v_win, window=c.window, scale=scale)
        return reference.gated_sum(gates, o_cmp, o_slc, o_win)

    @torch.no_grad()
    def select(self, q, k_cmp, lse, *, config, scale):
        """Top-n block ids [B, T, H, n] from the compressed branch's scores (Eq. 8-12); no gradient."""
        c = config
        q, k_cmp, lse = q.detach(), k_cmp.detach(), lse.detach()
        lse = reference.selection_lse(q, k_cmp, lse, config=c, scale=scale, q_start=0)
        if self.triton_select:
            import kernels  # the forward-only kernels: the selection has no gradient to give

            return kernels.select_blocks(q, k_cmp.to(q.dtype), lse, cmp_block=c.cmp_block, cmp_stride=c.cmp_stride,
                                         slc_block=c.slc_block, top_n=c.top_n, scale=scale,
                                         init_blocks=c.init_blocks, local_blocks=c.local_blocks)
        return reference.select_blocks(q, k_cmp, lse, cmp_block=c.cmp_block, cmp_stride=c.cmp_stride,
                                       slc_block=c.slc_block, top_n=c.top_n, scale=scale,
                                       init_blocks=c.init_blocks, local_blocks=c.local_blocks)

    def compressed(self, q, k_cmp, v_cmp, *, cmp_block, cmp_stride, scale):
        """-> o [B, T, HQ, Dv], lse [B, T, HQ] float32 (-inf on rows that see no compressed token)."""
        B, T, HQ, _ = q.shape
        Tc = k_cmp.shape[1]
        if Tc == 0:
            return q.new_zeros(B, T, HQ, v_cmp.shape[-1]), q.new_full((B, T, HQ), float("-inf"), dtype=torch.float32)

        def visible(b, h, q_idx, kv_idx):
            return kv_idx * cmp_stride + cmp_block - 1 <= q_idx

        block_mask = self._static_mask(("cmp", T, Tc, cmp_block, cmp_stride, q.device), visible, T, Tc, q.device)
        o, lse = self._run(q, k_cmp, v_cmp, block_mask, scale, return_lse=True)
        # Rows before the first complete window see nothing: make them exactly 0 / -inf whatever the kernel did.
        seen = masks.visible_compressed(torch.arange(T, device=q.device), cmp_block, cmp_stride) > 0  # [T]
        o = torch.where(seen[None, :, None, None], o, 0.0)
        lse = torch.where(seen[None, :, None], lse.float(), float("-inf"))
        return o, lse

    def selected(self, q, k, v, block_idx, *, slc_block, scale):
        """Attention over each KV head's selected blocks (block_idx [B, T, H, n], -1 = empty), causally."""
        B, T, HQ, _ = q.shape
        H = k.shape[2]
        G = HQ // H
        num_slc = masks.num_selection_blocks(T, slc_block)
        idx = block_idx.long().permute(0, 2, 1, 3)  # [B, H, T, n]
        # One extra column soaks up the -1 padding so a single scatter builds the membership table.
        chosen = torch.zeros(B, H, T, num_slc + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, torch.where(idx < 0, num_slc, idx), True)
        chosen = chosen[..., :num_slc].contiguous()  # [B, H, T, Ns]

        def in_selected_block(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & chosen[b, h // G, q_idx, kv_idx // slc_block]

        block_mask = _block_mask_from_selection(chosen, slc_block=slc_block, group=G, mask_mod=in_selected_block)
        return self._run(q, k, v, block_mask, scale)

    def window(self, q, k, v, *, window, scale):
        T = q.shape[1]

        def in_window(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

        block_mask = self._static_mask(("win", T, window, q.device), in_window, T, T, q.device)
        return self._run(q, k, v, block_mask, scale)

    def _static_mask(self, key, mask_mod, q_len, kv_len, device) -> BlockMask:
        """Masks that depend only on positions are built once per shape (over one batch row and head)."""
        if key not in self._static_masks:
            self._static_masks[key] = create_block_mask(mask_mod, None, None, q_len, kv_len, device=device,
                                                        BLOCK_SIZE=FLEX_BLOCK)
        return self._static_masks[key]

    def _run(self, q, k, v, block_mask, scale, return_lse=False):
        """[B, T, H, D] layout in and out; FlexAttention itself wants [B, H, T, D]."""
        lse_request = {}
        if return_lse:
            lse_request = {"return_aux": AuxRequest(lse=True)} if AuxRequest else {"return_lse": True}
        out = self._flex(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
                         block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2], **lse_request)
        if return_lse:
            o, aux = out
            lse = aux.lse if AuxRequest else aux
            return o.transpose(1, 2), lse.transpose(1, 2)
        return out.transpose(1, 2)


def _block_mask_from_selection(chosen: torch.Tensor, *, slc_block: int, group: int, mask_mod) -> BlockMask:
    """BlockMask for the selection branch from chosen [B, H, T, Ns] (bool): a key tile is visited by a
    query tile iff some query of the tile selected a block overlapping the key tile (and it is causal)."""
    B, H, T, num_slc = chosen.shape
    n_tiles = -(-T // FLEX_BLOCK)
    pad = n_tiles * FLEX_BLOCK - T
    padded = torch.nn.functional.pad(chosen, (0, 0, 0, pad))  # [B, H, tiles*128, Ns]
    per_tile = padded.unflatten(2, (n_tiles, FLEX_BLOCK)).any(3)  # [B, H, Qtiles, Ns]
    # overlap[s, j]: selection block s shares tokens with key tile j.
    s_lo = torch.arange(num_slc, device=chosen.device) * slc_block
    t_lo = torch.arange(n_tiles, device=chosen.device) * FLEX_BLOCK
    overlap = (s_lo[:, None] < t_lo[None, :] + FLEX_BLOCK) & (s_lo[:, None] + slc_block > t_lo[None, :])
    visit = (per_tile.float() @ overlap.float()) > 0  # [B, H, Qtiles, Ktiles]
    causal = torch.ones(n_tiles, n_tiles, dtype=torch.bool, device=chosen.device).tril()
    visit = (visit & causal).repeat_interleave(group, dim=1)  # [B, HQ, Qtiles, Ktiles]
    num = visit.sum(-1, dtype=torch.int32)
    # Visited tile ids first (stable, ascending), then the rest, as FlexAttention expects.
    order = torch.argsort((~visit).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(num, order, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(T, T))
