"""On-demand analyses behind every view of the app, each bounded in memory at any context length.

"Dense" everywhere means the full causal softmax of a query head's rotated query against the
selection branch's rotated keys of its KV head (hq // G), scale Dk^-0.5: the attention that full
attention would have computed from the same projections. "Covered" means inside the blocks NSA
selected for that KV head plus the sliding window. No function here ever holds a T x T matrix:

| function               | returns                                                            | cost            |
|------------------------|--------------------------------------------------------------------|-----------------|
| query_detail           | one query: cmp probabilities, block importance, chosen and forced  | O(T) per head   |
|                        | blocks, window, gates and the dense row                            |                 |
| pooled_dense_map       | dense mass of one head summed into at most grid x grid cells, and  | O(T^2) compute, |
|                        | the covered part of it (the miss map is the difference)            | O(grid^2) out   |
| pooled_selection_map   | how often each key block was chosen, per query bin (from a trace)  | O(T n)          |
| dense_recall           | [T, HQ] share of dense mass that NSA covered                       | O(T^2) compute  |
| oracle_overlap         | [T, H] overlap of NSA's blocks with the top-n blocks by dense mass | O(T^2) compute  |
| gate_stats, gate_atlas | gate distributions, along the position, around a token range       | O(T)            |

The quadratic ones run chunked over queries in PyTorch on the CPU, and as flash-style Triton kernels
(`kernels/dense_maps.py`) when the model is on CUDA: a first pass writes each row's log-sum-exp and
covered mass, a second bins exp(s - lse) into cells. Both paths share the signatures of
`dense_lse` and `binned_mass` below.

Functions that need projections take the model and ids [1, T] and recompute the layer's inputs
(`NSALM.attention_inputs`); pass `inputs=` (from `layer_inputs`) to reuse them across calls.
Pooled cells are whole numbers of tokens: a power of two up to 64, a multiple of 64 above, so that
cells line up with the selection blocks and the kernel tiles; edges are token positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import masks, reference
from .model import NSALM, AttentionInputs
from .trace import LayerTrace, ModelTrace

# Score elements one chunk of the PyTorch path may hold (~16 MB of float32 per temporary).
_CHUNK_ELEMENTS = 1 << 22
# Query rows per kernel call when the result is per row and per cell ([rows, HQ, C] float32).
_KERNEL_ROWS_ELEMENTS = 1 << 26

QUANTILE_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)


# Results ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryDetail:
    """Everything one query of one layer saw. HQ query heads, H KV heads, Tc compressed tokens, Ns blocks."""

    layer: int
    query: int
    cmp_probs: np.ndarray  # [HQ, Tc] compressed-branch probabilities (0 for tokens not yet complete)
    lse_cmp: np.ndarray  # [HQ] (-inf when no compressed token is visible)
    block_importance: np.ndarray  # [H, Ns] p_slc' summed over the group, per config.slc_scores (0 for future blocks)
    selected: np.ndarray  # [H, n] int32 chosen blocks, ascending, -1 padding
    forced: np.ndarray  # [Ns] bool: blocks every query at this position takes
    window: tuple[int, int]  # inclusive first and last key of the sliding window
    gates: np.ndarray  # [HQ, 3] (cmp, slc, win)
    dense_row: np.ndarray  # [HQ, query + 1] full causal softmax over keys 0..query

    @property
    def voted(self) -> np.ndarray:
        """[H] bool: whether any block of the KV head's group has importance. Every score is 0 when no
        compressed token is visible yet, or with "free" scores when each head of the group attended only to
        forced blocks (it casts no vote): the blocks then chosen are ties, taken by lowest id."""
        return self.block_importance.any(-1)

    def importance_rank(self, kv_head: int, blocks: np.ndarray) -> int:
        """The best rank (0 = first, ties share the better rank) of any of `blocks` in the KV head's
        importance, or -1 where the group cast no vote and there is no ranking."""
        if not self.voted[kv_head]:
            return -1
        scores = self.block_importance[kv_head]
        return min(int((scores > scores[b]).sum()) for b in blocks)


@dataclass(frozen=True)
class PooledMap:
    """A quadratic map summed into cells. Row r covers queries row_edges[r]..row_edges[r+1]-1 and
    column c keys col_edges[c]..col_edges[c+1]-1 (token positions).

    kind "dense": values = dense attention mass of query head `head` in each cell (each query row
    carries mass 1 over all its keys, so a full map sums to T); covered = the part of it inside NSA's
    selection plus window (given a trace), None otherwise.
    kind "selection": values = share of the cell's (query, key block) pairs where KV head `head`
    chose the block by top-n; forced = the same share for forced blocks (block 0 and the local
    blocks); window = share of the cell's (query, key token) pairs inside the sliding window band.
    """

    kind: str
    layer: int
    head: int
    values: np.ndarray  # [R, C] float32
    row_edges: np.ndarray  # [R + 1] int64
    col_edges: np.ndarray  # [C + 1] int64
    covered: np.ndarray | None = None  # [R, C] float32, dense only
    forced: np.ndarray | None = None  # [R, C] float32, selection only
    window: np.ndarray | None = None  # [R, C] float32, selection only

    @property
    def region(self) -> tuple[int, int, int, int]:
        """(q_lo, q_hi, k_lo, k_hi), half-open token positions."""
        return int(self.row_edges[0]), int(self.row_edges[-1]), int(self.col_edges[0]), int(self.col_edges[-1])


@dataclass(frozen=True)
class GateStats:
    """Gate behaviour of one layer, per query head and branch (cmp, slc, win)."""

    layer: int
    hist_edges: np.ndarray  # [bins + 1] over [0, 1]
    hist: np.ndarray  # [HQ, 3, bins] int64 counts of tokens
    mean: np.ndarray  # [HQ, 3]
    quantiles: np.ndarray  # [len(QUANTILE_LEVELS), HQ, 3]
    position_edges: np.ndarray  # [P + 1] token positions
    position_mean: np.ndarray  # [P, HQ, 3] mean gate per position bin
    token_range: tuple[int, int] | None = None  # half-open [lo, hi) asked about
    around_positions: np.ndarray | None = None  # [L] positions lo - context .. hi + context - 1, clipped
    around: np.ndarray | None = None  # [L, HQ, 3] the gates there, token by token
    inside_mean: np.ndarray | None = None  # [HQ, 3] mean over the range
    outside_mean: np.ndarray | None = None  # [HQ, 3] mean over every other token (NaN if none)


# Entry points -------------------------------------------------------------------------------------


def layer_inputs(model: NSALM, ids: torch.Tensor, layer: int) -> AttentionInputs:
    """The projections of layer `layer` for ids [1, T], for reuse across the functions below."""
    _check_ids(model, ids)
    return model.attention_inputs(ids, layer)


@torch.no_grad()
def query_detail(model: NSALM, ids: torch.Tensor, *, layer: int, query: int,
                 inputs: AttentionInputs | None = None) -> QueryDetail:
    """What query position `query` of layer `layer` saw in each branch, and its dense softmax row.

    ids [1, T]. Recomputes the selection with the reference, so on the Triton backend a block tied
    in score with another may differ from the trace's choice.
    """
    c = model.config
    T = _check_ids(model, ids)
    if not 0 <= query < T:
        raise IndexError(f"query must be in 0..{T - 1}, got {query}")
    a = inputs if inputs is not None else model.attention_inputs(ids, layer)
    q = a.q[:1, query:query + 1].float()  # [1, 1, HQ, Dk]
    k_cmp = a.k_cmp[:1].float()  # [1, Tc, H, Dk]
    H, Tc = c.n_kv_head, k_cmp.shape[1]
    num_slc = masks.num_selection_blocks(T, c.slc_block)
    _, lse = reference.compressed_attention(q, k_cmp, a.v_cmp[:1].float(), cmp_block=c.cmp_block,
                                            cmp_stride=c.cmp_stride, q_start=query)  # [1, 1, HQ]
    score_lse = reference.selection_lse(q, k_cmp, lse, config=c, q_start=query)
    scores = reference.importance_scores(q, k_cmp, score_lse, cmp_block=c.cmp_block, cmp_stride=c.cmp_stride,
                                         slc_block=c.slc_block, q_start=query, num_slc=num_slc)  # [1, 1, H, Ns]
    pos = torch.tensor([[query]], device=q.device)
    selected = reference.top_n_blocks(scores, pos, slc_block=c.slc_block, top_n=c.top_n, init_blocks=c.init_blocks,
                                      local_blocks=c.local_blocks)  # [1, 1, H, n]
    forced = masks.forced_blocks(pos[0, 0], slc_block=c.slc_block, init_blocks=c.init_blocks,
                                 local_blocks=c.local_blocks, num_slc=num_slc)  # [Ns]
    # Compressed probabilities over every compressed token: exp(s - lse) where visible.
    s_cmp = torch.einsum("hgd,khd->hgk", q[0, 0].unflatten(0, (H, -1)), k_cmp[0]).flatten(0, 1) * c.head_dim ** -0.5
    visible = int(masks.visible_compressed(pos[0, 0], c.cmp_block, c.cmp_stride))
    row_lse = lse[0, 0][:, None]  # [HQ, 1]
    cmp_probs = torch.where((torch.arange(Tc, device=q.device) < visible) & torch.isfinite(row_lse),
                            torch.exp(s_cmp - row_lse), 0.0)  # [HQ, Tc]
    # The dense row: one query against keys 0..query, softmax per head.
    keys = a.k[0, :query + 1].float().repeat_interleave(c.group_size, 1)  # [query+1, HQ, Dk]
    s_dense = torch.einsum("hd,khd->hk", q[0, 0], keys) * c.head_dim ** -0.5  # [HQ, query+1]
    return QueryDetail(
        layer=layer,
        query=query,
        cmp_probs=cmp_probs.cpu().numpy(),
        lse_cmp=lse[0, 0].cpu().numpy(),
        block_importance=scores[0, 0].cpu().numpy(),
        selected=selected[0, 0].cpu().numpy().astype(np.int32),
        forced=forced.cpu().numpy(),
        window=(max(0, query - c.window + 1), query),
        gates=a.gates[0, query].float().cpu().numpy(),
        dense_row=torch.softmax(s_dense, -1).cpu().numpy(),
    )


@torch.no_grad()
def pooled_dense_map(model: NSALM, ids: torch.Tensor, *, layer: int, head: int, grid: int = 512,
                     region: tuple[int, int, int, int] | None = None, trace: ModelTrace | None = None,
                     inputs: AttentionInputs | None = None) -> PooledMap:
    """Dense attention mass of query head `head`, summed into at most grid x grid cells.

    ids [1, T]; region (q_lo, q_hi, k_lo, k_hi) half-open zooms into part of the map (default: all of
    it). Each query row is normalised over all its keys 0..t, so a zoomed map shows the true mass
    of its cells. With a trace, `covered` holds the part of each cell inside NSA's selection plus
    window. Memory: O(grid^2) for the result, chunked rows inside.
    """
    c = model.config
    T = _check_ids(model, ids)
    _check_head(head, c.n_head, "head")
    q_lo, q_hi, k_lo, k_hi = _check_region(region, T)
    row_cell, col_cell = _cell_size(q_hi - q_lo, grid), _cell_size(k_hi - k_lo, grid)
    a = inputs if inputs is not None else model.attention_inputs(ids, layer)
    kv = head // c.group_size
    q = a.q[0, q_lo:q_hi, head:head + 1]  # [Tq, 1, Dk]
    k = a.k[0, :, kv:kv + 1]  # [T, 1, Dk]
    block_idx = None
    if trace is not None:
        block_idx = torch.from_numpy(_trace_layer(trace, layer, T).block_idx[q_lo:q_hi, kv:kv + 1]).to(q.device)
    impl = _impl(q.device, col_cell)
    scale = c.head_dim ** -0.5
    num_cols = -(-(k_hi - k_lo) // col_cell)
    values = torch.zeros(-(-(q_hi - q_lo) // row_cell), num_cols, dtype=torch.float32)
    covered = torch.zeros_like(values) if block_idx is not None else None
    rows_per_call = _rows_per_call(num_cols, row_cell)
    for lo in range(0, q_hi - q_lo, rows_per_call):
        hi = min(lo + rows_per_call, q_hi - q_lo)
        lse, _ = impl.dense_lse(q[lo:hi], k, scale=scale, q_start=q_lo + lo)
        mass, cov = impl.binned_mass(q[lo:hi], k, lse, scale=scale, q_start=q_lo + lo, k_lo=k_lo, k_hi=k_hi,
                                     cell=col_cell, block_idx=None if block_idx is None else block_idx[lo:hi],
                                     slc_block=c.slc_block, window=c.window)  # [rows, 1, C]
        r0 = lo // row_cell  # rows_per_call is a whole number of row cells
        pooled = _pool_rows(mass[:, 0], row_cell).cpu()  # pooled where computed: only [R, C] crosses to the host
        values[r0:r0 + len(pooled)] += pooled
        if covered is not None:
            covered[r0:r0 + len(pooled)] += _pool_rows(cov[:, 0], row_cell).cpu()
    return PooledMap(kind="dense", layer=layer, head=head, values=values.numpy(),
                     row_edges=_edges(q_lo, q_hi, row_cell), col_edges=_edges(k_lo, k_hi, col_cell),
                     covered=None if covered is None else covered.numpy())


def pooled_selection_map(trace: ModelTrace, *, layer: int, kv_head: int, grid: int = 512,
                         region: tuple[int, int, int, int] | None = None) -> PooledMap:
    """How often KV head `kv_head` chose each key block, per query bin; forced blocks and window apart.

    region (q_lo, q_hi, k_lo, k_hi) half-open; the key range is widened to whole selection blocks.
    Columns are whole numbers of blocks. Memory: O(grid^2 + T n).
    """
    c = trace.config
    T = trace.num_tokens
    lt = _trace_layer(trace, layer, T)
    _check_head(kv_head, c.n_kv_head, "kv_head")
    q_lo, q_hi, k_lo, k_hi = _check_region(region, T)
    ls = c.slc_block
    b_lo, b_hi = k_lo // ls, -(-k_hi // ls)  # key blocks touching the region
    row_cell = _cell_size(q_hi - q_lo, grid)
    blocks_per_col = -(-(b_hi - b_lo) // grid)
    R, C = -(-(q_hi - q_lo) // row_cell), -(-(b_hi - b_lo) // blocks_per_col)
    t = np.arange(q_lo, q_hi)
    idx = lt.block_idx[q_lo:q_hi, kv_head].astype(np.int64)  # [Tq, n]
    current = (t // ls)[:, None]
    forced = (idx >= 0) & ((idx < c.init_blocks) | (idx > current - c.local_blocks)) & (idx <= current)
    inside = (idx >= b_lo) & (idx < b_hi)
    cell = ((t - q_lo) // row_cell)[:, None] * C + (idx - b_lo) // blocks_per_col  # [Tq, n] flat cell ids
    chosen_counts = np.bincount(cell[inside & ~forced], minlength=R * C).reshape(R, C)
    forced_counts = np.bincount(cell[inside & forced], minlength=R * C).reshape(R, C)
    block_edges = _edges(b_lo, b_hi, blocks_per_col)  # [C + 1] block ids
    col_edges = np.minimum(block_edges * ls, T)
    row_edges = _edges(q_lo, q_hi, row_cell)
    pairs = np.diff(row_edges)[:, None] * np.diff(block_edges)[None, :]  # (query, block) pairs per cell
    window = _window_share(row_edges, col_edges, c.window)
    return PooledMap(kind="selection", layer=layer, head=kv_head,
                     values=(chosen_counts / pairs).astype(np.float32), row_edges=row_edges, col_edges=col_edges,
                     forced=(forced_counts / pairs).astype(np.float32), window=window)


@torch.no_grad()
def dense_recall(model: NSALM, ids: torch.Tensor, trace: ModelTrace, *, layer: int,
                 inputs: AttentionInputs | None = None) -> np.ndarray:
    """[T, HQ] float32: share of each query head's dense softmax mass inside its KV head's selected
    blocks plus the window, in [0, 1] (1 wherever the selection and window cover every key <= t)."""
    c = model.config
    T = _check_ids(model, ids)
    lt = _trace_layer(trace, layer, T)
    a = inputs if inputs is not None else model.attention_inputs(ids, layer)
    q, k = a.q[0], a.k[0]  # [T, HQ, Dk], [T, H, Dk]
    block_idx = torch.from_numpy(lt.block_idx).to(q.device)  # [T, H, n]
    # One call: the output is linear in T and both implementations bound their own working memory.
    _, covered = _impl(q.device).dense_lse(q, k, scale=c.head_dim ** -0.5, q_start=0, block_idx=block_idx,
                                           slc_block=c.slc_block, window=c.window)  # [T, HQ]
    return covered.clamp(0.0, 1.0).cpu().numpy()


@torch.no_grad()
def oracle_overlap(model: NSALM, ids: torch.Tensor, trace: ModelTrace, *, layer: int,
                   inputs: AttentionInputs | None = None) -> np.ndarray:
    """[T, H] float32: share of NSA's chosen blocks that are among the oracle's top blocks by dense mass.

    The oracle ranks the blocks 0..t // l' of each query by dense mass summed over the G heads of the
    KV head (as NSA sums importance over the group) and keeps as many as NSA chose (min(n, blocks
    so far)); forced blocks get no special treatment. 1 means NSA chose exactly the heaviest blocks.
    """
    c = model.config
    T = _check_ids(model, ids)
    lt = _trace_layer(trace, layer, T)
    a = inputs if inputs is not None else model.attention_inputs(ids, layer)
    q, k = a.q[0], a.k[0]
    H, G, ls = c.n_kv_head, c.group_size, c.slc_block
    impl = _impl(q.device, ls)
    num_slc = masks.num_selection_blocks(T, ls)
    out = np.empty((T, H), dtype=np.float32)
    rows = max(1, _KERNEL_ROWS_ELEMENTS // max(1, c.n_head * num_slc))
    for lo in range(0, T, rows):
        hi = min(lo + rows, T)
        lse, _ = impl.dense_lse(q[lo:hi], k, scale=c.head_dim ** -0.5, q_start=lo)
        mass, _ = impl.binned_mass(q[lo:hi], k, lse, scale=c.head_dim ** -0.5, q_start=lo, k_lo=0, k_hi=T,
                                   cell=ls)  # [rows, HQ, Ns]
        mass = mass.unflatten(1, (H, G)).sum(2)  # [rows, H, Ns]
        chosen = torch.from_numpy(lt.block_idx[lo:hi]).to(mass.device).long()  # [rows, H, n]
        count = (chosen >= 0).sum(-1, keepdim=True)  # [rows, H, 1]
        current = torch.arange(lo, hi, device=mass.device)[:, None, None] // ls
        ranked = torch.where(torch.arange(num_slc, device=mass.device) <= current, mass, -math.inf)
        top = ranked.topk(min(c.top_n, num_slc), -1).indices  # [rows, H, k], heaviest first
        keep = torch.arange(top.shape[-1], device=mass.device) < count
        # Ranks past NSA's count land in a spare last slot, so no write can clear a kept block.
        oracle = torch.zeros(*ranked.shape[:-1], num_slc + 1, dtype=torch.bool, device=mass.device)
        oracle.scatter_(-1, torch.where(keep, top, num_slc), True)
        hits = torch.gather(oracle, -1, chosen.clamp_min(0)) & (chosen >= 0)  # [rows, H, n]
        out[lo:hi] = (hits.sum(-1) / count.squeeze(-1).clamp_min(1)).float().cpu().numpy()
    return out


def gate_stats(trace: ModelTrace, *, layer: int, bins: int = 40, position_bins: int = 256,
               token_range: tuple[int, int] | None = None, context: int = 256) -> GateStats:
    """Gate distributions of one layer: histograms, quantiles, means along the position, and the
    gates token by token around token_range = (lo, hi) half-open with `context` tokens either side."""
    T = trace.num_tokens
    g = _trace_layer(trace, layer, T).gates  # [T, HQ, 3]
    if bins < 1 or position_bins < 1 or context < 0:
        raise ValueError(f"bins and position_bins must be >= 1 and context >= 0, got {bins}, {position_bins}, "
                         f"{context}")
    if T == 0:
        raise ValueError("the trace holds no tokens")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, g, side="right") - 1, 0, bins - 1)  # [T, HQ, 3]
    HQ = g.shape[1]
    flat = (np.arange(HQ * 3).reshape(1, HQ, 3) * bins + which).ravel()
    hist = np.bincount(flat, minlength=HQ * 3 * bins).reshape(HQ, 3, bins)
    cell = _cell_size(T, position_bins)
    pos_edges = _edges(0, T, cell)
    pos_mean = np.add.reduceat(g, pos_edges[:-1], axis=0) / np.diff(pos_edges)[:, None, None]
    stats = {"layer": layer, "hist_edges": edges, "hist": hist.astype(np.int64), "mean": g.mean(0),
             "quantiles": np.quantile(g, QUANTILE_LEVELS, axis=0).astype(np.float32),
             "position_edges": pos_edges, "position_mean": pos_mean.astype(np.float32)}
    if token_range is not None:
        lo, hi = token_range
        if not 0 <= lo < hi <= T:
            raise ValueError(f"token_range must satisfy 0 <= lo < hi <= {T}, got {token_range}")
        around = np.arange(max(0, lo - context), min(T, hi + context))
        outside = np.concatenate([g[:lo], g[hi:]])
        stats.update(token_range=(lo, hi), around_positions=around, around=g[around], inside_mean=g[lo:hi].mean(0),
                     outside_mean=outside.mean(0) if len(outside) else np.full(g.shape[1:], np.nan, np.float32))
    return GateStats(**stats)


def gate_atlas(trace: ModelTrace) -> np.ndarray:
    """[L, HQ, 3] mean gate per layer, query head and branch: the overview grid."""
    return np.stack([layer.gates.mean(0) for layer in trace.layers]) if trace.layers else np.zeros((0, 0, 3))


# The PyTorch path of the two dense passes (the kernels in kernels/dense_maps.py match it) ----------


def _covered_mask(block_idx, slc_block, window, pos, keys, G):
    """[rows, HQ, S] bool: key in a selected block of the query's KV head or in its window.

    block_idx [rows, H, n] (-1 padding), pos [rows] query positions, keys [S] key positions;
    causality is applied by the caller.
    """
    idx = block_idx.long()
    num_slc = int(keys.max()) // slc_block + 1 if keys.numel() else 1
    chosen = torch.zeros(*idx.shape[:2], num_slc + 1, dtype=torch.bool, device=idx.device)
    # Invalid (-1) and out-of-range ids land in the spare last slot, which no key reads.
    chosen.scatter_(-1, torch.where((idx >= 0) & (idx < num_slc), idx, num_slc), True)
    in_block = chosen[:, :, keys // slc_block].repeat_interleave(G, 1)  # [rows, HQ, S]
    in_window = (pos[:, None] - keys[None, :]) < window  # [rows, S]
    return in_block | in_window[:, None, :]


class _TorchDense:
    """Chunked PyTorch version of the two passes; exact in float32 (float64 stays float64)."""

    @staticmethod
    def dense_lse(q, k, *, scale, q_start=0, block_idx=None, slc_block=1, window=0):
        """q [TQ, HQ, Dk] at positions q_start.., k [TK, H, Dk] -> lse [TQ, HQ] float32 and, with
        block_idx [TQ, H, n], the covered share of each row's mass [TQ, HQ] (else None)."""
        TQ, HQ, _ = q.shape
        G = HQ // k.shape[1]
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = torch.empty(TQ, HQ, dtype=dtype, device=q.device)
        covered = torch.empty_like(lse) if block_idx is not None else None
        rows = max(1, _CHUNK_ELEMENTS // max(1, HQ * (q_start + TQ)))
        for lo in range(0, TQ, rows):
            hi = min(lo + rows, TQ)
            pos = torch.arange(q_start + lo, q_start + hi, device=q.device)
            keys = torch.arange(int(pos[-1]) + 1, device=q.device)
            s = _scores(q[lo:hi], k[: len(keys)], scale, G).masked_fill(keys > pos[:, None, None], -math.inf)
            lse[lo:hi] = torch.logsumexp(s, -1)
            if covered is not None:
                inside = _covered_mask(block_idx[lo:hi], slc_block, window, pos, keys, G)
                covered[lo:hi] = torch.exp(s - lse[lo:hi, :, None]).masked_fill(~inside, 0.0).sum(-1)
        return lse.to(torch.float32), (covered.to(torch.float32) if covered is not None else None)

    @staticmethod
    def binned_mass(q, k, lse, *, scale, q_start=0, k_lo=0, k_hi=None, cell=1, block_idx=None, slc_block=1,
                    window=0):
        """Dense mass of each query row summed over key cells [k_lo + c*cell, k_lo + (c+1)*cell) ∩ [k_lo, k_hi):
        mass [TQ, HQ, C] float32, C = ceil((k_hi - k_lo) / cell), and the covered part (or None)."""
        TQ, HQ, _ = q.shape
        G = HQ // k.shape[1]
        k_hi = k.shape[0] if k_hi is None else k_hi
        C = -(-(k_hi - k_lo) // cell)
        mass = torch.zeros(TQ, HQ, C, dtype=torch.float32, device=q.device)
        covered = torch.zeros_like(mass) if block_idx is not None else None
        rows = max(1, _CHUNK_ELEMENTS // max(1, HQ * C * cell))
        for lo in range(0, TQ, rows):
            hi = min(lo + rows, TQ)
            pos = torch.arange(q_start + lo, q_start + hi, device=q.device)
            end = min(k_hi, int(pos[-1]) + 1)  # keys past the last query of the chunk carry no mass
            if end <= k_lo:
                continue
            keys = torch.arange(k_lo, end, device=q.device)
            s = _scores(q[lo:hi], k[k_lo:end], scale, G)
            p = torch.exp(s - lse[lo:hi, :, None].to(s.dtype)).masked_fill(keys > pos[:, None, None], 0.0)
            mass[lo:hi] += _pool_keys(p, cell, C).float()
            if covered is not None:
                inside = _covered_mask(block_idx[lo:hi], slc_block, window, pos, keys, G)
                covered[lo:hi] += _pool_keys(p.masked_fill(~inside, 0.0), cell, C).float()
        return mass, covered


def _scores(q, k, scale, G):
    """q [rows, HQ, Dk], k [S, H, Dk] -> scaled scores [rows, HQ, S] in float32 (float64 kept)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(dtype).repeat_interleave(G, 1)  # [S, HQ, Dk]
    return torch.einsum("qhd,khd->qhk", q.to(dtype), kf) * scale


def _pool_keys(p, cell, C):
    """p [rows, HQ, S] -> [rows, HQ, C] sums over consecutive groups of `cell` keys (zero-padded)."""
    pad = C * cell - p.shape[-1]
    if pad > 0:
        p = torch.nn.functional.pad(p, (0, pad))
    return p[..., : C * cell].unflatten(-1, (C, cell)).sum(-1)


def _pool_rows(x, cell):
    """x [rows, C] -> [ceil(rows / cell), C] sums over consecutive groups of `cell` rows."""
    R = -(-x.shape[0] // cell)
    pad = R * cell - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    return x.unflatten(0, (R, cell)).sum(1)


def _impl(device: torch.device, cell: int = 1):
    """The kernels on CUDA (when they support the cell size), the chunked PyTorch path otherwise."""
    if device.type == "cuda":
        try:
            from kernels import dense_maps
        except ImportError:
            return _TorchDense
        if dense_maps.supports_cell(cell):
            return dense_maps
    return _TorchDense


# helpers --------------------------------------------------------------------------------------------


def _cell_size(span: int, grid: int) -> int:
    """Tokens per cell so that span fits in at most grid cells: a power of two up to 64, else a multiple of 64."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    need = max(1, -(-span // grid))
    return 1 << (need - 1).bit_length() if need <= 64 else -(-need // 64) * 64


def _edges(lo: int, hi: int, cell: int) -> np.ndarray:
    return np.minimum(np.arange(lo, hi + cell, cell), hi)[: -(-(hi - lo) // cell) + 1].astype(np.int64)


def _rows_per_call(num_cols: int, row_cell: int) -> int:
    """Query rows per kernel call: a whole number of row cells, the [rows, C] buffer bounded."""
    rows = max(1, _KERNEL_ROWS_ELEMENTS // max(1, num_cols))
    return max(row_cell, rows // row_cell * row_cell)


def _window_share(row_edges: np.ndarray, col_edges: np.ndarray, window: int) -> np.ndarray:
    """[R, C] share of each cell's (query t, key s) pairs with t - w < s <= t, row cells of equal size."""
    row_cell = int(row_edges[1] - row_edges[0])
    c_lo, c_hi = col_edges[:-1], col_edges[1:] - 1  # inclusive key ranges [C]
    step = max(1, (1 << 22) // max(1, len(c_lo)) // row_cell) * row_cell  # whole row cells per chunk
    counts = []
    for lo in range(int(row_edges[0]), int(row_edges[-1]), step):
        t = np.arange(lo, min(lo + step, int(row_edges[-1])))[:, None]
        n = np.clip(np.minimum(c_hi, t) - np.maximum(c_lo, t - window + 1) + 1, 0, None)  # [rows, C]
        counts.append(np.add.reduceat(n, np.arange(0, len(t), row_cell), axis=0))
    pairs = np.diff(row_edges)[:, None] * np.diff(col_edges)[None, :]
    return (np.concatenate(counts) / pairs).astype(np.float32)


def _check_ids(model: NSALM, ids: torch.Tensor) -> int:
    if model.config.attention != "nsa":
        raise ValueError(f"these analyses need an NSA model; this one has attention={model.config.attention!r}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a [1, T] tensor (one input at a time), got {shape}")
    if ids.shape[1] == 0:
        raise ValueError("ids holds no tokens")
    return ids.shape[1]


def _check_head(head: int, count: int, name: str) -> None:
    if not 0 <= head < count:
        raise IndexError(f"{name} must be in 0..{count - 1}, got {head}")


def _check_region(region, T: int) -> tuple[int, int, int, int]:
    if region is None:
        return 0, T, 0, T
    if len(region) != 4:
        raise ValueError(f"region must be (q_lo, q_hi, k_lo, k_hi), got {region!r}")
    q_lo, q_hi, k_lo, k_hi = (int(v) for v in region)
    if not (0 <= q_lo < q_hi <= T and 0 <= k_lo < k_hi <= T):
        raise ValueError(f"region must satisfy 0 <= lo < hi <= T={T} on both axes, got {region!r}")
    return q_lo, q_hi, k_lo, k_hi


def _trace_layer(trace: ModelTrace, layer: int, T: int) -> LayerTrace:
    if trace.num_tokens != T:
        raise ValueError(f"the trace covers {trace.num_tokens} tokens but ids hold {T}: trace the same ids")
    return trace.layer(layer)
