"""The dense-map passes (Triton, under the interpreter on CPU) and their PyTorch twin against float64.

The brute force builds the whole [TQ, TK] probability matrix per head, which only a small test can
afford; both implementations must reproduce its lse, covered share and cell sums.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels import dense_maps
from nsa_core.analysis import _TorchDense


def brute_probs(q, k, q_start, scale):
    """[TQ, HQ, TK] float64 causal softmax of every query head over keys 0..t."""
    TQ, HQ, _ = q.shape
    G = HQ // k.shape[1]
    s = torch.einsum("qhd,khd->qhk", q.double(), k.double().repeat_interleave(G, 1)) * scale
    pos = torch.arange(q_start, q_start + TQ)
    s = s.masked_fill(torch.arange(k.shape[0]) > pos[:, None, None], -math.inf)
    return torch.softmax(s, -1), torch.logsumexp(s, -1)


def brute_covered(block_idx, slc_block, window, q_start, TK, G):
    """[TQ, HQ, TK] bool, written as sets: key s is covered for query t if s // l' was selected or t - s < w."""
    TQ, H, _ = block_idx.shape
    out = torch.zeros(TQ, H * G, TK, dtype=torch.bool)
    for i in range(TQ):
        t = q_start + i
        for h in range(H):
            chosen = {int(b) for b in block_idx[i, h] if b >= 0}
            for s in range(t + 1):
                out[i, h * G:(h + 1) * G, s] = (s // slc_block in chosen) or (t - s < window)
    return out


def brute_binned(p, k_lo, k_hi, cell):
    C = -(-(k_hi - k_lo) // cell)
    return torch.stack([p[..., k_lo + c * cell: min(k_lo + (c + 1) * cell, k_hi)].sum(-1) for c in range(C)], -1)


def make_inputs(TQ, TK, HQ, H, D, n, slc_block, dtype=torch.float32, device="cpu"):
    q = torch.randn(TQ, HQ, D, dtype=dtype, device=device)
    k = torch.randn(TK, H, D, dtype=dtype, device=device)
    block_idx = torch.randint(-1, -(-TK // slc_block), (TQ, H, n), dtype=torch.int32, device=device)
    return q, k, block_idx


IMPLS = [pytest.param(dense_maps, id="triton"), pytest.param(_TorchDense, id="torch")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("TQ, TK, HQ, H, D", [(70, 150, 4, 2, 24), (65, 65, 3, 1, 16), (1, 97, 2, 2, 40)])
def test_lse_and_covered_share(impl, TQ, TK, HQ, H, D):
    q, k, block_idx = make_inputs(TQ, TK, HQ, H, D, n=3, slc_block=16)
    q_start = TK - TQ
    p, lse_ref = brute_probs(q, k, q_start, 0.3)
    covered_ref = (p * brute_covered(block_idx, 16, 8, q_start, TK, HQ // H)).sum(-1)
    lse, covered = impl.dense_lse(q, k, scale=0.3, q_start=q_start, block_idx=block_idx, slc_block=16, window=8)
    torch.testing.assert_close(lse, lse_ref.float(), rtol=0, atol=2e-5)
    torch.testing.assert_close(covered, covered_ref.float(), rtol=0, atol=2e-6)
    assert ((covered >= 0) & (covered <= 1 + 1e-6)).all()
    lse_only, nothing = impl.dense_lse(q, k, scale=0.3, q_start=q_start)
    assert nothing is None
    torch.testing.assert_close(lse_only, lse)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cell, k_lo, k_hi", [(1, 10, 140), (4, 0, 150), (16, 3, 150), (64, 0, 150), (128, 20, 150)])
def test_binned_mass_matches_cell_sums(impl, cell, k_lo, k_hi):
    TQ, TK, HQ, H, D = 70, 150, 4, 2, 24
    q, k, block_idx = make_inputs(TQ, TK, HQ, H, D, n=3, slc_block=16)
    q_start = TK - TQ
    p, lse = brute_probs(q, k, q_start, 0.3)
    inside = brute_covered(block_idx, 16, 8, q_start, TK, HQ // H)
    mass, covered = impl.binned_mass(q, k, lse.float(), scale=0.3, q_start=q_start, k_lo=k_lo, k_hi=k_hi, cell=cell,
                                     block_idx=block_idx, slc_block=16, window=8)
    torch.testing.assert_close(mass, brute_binned(p, k_lo, k_hi, cell).float(), rtol=0, atol=2e-6)
    torch.testing.assert_close(covered, brute_binned(p * inside, k_lo, k_hi, cell).float(), rtol=0, atol=2e-6)
    if k_lo == 0 and k_hi == TK:  # every row's whole mass lands in some cell
        torch.testing.assert_close(mass.sum(-1), torch.ones(TQ, HQ), rtol=0, atol=1e-5)


def test_binned_mass_refuses_unsupported_cells():
    q, k, _ = make_inputs(8, 8, 2, 1, 16, n=1, slc_block=4)
    assert not dense_maps.supports_cell(48) and dense_maps.supports_cell(192) and dense_maps.supports_cell(8)
    with pytest.raises(ValueError, match="cell"):
        dense_maps.binned_mass(q, k, torch.zeros(8, 2), scale=1.0, cell=48)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        dense_maps.dense_lse(q[:, :1].expand(8, 3, 16), k.expand(8, 2, 16), scale=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_torch_on_gpu(dtype):
    """Realistic shapes on CUDA: the paper's head dim and group, 4k keys, the last 1k queries."""
    TQ, TK, HQ, H, D = 1024, 4096, 16, 1, 128
    q, k, block_idx = make_inputs(TQ, TK, HQ, H, D, n=16, slc_block=64, dtype=dtype, device="cuda")
    block_idx = block_idx.sort(-1).values
    q_start, scale = TK - TQ, D ** -0.5
    lse, cov = dense_maps.dense_lse(q, k, scale=scale, q_start=q_start, block_idx=block_idx, slc_block=64, window=512)
    lse_t, cov_t = _TorchDense.dense_lse(q, k, scale=scale, q_start=q_start, block_idx=block_idx, slc_block=64,
                                         window=512)
    torch.testing.assert_close(lse, lse_t, rtol=0, atol=1e-4)
    torch.testing.assert_close(cov, cov_t, rtol=0, atol=1e-5)
    for cell in (1, 64, 256):
        mass, c = dense_maps.binned_mass(q, k, lse_t, scale=scale, q_start=q_start, cell=cell, block_idx=block_idx,
                                         slc_block=64, window=512)
        mass_t, c_t = _TorchDense.binned_mass(q, k, lse_t, scale=scale, q_start=q_start, cell=cell,
                                              block_idx=block_idx, slc_block=64, window=512)
        torch.testing.assert_close(mass, mass_t, rtol=0, atol=1e-5)
        torch.testing.assert_close(c, c_t, rtol=0, atol=1e-5)
