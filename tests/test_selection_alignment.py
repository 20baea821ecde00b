"""The selection-alignment loss against a brute-force loop, the reference's block scores, and its gradient."""

import math

import pytest
import torch

from nsa_core import masks, reference, selection_alignment
from nsa_core.config import NSAConfig

CONFIG = NSAConfig(d_model=32, n_layer=1, n_head=6, n_kv_head=2, head_dim=8, v_head_dim=8, mlp_hidden=32,
                   cmp_block=8, cmp_stride=4, slc_block=8, top_n=3, init_blocks=1, local_blocks=2, window=16)


def _inputs(T=75, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, HQ, D = CONFIG.n_kv_head, CONFIG.n_head, CONFIG.head_dim
    Tc = masks.num_compressed(T, CONFIG.cmp_block, CONFIG.cmp_stride)
    q = torch.randn(B, T, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k_cmp = torch.randn(B, Tc, H, D, generator=g, dtype=torch.float64)
    return q, k, k_cmp


def _brute_force(q, k, k_cmp, positions, config):
    """The loss spelled out one (row, query, KV head) at a time, in float64."""
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    l, d, ls = config.cmp_block, config.cmp_stride, config.slc_block
    terms = []
    for b in range(B):
        for t in positions[b].tolist():
            if t < 0:
                continue
            current = t // ls
            forced = set(range(config.init_blocks)) | set(range(current - config.local_blocks + 1, current + 1))
            candidates = [j for j in range(current + 1) if j not in forced]
            if not candidates:
                continue
            for h in range(H):
                target = dict.fromkeys(candidates, 0.0)
                model = dict.fromkeys(candidates, 0.0)
                for g in range(G):
                    qh = q[b, t, h * G + g]
                    p = torch.softmax(k[b, :t + 1, h] @ qh / math.sqrt(D), 0)  # keys 0..t
                    visible = [i for i in range(k_cmp.shape[1]) if i * d + l - 1 <= t]
                    p_cmp = torch.softmax(torch.stack([k_cmp[b, i, h] @ qh for i in visible]) / math.sqrt(D), 0)
                    head_target = {j: p[j * ls:min((j + 1) * ls, t + 1)].sum().item() for j in candidates}
                    head_model = {j: sum(p_cmp[n].item() * len(set(range(i * d, i * d + l)) &
                                                               set(range(j * ls, (j + 1) * ls))) / d
                                         for n, i in enumerate(visible)) for j in candidates}
                    for mass, head in ((target, head_target), (model, head_model)):
                        total = sum(head.values()) if config.slc_scores == "free" else 1.0
                        for j in candidates:
                            mass[j] += head[j] / total
                t_sum, m_sum = sum(target.values()), sum(model.values())
                terms.append(sum(target[j] / t_sum * math.log((target[j] / t_sum) / (model[j] / m_sum))
                                 for j in candidates if target[j] > 0))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("slc_scores", ["paper", "free"])
def test_loss_matches_a_brute_force_loop(slc_scores):
    config = CONFIG.replace(slc_scores=slc_scores)
    q, k, k_cmp = _inputs()
    # Both rows: query positions of every kind, including one with no candidate (t < 3 blocks) and unused slots.
    positions = torch.tensor([[74, 40, 20, -1, 63], [33, 5, 71, 48, -1]])
    q, k_cmp = q.requires_grad_(True), k_cmp.requires_grad_(True)
    loss = selection_alignment.selection_alignment_loss(q, k, k_cmp, positions, config=config)
    assert loss.item() == pytest.approx(_brute_force(q, k, k_cmp, positions, config), rel=1e-5)
    loss.backward()  # unused slots and rows without candidates must not send NaN back
    assert torch.isfinite(q.grad).all() and torch.isfinite(k_cmp.grad).all()


def test_far_blocks_keep_their_loss_and_gradient_when_float32_underflows():
    """Compressed heads that put exp(-300) on most candidate blocks: float32 probabilities are 0 there, the loss
    in log space is still the float64 one, and the far blocks' compressed keys still get gradient."""
    q, k, k_cmp = _inputs(T=75, B=1, seed=5)
    q[..., 0] = 10.0
    k_cmp[..., 0] = 0.0
    # The last three compressed tokens win by 300 nats; one overlaps a candidate block, the others get exp(-300).
    k_cmp[:, -3:, :, 0] = 300.0 / (10.0 * CONFIG.head_dim ** -0.5)
    positions = torch.tensor([[74, 71]])
    exact = selection_alignment.selection_alignment_loss(q, k, k_cmp, positions, config=CONFIG).item()
    k_cmp32 = k_cmp.float().requires_grad_(True)
    loss = selection_alignment.selection_alignment_loss(q.float(), k.float(), k_cmp32, positions, config=CONFIG)
    assert 100 < exact < 1000 and loss.item() == pytest.approx(exact, rel=1e-4)
    loss.backward()
    assert k_cmp32.grad[:, :8].abs().sum() > 0  # tokens of the candidate blocks


@pytest.mark.parametrize("T", [64, 75])
def test_model_side_is_the_reference_block_importance(T):
    """Summed over each group, the compressed branch's block mass is the reference's Eq. 8-10 importance."""
    q, _, k_cmp = _inputs(T=T, B=2)
    config = CONFIG
    _, lse = reference.compressed_attention(q, k_cmp, k_cmp, cmp_block=config.cmp_block,
                                            cmp_stride=config.cmp_stride)
    num_slc = masks.num_selection_blocks(T, config.slc_block)
    scores = reference.importance_scores(q, k_cmp, lse, cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
                                         slc_block=config.slc_block, num_slc=num_slc)  # [B, T, H, Ns]
    positions = torch.tensor([[T - 1, 30, 12], [7, T - 9, 40]])
    H = k_cmp.shape[2]
    q_at = q[torch.arange(2)[:, None], positions].unflatten(2, (H, -1))
    log_mass = selection_alignment.compressed_block_log_mass(q_at, k_cmp, positions, seq_len=T, config=config,
                                                             scale=config.head_dim ** -0.5)
    expected = scores[torch.arange(2)[:, None], positions]  # [B, M, H, Ns]
    torch.testing.assert_close(log_mass.exp().sum(3), expected.to(log_mass.dtype), rtol=1e-6, atol=1e-9)
    candidate = selection_alignment.candidate_blocks(positions, num_slc, config=config)
    forced = masks.forced_blocks(positions, slc_block=config.slc_block, init_blocks=config.init_blocks,
                                 local_blocks=config.local_blocks, num_slc=num_slc)
    future = torch.arange(num_slc) > (positions // config.slc_block)[..., None]
    assert torch.equal(candidate, ~forced & ~future)


def test_gradient_trains_the_compressed_keys_toward_the_dense_attention():
    q, k, k_cmp = _inputs(T=96, B=1, seed=3)
    positions = torch.tensor([[95, 90, 81, 70, 64, 50]])
    k_cmp = k_cmp.clone().requires_grad_(True)
    q = q.clone().requires_grad_(True)
    k = k.clone().requires_grad_(True)
    loss = selection_alignment.selection_alignment_loss(q, k, k_cmp, positions, config=CONFIG)
    loss.backward()
    assert k.grad is None, "the target (dense attention) must pass no gradient"
    assert k_cmp.grad.abs().sum() > 0 and q.grad.abs().sum() > 0
    optimizer = torch.optim.Adam([k_cmp], lr=0.05)
    before = loss.item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = selection_alignment.selection_alignment_loss(q.detach(), k.detach(), k_cmp, positions, config=CONFIG)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 * before


def test_no_usable_position_gives_zero_with_a_graph():
    q, k, k_cmp = _inputs(T=75, B=1)
    k_cmp.requires_grad_(True)
    loss = selection_alignment.selection_alignment_loss(q, k, k_cmp, torch.tensor([[-1, 10, 3]]), config=CONFIG)
    assert loss.item() == 0.0
    loss.backward()
    assert k_cmp.grad.abs().sum() == 0


def test_sample_positions_puts_answer_queries_first_and_pads_short_rows():
    answer = torch.zeros(2, 40, dtype=torch.bool)
    answer[0, [30, 31, 35]] = True
    answer[1, 5] = True  # before `first`: not usable
    generator = torch.Generator().manual_seed(0)
    positions = selection_alignment.sample_positions(answer, 6, first=24, generator=generator)
    assert positions.shape == (2, 6)
    assert set(positions[0, :3].tolist()) == {30, 31, 35}
    assert all(24 <= p < 40 for p in positions.flatten().tolist())
    assert len(set(positions[0].tolist())) == 6
    short = selection_alignment.sample_positions(torch.zeros(1, 30, dtype=torch.bool), 8, first=26)
    assert sorted(short[0].tolist()) == [-1, -1, -1, -1, 26, 27, 28, 29]
    assert selection_alignment.first_ranked_position(CONFIG) == CONFIG.top_n * CONFIG.slc_block
