"""Every analysis against a brute-force computation that holds the whole T x T map (small T only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nsa_core import analysis
from nsa_core.config import NSAConfig
from nsa_core.model import NSALM
from tests import brute_force as bf

T = 160
SMALL = {"d_model": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "head_dim": 16, "v_head_dim": 16, "mlp_hidden": 96,
         "cmp_block": 8, "cmp_stride": 4, "slc_block": 16, "top_n": 4, "window": 24}


def build(**changes):
    """A small NSA model whose queries are scaled up so that attention is peaked, not uniform."""
    model = NSALM(NSAConfig(**{**SMALL, **changes})).eval()
    model.reset_parameters(seed=3)
    with torch.no_grad():
        for block in model.layers:
            block.attn.q_proj.weight.mul_(40.0)
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, trace = model(ids, trace=True)
    return model, ids, trace


@pytest.fixture(scope="module")
def setup():
    return build()


def dense_probs(model, ids, layer):
    """[T, HQ, T] float64: the full causal softmax of each query head against the selection keys."""
    a = model.attention_inputs(ids, layer)
    q, k = a.q[0].double(), a.k[0].double()
    s = torch.einsum("qhd,khd->qhk", q, k.repeat_interleave(model.config.group_size, 1)) * model.config.head_dim ** -0.5
    s = s.masked_fill(torch.arange(T)[None, None, :] > torch.arange(T)[:, None, None], -math.inf)
    return torch.softmax(s, -1).numpy()


def covered_sets(config, block_idx, t, h):
    """Key positions NSA covered for query t and KV head h: its selected blocks plus its window."""
    keys = {s for b in block_idx[t, h] if b >= 0 for s in range(b * config.slc_block, (b + 1) * config.slc_block)}
    keys |= set(range(max(0, t - config.window + 1), t + 1))
    return {s for s in keys if s <= t}


def cell_sums(matrix, row_edges, col_edges):
    return np.array([[matrix[r0:r1, c0:c1].sum() for c0, c1 in zip(col_edges[:-1], col_edges[1:], strict=True)]
                     for r0, r1 in zip(row_edges[:-1], row_edges[1:], strict=True)])


def test_query_detail_matches_brute_force(setup):
    model, ids, trace = setup
    c = model.config
    a = model.attention_inputs(ids, 1)
    P = dense_probs(model, ids, 1)
    scale = c.head_dim ** -0.5
    for query in (0, 7, 100, T - 1):
        d = analysis.query_detail(model, ids, layer=1, query=query)
        pos = torch.tensor([[query]])
        p_cmp = bf.compressed_probabilities(a.q[:, query:query + 1], a.k_cmp, pos, cmp_block=c.cmp_block,
                                            cmp_stride=c.cmp_stride, scale=scale)[0, 0]
        np.testing.assert_allclose(d.cmp_probs, p_cmp.numpy(), atol=1e-5)
        importance = bf.importance(a.q[:, query:query + 1], a.k_cmp, pos, cmp_block=c.cmp_block,
                                   cmp_stride=c.cmp_stride, slc_block=c.slc_block, num_slc=T // c.slc_block,
                                   scale=scale)[0, 0]
        np.testing.assert_allclose(d.block_importance, importance.numpy(), atol=1e-5)
        np.testing.assert_array_equal(d.selected, trace.layers[1].block_idx[query])
        forced = bf.forced(query, slc_block=c.slc_block, init_blocks=c.init_blocks, local_blocks=c.local_blocks)
        assert set(np.flatnonzero(d.forced)) == forced
        assert d.window == (max(0, query - c.window + 1), query)
        np.testing.assert_array_equal(d.gates, trace.layers[1].gates[query])
        assert d.dense_row.shape == (c.n_head, query + 1)
        np.testing.assert_allclose(d.dense_row, P[query, :, :query + 1], atol=1e-5)
    with pytest.raises(IndexError, match="query"):
        analysis.query_detail(model, ids, layer=1, query=T)


def test_query_detail_says_where_a_group_cast_no_vote(setup):
    """With "free" scores, a query whose visible compressed tokens all lie in forced blocks gives its groups no
    vote: every importance is 0 and there is no rank to report. The paper's scores still rank blocks there."""
    model, ids, _ = setup
    free = model.with_selection_scores("free")
    early = 3 * model.config.slc_block - 1  # keys 0..47: the initial block and the two local ones, all forced
    d = analysis.query_detail(free, ids, layer=1, query=early)
    assert not d.voted.any() and not d.block_importance.any()
    assert d.importance_rank(0, np.array([1])) == -1
    assert analysis.query_detail(model, ids, layer=1, query=early).voted.all()
    late = analysis.query_detail(free, ids, layer=1, query=T - 1)
    assert late.voted.all()
    order = np.argsort(-late.block_importance[1], kind="stable")
    assert late.importance_rank(1, order[[2]]) == 2
    assert late.importance_rank(1, order[[5, 1]]) == 1


def test_pooled_dense_map_whole_and_zoomed(setup):
    model, ids, trace = setup
    P = dense_probs(model, ids, 0)
    for head in (0, 3):
        kv = head // model.config.group_size
        inside = np.zeros((T, T))
        for t in range(T):
            inside[t, sorted(covered_sets(model.config, trace.layers[0].block_idx, t, kv))] = 1
        whole = analysis.pooled_dense_map(model, ids, layer=0, head=head, grid=16, trace=trace)
        assert whole.values.shape == (len(whole.row_edges) - 1, len(whole.col_edges) - 1)
        assert max(whole.values.shape) <= 16 and whole.region == (0, T, 0, T)
        np.testing.assert_allclose(whole.values, cell_sums(P[:, head], whole.row_edges, whole.col_edges), atol=1e-4)
        np.testing.assert_allclose(whole.values.sum(), T, rtol=1e-5)  # each row carries mass 1
        np.testing.assert_allclose(whole.covered, cell_sums(P[:, head] * inside, whole.row_edges, whole.col_edges),
                                   atol=1e-4)
        zoom = analysis.pooled_dense_map(model, ids, layer=0, head=head, grid=8, region=(37, 150, 5, 90))
        assert zoom.region == (37, 150, 5, 90) and zoom.covered is None
        np.testing.assert_allclose(zoom.values, cell_sums(P[:, head], zoom.row_edges, zoom.col_edges), atol=1e-4)
    fine = analysis.pooled_dense_map(model, ids, layer=0, head=1, grid=512, region=(100, 110, 90, 110))
    np.testing.assert_allclose(fine.values, P[100:110, 1, 90:110], atol=1e-5)  # cells of one token
    with pytest.raises(ValueError, match="region"):
        analysis.pooled_dense_map(model, ids, layer=0, head=0, region=(10, 5, 0, T))
    with pytest.raises(IndexError, match="head"):
        analysis.pooled_dense_map(model, ids, layer=0, head=4)


@pytest.mark.parametrize("region", [None, (30, 160, 20, 130)])
def test_pooled_selection_map_counts(setup, region):
    model, _, trace = setup
    c = model.config
    block_idx = trace.layers[1].block_idx
    sel = analysis.pooled_selection_map(trace, layer=1, kv_head=1, grid=4, region=region)
    q_lo, q_hi, k_lo, k_hi = region or (0, T, 0, T)
    assert sel.row_edges[0] == q_lo and sel.row_edges[-1] == q_hi
    assert sel.col_edges[0] == k_lo // c.slc_block * c.slc_block and sel.col_edges[-1] >= k_hi
    chosen = np.zeros((T, T // c.slc_block))
    forced = np.zeros_like(chosen)
    for t in range(T):
        must = bf.forced(t, slc_block=c.slc_block, init_blocks=c.init_blocks, local_blocks=c.local_blocks)
        for b in block_idx[t, 1]:
            if b >= 0:
                (forced if b in must else chosen)[t, b] = 1
    block_edges = sel.col_edges // c.slc_block
    pairs = np.diff(sel.row_edges)[:, None] * np.diff(block_edges)[None, :]
    np.testing.assert_allclose(sel.values, cell_sums(chosen, sel.row_edges, block_edges) / pairs, atol=1e-6)
    np.testing.assert_allclose(sel.forced, cell_sums(forced, sel.row_edges, block_edges) / pairs, atol=1e-6)
    band = np.array([[1.0 if 0 <= t - s < c.window else 0.0 for s in range(T)] for t in range(T)])
    token_pairs = np.diff(sel.row_edges)[:, None] * np.diff(sel.col_edges)[None, :]
    np.testing.assert_allclose(sel.window, cell_sums(band, sel.row_edges, sel.col_edges) / token_pairs, atol=1e-6)


def test_dense_recall_matches_brute_force_and_bounds(setup):
    model, ids, trace = setup
    c = model.config
    P = dense_probs(model, ids, 1)
    recall = analysis.dense_recall(model, ids, trace, layer=1)
    assert recall.shape == (T, c.n_head) and recall.dtype == np.float32
    expected = np.array([[P[t, hq, sorted(covered_sets(c, trace.layers[1].block_idx, t, hq // c.group_size))].sum()
                          for hq in range(c.n_head)] for t in range(T)])
    np.testing.assert_allclose(recall, expected, atol=1e-5)
    assert (recall >= 0).all() and (recall <= 1).all()
    assert recall.min() < 0.99  # peaked attention escapes a 4-block selection somewhere: the test can fail


def test_recall_and_overlap_are_one_when_everything_is_selected():
    model, ids, trace = build(top_n=T // 16)  # n = Ns: every block is selected
    np.testing.assert_allclose(analysis.dense_recall(model, ids, trace, layer=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(analysis.oracle_overlap(model, ids, trace, layer=0), 1.0)


def test_oracle_overlap_matches_brute_force(setup):
    model, ids, trace = setup
    c = model.config
    P = dense_probs(model, ids, 0)
    block_idx = trace.layers[0].block_idx
    overlap = analysis.oracle_overlap(model, ids, trace, layer=0)
    assert overlap.shape == (T, c.n_kv_head)
    for t in range(0, T, 7):
        for h in range(c.n_kv_head):
            group = P[t, h * c.group_size:(h + 1) * c.group_size].sum(0)  # [T] summed over the group
            mass = [group[b * c.slc_block:(b + 1) * c.slc_block].sum() for b in range(t // c.slc_block + 1)]
            chosen = {int(b) for b in block_idx[t, h] if b >= 0}
            oracle = set(np.argsort(-np.array(mass), kind="stable")[: len(chosen)].tolist())
            assert overlap[t, h] == pytest.approx(len(chosen & oracle) / len(chosen))
    assert overlap.min() < 1  # NSA's compressed proxy does not always pick the heaviest blocks


def test_gate_stats_and_atlas(setup):
    _, _, trace = setup
    g = trace.layers[1].gates  # [T, HQ, 3]
    stats = analysis.gate_stats(trace, layer=1, bins=10, position_bins=7, token_range=(50, 60), context=5)
    for hq in range(g.shape[1]):
        for branch in range(3):
            expected = np.histogram(g[:, hq, branch], bins=10, range=(0, 1))[0]
            np.testing.assert_array_equal(stats.hist[hq, branch], expected)
    np.testing.assert_allclose(stats.mean, g.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.quantiles[2], np.median(g, 0), rtol=1e-6)
    edges = stats.position_edges
    assert edges[0] == 0 and edges[-1] == T and len(edges) - 1 <= 7
    for i in range(len(edges) - 1):
        np.testing.assert_allclose(stats.position_mean[i], g[edges[i]:edges[i + 1]].mean(0), rtol=1e-5)
    np.testing.assert_array_equal(stats.around_positions, np.arange(45, 65))
    np.testing.assert_array_equal(stats.around, g[45:65])
    np.testing.assert_allclose(stats.inside_mean, g[50:60].mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.outside_mean, np.concatenate([g[:50], g[60:]]).mean(0), rtol=1e-6)
    atlas = analysis.gate_atlas(trace)
    assert atlas.shape == (2, 4, 3)
    np.testing.assert_allclose(atlas[1], g.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="token_range"):
        analysis.gate_stats(trace, layer=1, token_range=(60, 50))


def test_bad_inputs_get_clear_errors(setup):
    model, ids, trace = setup
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        analysis.dense_recall(model, ids.expand(2, T), trace, layer=0)
    with pytest.raises(ValueError, match="trace covers"):
        analysis.dense_recall(model, ids[:, :100], trace, layer=0)
    with pytest.raises(IndexError, match="layer"):
        analysis.pooled_selection_map(trace, layer=2, kv_head=0)
    with pytest.raises(IndexError, match="kv_head"):
        analysis.pooled_selection_map(trace, layer=0, kv_head=2)
    with pytest.raises(ValueError, match="grid"):
        analysis.pooled_selection_map(trace, layer=0, kv_head=0, grid=0)
    dense = NSALM(NSAConfig(**{**SMALL, "attention": "dense"}))
    with pytest.raises(ValueError, match="NSA model"):
        analysis.query_detail(dense, ids, layer=0, query=3)


@pytest.mark.gpu
def test_analyses_on_cuda_match_cpu():
    """The Triton path (model on CUDA) against the chunked PyTorch path (same model on CPU)."""
    model, ids, trace = build()
    cuda = NSALM(model.config).cuda().eval()
    cuda.load_state_dict(model.state_dict())
    args = {"layer": 1}
    np.testing.assert_allclose(analysis.dense_recall(cuda, ids.cuda(), trace, **args),
                               analysis.dense_recall(model, ids, trace, **args), atol=1e-4)
    np.testing.assert_allclose(analysis.oracle_overlap(cuda, ids.cuda(), trace, **args),
                               analysis.oracle_overlap(model, ids, trace, **args), atol=1e-6)
    gpu_map = analysis.pooled_dense_map(cuda, ids.cuda(), head=2, grid=16, trace=trace, **args)
    cpu_map = analysis.pooled_dense_map(model, ids, head=2, grid=16, trace=trace, **args)
    np.testing.assert_allclose(gpu_map.values, cpu_map.values, atol=1e-4)
    np.testing.assert_allclose(gpu_map.covered, cpu_map.covered, atol=1e-4)
