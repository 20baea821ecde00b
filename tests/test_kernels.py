"""Triton kernels against the reference, on the CPU under TRITON_INTERPRET=1 (small shapes).

Every output tensor the kernels allocate is poisoned (NaN, or a sentinel for integers) so that an
element a kernel forgets to write fails the comparison. Shapes avoid multiples of the block sizes,
cover G in {1, 3, 4, 16}, queries that are the last TQ of TK keys (int and per-batch q_start), and
rows that see no compressed token. The GPU counterparts at realistic sizes are in test_kernels_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import interval_attention as ia
from kernels import nsa as nsa_mod
from kernels import select as select_mod
from kernels import selected as selected_mod
from nsa_core import masks
from nsa_core import reference as ref
from nsa_core.config import NSAConfig

L, D_STRIDE, L_SLC, TOP_N, WINDOW = 8, 4, 16, 4, 20  # small NSA geometry: l, d, l', n, w


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """torch.empty / empty_like return NaN (floats) or -12345 (integers) while a test runs."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(x):
        return x.fill_(float("nan") if x.is_floating_point() else -12345)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def assert_same_selection(idx, idx_ref, scores, pos, *, slc_block, init_blocks=1, local_blocks=2, atol=1e-4,
                          rtol=1e-3):
    """Selected blocks agree up to ties: same layout rules, and per row the same multiset of scores.

    idx, idx_ref [B, TQ, H, n]; scores [B, TQ, H, Ns] from ref.importance_scores; pos [B, TQ] absolute
    positions. Forced blocks count as +inf, so a row may swap two blocks only if their scores tie.
    """
    idx, idx_ref, scores, pos = idx.long().cpu(), idx_ref.long().cpu(), scores.float().cpu(), pos.cpu()
    assert idx.shape == idx_ref.shape
    valid = idx >= 0
    assert (valid[..., :-1] | ~valid[..., 1:]).all(), "a -1 slot precedes a valid block id"
    assert ((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]).all(), "valid ids are not strictly ascending"
    assert (idx <= (pos // slc_block)[..., None, None]).all(), "a block after the query's own block was chosen"
    assert torch.equal(valid.sum(-1), (idx_ref >= 0).sum(-1)), "numbers of selected blocks differ"
    forced = masks.forced_blocks(pos, slc_block=slc_block, init_blocks=init_blocks, local_blocks=local_blocks,
                                 num_slc=scores.shape[-1])[:, :, None, :]
    ranked = torch.where(forced, torch.inf, scores)

    def chosen_scores(ids):
        return torch.gather(ranked, -1, ids.clamp_min(0)).masked_fill(ids < 0, -torch.inf).sort(-1).values

    torch.testing.assert_close(chosen_scores(idx), chosen_scores(idx_ref), atol=atol, rtol=rtol)


def _qkv(B, TQ, TK, H, G, dk=16, dv=8):
    q = torch.randn(B, TQ, H * G, dk)
    k = torch.randn(B, TK, H, dk)
    v = torch.randn(B, TK, H, dv)
    return q, k, v


def _cmp_kv(B, TK, H, dk=16, dv=8):
    tc = max((TK - L) // D_STRIDE + 1, 0)
    return torch.randn(B, tc, H, dk), torch.randn(B, tc, H, dv)


def _close(a, b, tol=1e-5):
    assert not torch.isnan(a).any(), "kernel output holds NaN (an unwritten or poisoned element)"
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("G", [1, 3, 4, 16])
def test_compressed_attention_matches_reference(G):
    q, _, _ = _qkv(2, 45, 45, 2, G)
    k_cmp, v_cmp = _cmp_kv(2, 45, 2)
    o, lse = kernels.compressed_attention(q, k_cmp, v_cmp, cmp_block=L, cmp_stride=D_STRIDE)
    o_ref, lse_ref = ref.compressed_attention(q, k_cmp, v_cmp, cmp_block=L, cmp_stride=D_STRIDE)
    _close(o, o_ref)
    assert lse.dtype == torch.float32
    empty = torch.isinf(lse_ref)
    assert empty[:, : L - 1].all() and not empty[:, L - 1:].any()  # rows t < l - 1 see nothing
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    _close(lse[~empty], lse_ref[~empty])
    assert (o[:, : L - 1] == 0).all()


def test_compressed_attention_only_empty_rows_and_offsets():
    q, _, _ = _qkv(2, 5, 5, 1, 4)
    k_cmp, v_cmp = _cmp_kv(2, 60, 1)
    o, lse = kernels.compressed_attention(q, k_cmp[:, :0], v_cmp[:, :0], cmp_block=L, cmp_stride=D_STRIDE)
    assert (o == 0).all() and torch.isneginf(lse).all()
    starts = torch.tensor([50, 3])  # one row deep in the sequence, one still before the first window
    o, lse = kernels.compressed_attention(q, k_cmp, v_cmp, cmp_block=L, cmp_stride=D_STRIDE, q_start=starts)
    o_ref, lse_ref = ref.compressed_attention(q, k_cmp, v_cmp, cmp_block=L, cmp_stride=D_STRIDE, q_start=starts)
    _close(o, o_ref)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))


@pytest.mark.parametrize("G", [1, 4])
def test_long_intervals_take_the_unmasked_body(G, monkeypatch):
    """Rows deep in the sequence see whole key tiles: the split loop (masked edges, unmasked body) gives
    the reference, and the same bits as the loop that masks every tile."""
    q, k, v = _qkv(2, 37, 300, 2, G)
    k_cmp, v_cmp = _cmp_kv(2, 300, 2)
    starts = torch.tensor([263, 180])
    cmp = {"cmp_block": L, "cmp_stride": D_STRIDE, "q_start": starts}
    o, lse = kernels.compressed_attention(q, k_cmp, v_cmp, **cmp)
    o_ref, lse_ref = ref.compressed_attention(q, k_cmp, v_cmp, **cmp)
    _close(o, o_ref)
    _close(lse, lse_ref)
    win = kernels.window_attention(q, k, v, window=90, q_start=starts)
    _close(win, ref.window_attention(q, k, v, window=90, q_start=starts))
    monkeypatch.setattr(ia, "SPLIT_MASK", False)
    o_all, lse_all = kernels.compressed_attention(q, k_cmp, v_cmp, **cmp)
    assert torch.equal(o, o_all) and torch.equal(lse, lse_all)
    assert torch.equal(win, kernels.window_attention(q, k, v, window=90, q_start=starts))


@pytest.mark.parametrize("G", [1, 3, 4, 16])
def test_select_blocks_matches_reference(G):
    q, _, _ = _qkv(1, 150, 150, 2, G)
    k_cmp, v_cmp = _cmp_kv(1, 150, 2)
    _, lse = ref.compressed_attention(q, k_cmp, v_cmp, cmp_block=L, cmp_stride=D_STRIDE)
    args = {"cmp_block": L, "cmp_stride": D_STRIDE, "slc_block": L_SLC, "top_n": TOP_N}
    idx = kernels.select_blocks(q, k_cmp, lse, **args)
    idx_ref = ref.select_blocks(q, k_cmp, lse, **args)
    assert idx.dtype == torch.int32 and idx.shape == idx_ref.shape
    scores = ref.importance_scores(q, k_cmp, lse, cmp_block=L, cmp_stride=D_STRIDE, slc_block=L_SLC)
    assert_same_selection(idx, idx_ref, scores, torch.arange(150)[None], slc_block=L_SLC)
    assert (idx[:, :L_SLC, :, 1:] == -1).all()  # block 0 only: the rest of the slots are empty


@pytest.mark.parametrize("geometry", [(16, 8, 16, 3, 2, 1), (8, 8, 8, 5, 0, 2), (12, 4, 8, 5, 1, 2)],
                         ids=["l16-d8-ls16", "l8-d8-ls8-no-init", "l12-d4-ls8"])
def test_select_blocks_other_geometries(geometry):
    l, d, ls, n, init, local = geometry
    q, _, _ = _qkv(2, 70, 70, 2, 2)
    tc = (70 - l) // d + 1
    k_cmp = torch.randn(2, tc, 2, 16)
    _, lse = ref.compressed_attention(q, k_cmp, k_cmp, cmp_block=l, cmp_stride=d)
    args = {"cmp_block": l, "cmp_stride": d, "slc_block": ls, "top_n": n, "init_blocks": init, "local_blocks": local}
    idx = kernels.select_blocks(q, k_cmp, lse, **args)
    idx_ref = ref.select_blocks(q, k_cmp, lse, **args)
    scores = ref.importance_scores(q, k_cmp, lse, cmp_block=l, cmp_stride=d, slc_block=ls)
    assert_same_selection(idx, idx_ref, scores, torch.arange(70)[None].expand(2, 70), slc_block=ls)


@pytest.mark.parametrize("variant", [(True, True, True, 16), (True, True, False, 16), (False, False, False, 6)],
                         ids=["remap-first-split-fill", "first-chunk-in-rounds", "sum-first-masked"])
def test_select_blocks_across_score_chunks_and_merges(variant, monkeypatch):
    """80 selection blocks: several score tiles and top-n merges, and the overlap carried between tiles;
    late tiles see whole chunks (the unmasked branch). The kernel variants the benchmark can pick; with
    n = 16 = NB the first chunk can fill the set directly (FILL_FIRST)."""
    remap_first, split, fill, n = variant
    monkeypatch.setattr(select_mod, "REMAP_FIRST", remap_first)
    monkeypatch.setattr(select_mod, "SPLIT_MASK", split)
    monkeypatch.setattr(select_mod, "FILL_FIRST", fill)
    l, d, ls = 8, 4, 8
    q, _, _ = _qkv(1, 640, 640, 1, 2)
    k_cmp = torch.randn(1, (640 - l) // d + 1, 1, 16)
    _, lse = ref.compressed_attention(q, k_cmp, k_cmp, cmp_block=l, cmp_stride=d)
    args = {"cmp_block": l, "cmp_stride": d, "slc_block": ls, "top_n": n}
    idx = kernels.select_blocks(q, k_cmp, lse, **args)
    scores = ref.importance_scores(q, k_cmp, lse, cmp_block=l, cmp_stride=d, slc_block=ls)
    assert_same_selection(idx, ref.select_blocks(q, k_cmp, lse, **args), scores, torch.arange(640)[None],
                          slc_block=ls)


@pytest.mark.parametrize("G", [2, 16])
def test_select_compact_merge_layout_chooses_the_same_ids(G, monkeypatch):
    """The identity gather that gives the merge state one copy per key (COMPACT_MERGE_MAX_GP) changes its
    layout only: 80 selection blocks, several merges, the same ids bit for bit as without it."""
    l, d, ls = 8, 4, 8
    q, _, _ = _qkv(1, 640, 640, 1, G)
    k_cmp = torch.randn(1, (640 - l) // d + 1, 1, 16)
    _, lse = ref.compressed_attention(q, k_cmp, k_cmp, cmp_block=l, cmp_stride=d)
    args = {"cmp_block": l, "cmp_stride": d, "slc_block": ls, "top_n": 16}
    monkeypatch.setattr(select_mod, "COMPACT_MERGE_MAX_GP", 64)
    compact = kernels.select_blocks(q, k_cmp, lse, **args)
    monkeypatch.setattr(select_mod, "COMPACT_MERGE_MAX_GP", 0)
    assert torch.equal(compact, kernels.select_blocks(q, k_cmp, lse, **args))


def test_select_blocks_top_n_larger_than_one_merges_candidates():
    """n = 40 of 80 blocks, more than the 16 candidates one merge takes in (the top-n set is padded)."""
    l, d, ls, n = 8, 4, 8, 40
    q, _, _ = _qkv(1, 48, 48, 1, 2)
    k_cmp = torch.randn(1, (640 - l) // d + 1, 1, 16)
    starts = torch.tensor([592])
    _, lse = ref.compressed_attention(q, k_cmp, k_cmp, cmp_block=l, cmp_stride=d, q_start=starts)
    args = {"cmp_block": l, "cmp_stride": d, "slc_block": ls, "top_n": n, "q_start": starts}
    idx = kernels.select_blocks(q, k_cmp, lse, **args)
    scores = ref.importance_scores(q, k_cmp, lse, cmp_block=l, cmp_stride=d, slc_block=ls, q_start=starts)
    assert_same_selection(idx, ref.select_blocks(q, k_cmp, lse, **args), scores, starts[:, None] + torch.arange(48),
                          slc_block=ls)


def test_select_blocks_last_queries_of_longer_sequence():
    q, _, _ = _qkv(2, 6, 6, 2, 4)
    k_cmp, v_cmp = _cmp_kv(2, 300, 2)
    starts = torch.tensor([294, 120])
    args = {"cmp_block": L, "cmp_stride": D_STRIDE, "slc_block": L_SLC, "top_n": TOP_N, "q_start": starts}
    _, lse = ref.compressed_attention(q, k_cmp, v_cmp, cmp_block=L, cmp_stride=D_STRIDE, q_start=starts)
    idx = kernels.select_blocks(q, k_cmp, lse, **args)
    idx_ref = ref.select_blocks(q, k_cmp, lse, **args)
    scores = ref.importance_scores(q, k_cmp, lse, cmp_block=L, cmp_stride=D_STRIDE, slc_block=L_SLC, q_start=starts)
    assert_same_selection(idx, idx_ref, scores, starts[:, None] + torch.arange(6), slc_block=L_SLC)


@pytest.mark.parametrize(("G", "n"), [(1, 16), (4, 5)])
def test_key_splits_match_one_program_per_tile(G, n):
    """Decode-like launches (few queries, many keys) share each tile's keys among programs: the compressed
    branch's partials merge into the reference's (o, lse), every row empty or not, and the selection's
    per-split sets merge into the single program's choice. 80 blocks in 5 score chunks, so split shares
    start after a carry-only chunk, and with n = 16 the first chunk of each share fills its set."""
    from kernels.common import query_starts
    from kernels.interval_attention import MODE_CMP, interval_attention
    from kernels.select import _select

    l, d, ls = L, D_STRIDE, 8
    q, _, _ = _qkv(2, 3, 3, 2, G)
    k_cmp, v_cmp = _cmp_kv(2, 640, 2)  # the compressed tokens of 640 keys
    starts = torch.tensor([637, 2])  # the last queries of 640 keys, and queries that see no compressed token
    pos0 = query_starts(starts, 2, 0, q.device)
    cmp = {"cmp_block": l, "cmp_stride": d}
    o_ref, lse_ref = ref.compressed_attention(q, k_cmp, v_cmp, **cmp, q_start=starts)
    for splits in (2, 3, 7):
        o, lse = interval_attention(q, k_cmp, v_cmp, pos0, mode=MODE_CMP, scale=16**-0.5, want_lse=True, splits=splits,
                                    **cmp)
        _close(o, o_ref)
        assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)) and (o[1] == 0).all()
        _close(lse[~torch.isinf(lse)], lse_ref[~torch.isinf(lse_ref)])
    args = {**cmp, "slc_block": ls, "top_n": n, "scale": 16**-0.5, "init_blocks": 1, "local_blocks": 2}
    one = _select(q, k_cmp, lse_ref, pos0, **args, splits=1)
    scores = ref.importance_scores(q, k_cmp, lse_ref, **cmp, slc_block=ls, q_start=starts)
    idx_ref = ref.select_blocks(q, k_cmp, lse_ref, **cmp, slc_block=ls, top_n=n, q_start=starts)
    for splits in (2, 3, 7):
        idx = _select(q, k_cmp, lse_ref, pos0, **args, splits=splits)
        assert torch.equal(idx, one)
        assert_same_selection(idx, idx_ref, scores, starts[:, None] + torch.arange(3), slc_block=ls)


def test_key_splits_only_where_a_launch_leaves_the_gpu_idle():
    from kernels.common import MAX_KEY_SPLITS, key_splits

    cpu = torch.device("cpu")
    assert key_splits(1, 1000, cpu) == 1  # the interpreter: one program per tile unless forced
    assert key_splits(1, 1000, cpu, 5) == 5
    assert key_splits(1, 3, cpu, 5) == 3 and key_splits(1, 3, cpu, 0) == 1
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        assert key_splits(10_000, 1000, gpu) == 1  # prefill: programs fill the GPU already
        assert 1 < key_splits(32, 1000, gpu) <= MAX_KEY_SPLITS  # decode at B * H = 32
        assert key_splits(32, 7, gpu) == 1  # too few key tiles to share


def _random_block_idx(B, TQ, H, n, pos, slc_block=L_SLC):
    """Valid causal block ids ascending then -1, with a random number of empty slots per row."""
    cur = pos // slc_block  # [B, TQ]
    scores = torch.rand(B, TQ, H, int(cur.max()) + 1)
    scores = scores.masked_fill(torch.arange(scores.shape[-1]) > cur[..., None, None], -1)
    top = scores.topk(min(n, scores.shape[-1]), -1)
    ids = torch.where(top.values >= 0, top.indices, -1)
    ids = ids.masked_fill(torch.rand(ids.shape) < 0.2, -1)  # some empty slots
    ids = torch.where(ids < 0, 1 << 20, ids).sort(-1).values
    ids = torch.where(ids == 1 << 20, -1, ids)
    ids[..., 0] = torch.where(ids[..., 0] < 0, 0, ids[..., 0])  # at least one block per row
    if ids.shape[-1] < n:
        ids = torch.cat([ids, ids.new_full((*ids.shape[:-1], n - ids.shape[-1]), -1)], -1)
    return ids.int()


@pytest.mark.parametrize("G", [1, 3, 4, 16])
def test_selected_attention_matches_reference(G):
    q, k, v = _qkv(1, 53, 53, 2, G)
    idx = _random_block_idx(1, 53, 2, TOP_N, torch.arange(53)[None])
    o = kernels.selected_attention(q, k, v, idx, slc_block=L_SLC)
    _close(o, ref.selected_attention(q, k, v, idx, slc_block=L_SLC))


@pytest.mark.parametrize(("G", "path"), [(1, "group"), (4, "group"), (3, "block"), (16, "block")])
def test_selected_attention_both_paths_with_offsets(G, path):
    q, k, v = _qkv(2, 9, 90, 2, G)
    starts = torch.tensor([81, 30])
    idx = _random_block_idx(2, 9, 2, TOP_N, starts[:, None] + torch.arange(9))
    o = selected_mod.run_selected(q, k, v, idx, starts, slc_block=L_SLC, scale=16 ** -0.5, path=path)
    _close(o, ref.selected_attention(q, k, v, idx, slc_block=L_SLC, q_start=starts))


@pytest.mark.parametrize(("G", "path", "forced"), [(1, "group", (1, 2)), (16, "group", (2, 1)), (3, "block", (1, 2)),
                                                  (4, "block", (0, 1))])
def test_selected_attention_with_forced_blocks_precomputed(G, path, forced):
    """The forced blocks attended densely (interval kernel, MODE_FORCED) and merged into either path give
    the attention over all the selected blocks."""
    from kernels.interval_attention import MODE_FORCED, interval_attention

    init, local = forced
    q, k, v = _qkv(2, 9, 90, 2, G)
    k_cmp, v_cmp = _cmp_kv(2, 90, 2)
    starts = torch.tensor([81, 30])
    _, lse = ref.compressed_attention(q, k_cmp, v_cmp, cmp_block=L, cmp_stride=D_STRIDE, q_start=starts)
    idx = ref.select_blocks(q, k_cmp, lse, cmp_block=L, cmp_stride=D_STRIDE, slc_block=L_SLC, top_n=TOP_N,
                            q_start=starts, init_blocks=init, local_blocks=local).int()
    o_f, lse_f = interval_attention(q, k, v, starts, mode=MODE_FORCED, scale=16 ** -0.5, slc_block=L_SLC,
                                    init_blocks=init, local_blocks=local, want_lse=True)
    o = selected_mod.run_selected(q, k, v, idx, starts, slc_block=L_SLC, scale=16 ** -0.5, path=path,
                                  forced=(o_f, lse_f, init, local))
    _close(o, ref.selected_attention(q, k, v, idx, slc_block=L_SLC, q_start=starts))


@pytest.mark.parametrize("forced", [None, (1, 2)])
def test_block_path_buckets_hold_each_segments_pairs(forced):
    """The counting sort puts every kept (b, t, h, slot) pair, and nothing else, in its segment's run of
    `order`: the same sets as a stable sort of the segment keys, whatever order the atomics left inside
    a run. With forced blocks precomputed their slots are left out, as are the empty ones."""
    B, TQ, H, n, num_slc = 2, 9, 3, TOP_N, 12
    starts = torch.tensor([81, 30])
    pos = starts[:, None] + torch.arange(TQ)
    idx = _random_block_idx(B, TQ, H, n, pos).contiguous()
    init, local = forced or (0, 0)
    flags = {"FORCED": forced is not None, "INIT": init, "LOCAL": local}
    order, seg_start, counts = selected_mod._bucket_pairs(idx, starts, num_slc, L_SLC, flags)

    ids = idx.long()
    keep = ids >= 0
    if forced:
        cur = (pos // L_SLC)[:, :, None, None]
        keep &= (ids >= init) & (ids <= cur - local)
    bh = torch.arange(B)[:, None, None, None] * H + torch.arange(H)[None, None, :, None]
    seg = torch.where(keep, bh * num_slc + ids, -1).flatten()
    assert torch.equal(counts, torch.bincount(seg[seg >= 0], minlength=B * H * num_slc))
    assert torch.equal(seg_start, torch.cumsum(counts, 0) - counts)
    for s in range(B * H * num_slc):
        run = order[seg_start[s]:seg_start[s] + counts[s]]
        assert torch.equal(run.sort().values, torch.nonzero(seg == s).flatten())


@pytest.mark.parametrize("G", [1, 4])
def test_tensor_descriptor_loads_give_the_pointer_loads_bits(G, monkeypatch):
    """K/V tiles through tensor descriptors read zeros past TK and real keys past a row's interval (which
    the mask gives p = 0): every interval-kernel mode, the group path (empty slots, a ragged last block)
    and select (score chunks that fill their key tiles, and chunks that do not) give the same bits as
    masked pointer loads."""
    from kernels.common import tile_descriptors

    q, k, v = _qkv(2, 9, 90, 2, G, dk=16, dv=16)
    k_cmp, v_cmp = _cmp_kv(2, 90, 2, dk=16, dv=16)
    assert tile_descriptors(32, k, v, k_cmp, v_cmp) is not None
    assert tile_descriptors(32, k, k_cmp[:, :0]) is None  # no compressed token yet: pointer loads
    starts = torch.tensor([81, 30])
    idx = _random_block_idx(2, 9, 2, TOP_N, starts[:, None] + torch.arange(9))
    scale = 16 ** -0.5

    def run():
        cmp = ia.interval_attention(q, k_cmp, v_cmp, starts, mode=ia.MODE_CMP, scale=scale, cmp_block=L,
                                    cmp_stride=D_STRIDE, want_lse=True)
        forced = ia.interval_attention(q, k, v, starts, mode=ia.MODE_FORCED, scale=scale, slc_block=L_SLC,
                                       init_blocks=1, local_blocks=2, want_lse=True)
        win = ia.interval_attention(q, k, v, starts, mode=ia.MODE_WIN, scale=scale, window=WINDOW)
        slc = selected_mod.run_selected(q, k, v, idx, starts, slc_block=L_SLC, scale=scale, path="group")
        slc_forced = selected_mod.run_selected(q, k, v, idx, starts, slc_block=L_SLC, scale=scale, path="group",
                                               forced=(*forced, 1, 2))
        chosen = []
        for l_cmp, l_slc in ((L, L_SLC), (12, 12)):  # chunks of 64 keys; of 48 keys in 64-key tiles
            k_c, v_c = k_cmp[:, : (90 - l_cmp) // D_STRIDE + 1], v_cmp[:, : (90 - l_cmp) // D_STRIDE + 1]
            _, lse = ia.interval_attention(q, k_c, v_c, starts, mode=ia.MODE_CMP, scale=scale, cmp_block=l_cmp,
                                           cmp_stride=D_STRIDE, want_lse=True)
            chosen.append(select_mod._select(q, k_c, lse, starts, cmp_block=l_cmp, cmp_stride=D_STRIDE,
                                             slc_block=l_slc, top_n=TOP_N, scale=scale, init_blocks=1,
                                             local_blocks=2))
        return (*cmp, *forced, win, slc, slc_forced, *chosen)

    through_descriptors = run()
    monkeypatch.setattr(ia, "TMA_LOADS", False)
    monkeypatch.setattr(selected_mod, "GROUP_TMA", False)
    monkeypatch.setattr(select_mod, "SELECT_TMA", False)
    for got, want in zip(through_descriptors, run(), strict=True):
        assert not torch.isnan(got).any()
        assert torch.equal(got, want)


@pytest.mark.parametrize("G", [1, 3, 4, 16])
def test_window_attention_matches_reference(G):
    q, k, v = _qkv(1, 45, 45, 2, G)
    _close(kernels.window_attention(q, k, v, window=WINDOW), ref.window_attention(q, k, v, window=WINDOW))


def test_window_attention_last_queries_and_long_window():
    q, k, v = _qkv(2, 7, 60, 2, 3, dk=24, dv=40)
    starts = torch.tensor([53, 10])
    for w in (5, 100):
        _close(kernels.window_attention(q, k, v, window=w, q_start=starts),
               ref.window_attention(q, k, v, window=w, q_start=starts))
    _close(kernels.window_attention(q, k, v, window=9), ref.window_attention(q, k, v, window=9))


def _config(G, **changes):
    fields = {"n_head": 2 * G, "n_kv_head": 2, "head_dim": 16, "v_head_dim": 8, "cmp_block": L,
              "cmp_stride": D_STRIDE, "slc_block": L_SLC, "top_n": TOP_N, "window": WINDOW}
    return NSAConfig(**{**fields, **changes})


@pytest.mark.parametrize("slc_scores", ["paper", "free"])
@pytest.mark.parametrize(("G", "path"), [(1, "group"), (4, "block"), (3, "block-forced-gathered")])
def test_nsa_attention_parts_match_reference(G, path, slc_scores, monkeypatch):
    """The whole layer; at G = 4 the selected branch takes the block path, as it does for long prefills
    on a GPU (the interpreter's shapes are below the path's size thresholds); block-forced-gathered:
    G = 3 with the forced blocks among the block path's pairs instead of attended apart."""
    if path.startswith("block"):
        monkeypatch.setattr(selected_mod, "BLOCK_PATH_MIN_SHARE", 0)
        monkeypatch.setattr(selected_mod, "BLOCK_PATH_MIN_SLOTS", 0)
    monkeypatch.setattr(nsa_mod, "FORCED_DENSE", path != "block-forced-gathered")
    cfg = _config(G, slc_scores=slc_scores)
    q, k, v = _qkv(1, 75, 75, 2, G)
    k_cmp, v_cmp = _cmp_kv(1, 75, 2)
    gates = torch.rand(1, 75, 2 * G, 3)
    parts = kernels.nsa_attention(q, k, v, k_cmp, v_cmp, gates, config=cfg, return_parts=True)
    want = ref.nsa_attention(q, k, v, k_cmp, v_cmp, gates, config=cfg, return_parts=True)
    score_lse = ref.selection_lse(q, k_cmp, want.lse_cmp, config=cfg, q_start=0)
    scores = ref.importance_scores(q, k_cmp, score_lse, cmp_block=L, cmp_stride=D_STRIDE, slc_block=L_SLC)
    assert_same_selection(parts.block_idx, want.block_idx, scores, torch.arange(75)[None], slc_block=L_SLC)
    for name in ("o", "o_cmp", "o_slc", "o_win"):
        _close(getattr(parts, name), getattr(want, name))
    finite = torch.isfinite(want.lse_cmp)
    assert torch.equal(torch.isfinite(parts.lse_cmp), finite)
    _close(parts.lse_cmp[finite], want.lse_cmp[finite])
    # The gated sum does not depend on whether the parts are kept.
    o = kernels.nsa_attention(q, k, v, k_cmp, v_cmp, gates, config=cfg)
    assert torch.equal(o, parts.o)


@pytest.mark.parametrize(("forced_dense", "splits", "TK"), [(False, 1, 70), (True, 1, 70), (True, 3, 300)],
                         ids=["forced-gathered", "forced-dense", "key-splits"])
def test_nsa_attention_decode_step_with_independent_window_kv(forced_dense, splits, TK, monkeypatch):
    """A decode step (3 queries at the end of TK keys); with key splits the compressed branch and the
    selection share each query tile's keys among 3 programs, as on a GPU where B * H programs are too few."""
    monkeypatch.setattr(nsa_mod, "FORCED_DENSE", forced_dense)

    def fixed_splits(programs, tiles, device, requested=None):
        return max(1, min(splits, tiles))

    for mod in (ia, select_mod):
        monkeypatch.setattr(mod, "key_splits", fixed_splits)
    cfg = _config(3, kv_mode="independent")
    q, k, v = _qkv(2, 3, TK, 2, 3)
    k_win, v_win = torch.randn_like(k), torch.randn_like(v)
    k_cmp, v_cmp = _cmp_kv(2, TK, 2)
    gates = torch.rand(2, 3, 6, 3)
    got = kernels.nsa_attention(q, k, v, k_cmp, v_cmp, gates, config=cfg, k_win=k_win, v_win=v_win)
    want = ref.nsa_attention(q, k, v, k_cmp, v_cmp, gates, config=cfg, k_win=k_win, v_win=v_win)
    _close(got, want)


def test_forward_only_refuses_inputs_that_need_grad():
    q, k, v = _qkv(1, 20, 20, 1, 2)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward-only.*reference"):
        kernels.window_attention(q, k, v, window=4)
    with torch.no_grad():
        assert kernels.window_attention(q, k, v, window=4).shape == (1, 20, 2, 8)


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(1, 20, 20, 2, 2)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        kernels.window_attention(q[:, :, :3], k, v, window=4)
    with pytest.raises(ValueError, match="head dim"):
        kernels.window_attention(q, k[..., :8], v, window=4)
    with pytest.raises(ValueError, match="block id"):
        kernels.selected_attention(q, k, v, torch.full((1, 20, 2, 2), 5, dtype=torch.int32), slc_block=L_SLC)
    with pytest.raises(ValueError, match="q_start"):
        kernels.window_attention(q, k, v, window=4, q_start=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="l - d <= l'"):
        kernels.select_blocks(q, k, torch.zeros(1, 20, 4), cmp_block=48, cmp_stride=8, slc_block=16, top_n=2)


def test_supports_reports_reasons():
    ok, reason = kernels.supports(_config(4), device="cpu", dtype=torch.float32)
    assert not ok and "CUDA" in reason
    ok, reason = kernels.supports(_config(4), device="cuda", dtype=torch.bfloat16)
    assert ok, reason
    ok, reason = kernels.supports(_config(4, cmp_block=48, cmp_stride=8, slc_block=16), device="cuda",
                                  dtype=torch.bfloat16)
    assert not ok and "l'" in reason
    ok, reason = kernels.supports(_config(4), device="cuda", dtype=torch.int8)
    assert not ok and "dtype" in reason


def test_nsa_attention_ignores_the_future():
    """Changing keys, values and compressed tokens after position p leaves every output at t <= p unchanged."""
    cfg, p = _config(3), 41
    q, k, v = _qkv(1, 70, 70, 2, 3)
    k_cmp, v_cmp = _cmp_kv(1, 70, 2)
    gates = torch.rand(1, 70, 6, 3)
    before = kernels.nsa_attention(q, k, v, k_cmp, v_cmp, gates, config=cfg)
    k2, v2, k_cmp2, v_cmp2 = k.clone(), v.clone(), k_cmp.clone(), v_cmp.clone()
    k2[:, p + 1:], v2[:, p + 1:] = torch.randn_like(k2[:, p + 1:]), torch.randn_like(v2[:, p + 1:])
    future = torch.arange(k_cmp.shape[1]) * D_STRIDE + L - 1 > p  # windows that end after p
    k_cmp2[:, future], v_cmp2[:, future] = torch.randn_like(k_cmp2[:, future]), torch.randn_like(v_cmp2[:, future])
    after = kernels.nsa_attention(q, k2, v2, k_cmp2, v_cmp2, gates, config=cfg)
    assert torch.equal(before[:, : p + 1], after[:, : p + 1])
    assert not torch.equal(before[:, p + 1:], after[:, p + 1:])


def test_model_layers_on_kernels_match_reference():
    """NSALM's attention layers fed through the kernels (ops=kernels) give the reference logits."""
    from nsa_core.model import NSALM

    cfg = NSAConfig(d_model=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, v_head_dim=16, mlp_hidden=128,
                    cmp_block=L, cmp_stride=D_STRIDE, slc_block=L_SLC, top_n=TOP_N, window=WINDOW)
    model = NSALM(cfg)
    model.reset_parameters(seed=0)
    ids = torch.randint(0, 256, (1, 90))

    def logits(ops):
        x = model.embed(ids)
        for layer in model.layers:
            x, _ = layer(x, ops=ops)
        return model.lm_head(model.norm(x))

    with torch.no_grad():
        _close(logits(kernels), logits(ref), tol=1e-4)
