"""fla-core 0.6.0's pure-PyTorch NSA references against ours, where fla's configuration applies.

fla's naive functions cover phi = mean with l = d = l' (one `block_size`) and query positions 0..T-1.
They are an independent implementation: agreement here checks our compressed branch, selection and
selected branch from outside. One known difference, fla's naive top-n missing the current block when
that block is the trailing partial one, is tested as such; docs/reference_notes.md explains why ours
is the right behaviour.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from nsa_core import reference
from nsa_core.compression import Compressor

with warnings.catch_warnings():
    # fla warns at import that flash-attn and a GPU are missing; its pure-PyTorch references need neither.
    warnings.simplefilter("ignore")
    # The test extra installs fla-core (make test does); a bare GPU machine may lack it, and a failed import
    # here would abort the collection of every other test file, so it skips with the reason shown by -ra.
    fla_naive = pytest.importorskip("fla.ops.nsa.naive", reason="fla-core is missing: pip install -e '.[test]'")
naive_nsa_compression = fla_naive.naive_nsa_compression
naive_nsa_selection = fla_naive.naive_nsa_selection
naive_nsa_topk = fla_naive.naive_nsa_topk

BS = 16  # fla's block_size: l = d = l'
TOP_N = 4
DK, DV = 8, 6
SCALE = DK**-0.5


def make_inputs(T, *, H=1, G=16, B=2):
    """q [B, T, G*H, DK], k/v [B, T, H, D*], and their mean-compressed k_cmp/v_cmp (complete blocks only)."""
    q = torch.randn(B, T, G * H, DK)
    k, v = torch.randn(B, T, H, DK), torch.randn(B, T, H, DV)
    mean = Compressor(kind="mean", n_kv_head=H, head_dim=DK, cmp_block=BS, cmp_stride=BS, hidden=1)
    return q, k, v, mean(k), mean(v)


def ours_select(q, k_cmp):
    _, lse = reference.compressed_attention(q, k_cmp, k_cmp, cmp_block=BS, cmp_stride=BS, scale=SCALE)
    return reference.select_blocks(q, k_cmp, lse, cmp_block=BS, cmp_stride=BS, slc_block=BS, top_n=TOP_N,
                                   scale=SCALE, init_blocks=1, local_blocks=2)


def as_sets(block_idx):
    """[B, T, H, n] ids in any slot order -> nested lists [B][T][H] of sets of valid ids."""
    return [[[{j for j in slots if j >= 0} for slots in row] for row in batch] for batch in block_idx.tolist()]


def test_mean_compression_is_the_block_average():
    """Our phi "mean" with l = d gives the per-block means fla's mean_pooling computes for complete blocks."""
    _, k, _, k_cmp, _ = make_inputs(100)
    assert k_cmp.shape[1] == 100 // BS
    torch.testing.assert_close(k_cmp, k[:, : 6 * BS].unflatten(1, (6, BS)).mean(2))


@pytest.mark.parametrize(("T", "H"), [(1, 1), (15, 1), (16, 1), (100, 2), (257, 1)])
def test_compressed_branch_agrees(T, H):
    q, _, _, k_cmp, v_cmp = make_inputs(T, H=H)
    o, lse = reference.compressed_attention(q, k_cmp, v_cmp, cmp_block=BS, cmp_stride=BS, scale=SCALE)
    o_fla, lse_fla = naive_nsa_compression(q, k_cmp, v_cmp, block_size=BS, scale=SCALE)
    torch.testing.assert_close(o, o_fla, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_fla, rtol=1e-5, atol=1e-5)  # -inf on the same rows, finite elsewhere


@pytest.mark.parametrize(("T", "H"), [(16, 1), (100, 2), (257, 1)])
def test_selected_branch_agrees_on_the_same_blocks(T, H):
    q, k, v, k_cmp, _ = make_inputs(T, H=H, B=1)  # fla loops over queries in Python: keep it short
    block_idx = ours_select(q, k_cmp)
    o = reference.selected_attention(q, k, v, block_idx, slc_block=BS, scale=SCALE)
    o_fla = naive_nsa_selection(q, k, v, block_idx.long(), block_size=BS, scale=SCALE)
    torch.testing.assert_close(o, o_fla, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("T", "H"), [(16, 1), (64, 2), (256, 1)])
def test_top_n_agrees_when_every_block_is_complete(T, H):
    q, _, _, k_cmp, _ = make_inputs(T, H=H)
    ours = as_sets(ours_select(q, k_cmp))
    fla = as_sets(naive_nsa_topk(q, k_cmp, block_counts=TOP_N, block_size=BS, scale=SCALE))
    assert ours == fla


@pytest.mark.parametrize("T", [20, 100, 250])
def test_top_n_differs_only_on_the_trailing_partial_block(T):
    """With complete-block k_cmp (Tc = T // l), fla's naive top-n enumerates blocks 0..Tc-1 only, so a query in
    the trailing partial block c = Tc cannot select its own block (not even itself); ours always does."""
    q, _, _, k_cmp, _ = make_inputs(T)
    ours = as_sets(ours_select(q, k_cmp))
    fla = as_sets(naive_nsa_topk(q, k_cmp, block_counts=TOP_N, block_size=BS, scale=SCALE))
    current = T // BS
    for b in range(2):
        for t in range(T):
            if t < current * BS:
                assert ours[b][t] == fla[b][t], (b, t)
            else:
                (mine,), (theirs,) = ours[b][t], fla[b][t]  # one KV head
                assert current in mine and current not in theirs, (b, t)
                assert mine - {current} <= theirs, (b, t)


def test_fla_top_n_agrees_once_given_its_own_trailing_partial_block():
    """fla's own pipeline mean-pools a partial last chunk too; with that extra (never visible) compressed
    token its naive top-n can name the current block, and then it agrees with ours on every row."""
    T = 100
    q, k, _, k_cmp, _ = make_inputs(T)
    partial = k[:, T // BS * BS:].mean(1, keepdim=True)  # [B, 1, H, DK]: mean of the last 4 tokens
    fla = as_sets(naive_nsa_topk(q, torch.cat([k_cmp, partial], 1), block_counts=TOP_N, block_size=BS, scale=SCALE))
    assert as_sets(ours_select(q, k_cmp)) == fla


def test_fla_naive_top_n_depends_on_the_sequence_length_ours_does_not():
    """The reason ours is right: a query's selection must not depend on tokens after it. fla's naive top-n
    changes the selection of t = 99 when 13 later tokens complete its block; ours does not."""
    q, _, _, k_cmp, _ = make_inputs(112, B=1)
    short_q, short_k_cmp = q[:, :100], k_cmp[:, : 100 // BS]
    t = 99
    fla_short = as_sets(naive_nsa_topk(short_q, short_k_cmp, block_counts=TOP_N, block_size=BS, scale=SCALE))
    fla_long = as_sets(naive_nsa_topk(q, k_cmp, block_counts=TOP_N, block_size=BS, scale=SCALE))
    assert fla_short[0][t] != fla_long[0][t]
    assert ours_select(short_q, short_k_cmp)[0, t].tolist() == ours_select(q, k_cmp)[0, t].tolist()
    assert as_sets(ours_select(q, k_cmp))[0][t] == fla_long[0][t]
