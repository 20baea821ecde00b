"""Block importance (Eq. 8-10) and top-n selection (Eq. 11-12) against brute force and hand-computed values.

Selections are compared as sets with tie tolerance: a selection is right when it holds the forced blocks,
no duplicate, no future block, min(n, c + 1) blocks in all, and its lowest data-chosen score is at least
the highest unselected score minus eps (so any tie-break is accepted).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nsa_core import masks, reference
from nsa_core.config import NSAConfig
from tests import brute_force as bf
from tests.test_reference import DK, DV, GROUPS, LENGTHS, PAPER, make_inputs, nsa_params

HYPERPARAMETERS = {
    "paper": PAPER,
    "l=d=l'": nsa_params(16, 16, 16, 3),
    "l'<l": nsa_params(32, 8, 16, 5),
    "two initial": nsa_params(16, 8, 32, 4, init_blocks=2, local_blocks=1),
    "no forced": nsa_params(8, 4, 8, 2, init_blocks=0, local_blocks=0),
    "all forced": nsa_params(8, 8, 16, 4, init_blocks=2, local_blocks=2),
}


def selection_problems(block_idx, scores, q_pos, *, slc_block, top_n, init_blocks, local_blocks, eps):
    """Every rule block_idx [B, TQ, H, n] breaks, given float64 importance scores [B, TQ, H, Ns]; [] if none."""
    problems = []
    B, TQ, H, n = block_idx.shape
    rows = block_idx.tolist()
    for b in range(B):
        for i in range(TQ):
            t = int(q_pos[b, i])
            current = t // slc_block
            must = bf.forced(t, slc_block=slc_block, init_blocks=init_blocks, local_blocks=local_blocks)
            for h in range(H):
                slots = rows[b][i][h]
                ids = [j for j in slots if j >= 0]
                where = f"(b={b}, t={t}, h={h}) chose {slots}"
                if slots != ids + [-1] * (n - len(ids)) or ids != sorted(set(ids)):
                    problems.append(f"{where}: not ascending unique ids followed by -1")
                if any(j > current for j in ids):
                    problems.append(f"{where}: a block after the current block {current}")
                if not must <= set(ids):
                    problems.append(f"{where}: forced blocks {sorted(must)} missing")
                if len(set(ids)) != min(top_n, current + 1):
                    problems.append(f"{where}: {len(set(ids))} blocks, expected {min(top_n, current + 1)}")
                chosen = [float(scores[b, i, h, j]) for j in set(ids) - must]
                left = [float(scores[b, i, h, j]) for j in range(current + 1) if j not in ids]
                if chosen and left and min(chosen) < max(left) - eps:
                    problems.append(f"{where}: chosen score {min(chosen):.6g} < unselected {max(left):.6g}")
    return problems


def brute_scores(x, q_pos, hp, num_slc):
    return bf.importance(x["q"], x["k_cmp"], q_pos, cmp_block=hp["cmp_block"], cmp_stride=hp["cmp_stride"],
                         slc_block=hp["slc_block"], num_slc=num_slc, scale=DK**-0.5)


def reference_selection(x, hp, q_start=None):
    _, lse = reference.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], cmp_block=hp["cmp_block"],
                                            cmp_stride=hp["cmp_stride"], q_start=q_start)
    return reference.select_blocks(x["q"], x["k_cmp"], lse, cmp_block=hp["cmp_block"], cmp_stride=hp["cmp_stride"],
                                   slc_block=hp["slc_block"], top_n=hp["top_n"], q_start=q_start,
                                   init_blocks=hp["init_blocks"], local_blocks=hp["local_blocks"])


# Eq. 9 remap ---------------------------------------------------------------------------------------


def test_overlap_remap_matches_hand_computed_paper_weights():
    """l=32, d=16, l'=64: window i = [16i, 16i+32); block j = [64j, 64j+64); weight = shared tokens / 16."""
    expected = torch.tensor([
        # block 0  1  2
        [2, 0, 0],  # window 0: [0, 32)
        [2, 0, 0],  # window 1: [16, 48)
        [2, 0, 0],  # window 2: [32, 64)
        [1, 1, 0],  # window 3: [48, 80) straddles blocks 0 and 1
        [0, 2, 0],  # window 4: [64, 96)
        [0, 2, 0],  # window 5: [80, 112)
        [0, 2, 0],  # window 6: [96, 128)
        [0, 1, 1],  # window 7: [112, 144)
        [0, 0, 2],  # window 8: [128, 160)
    ], dtype=torch.float32)
    weights = masks.overlap_weights(9, 3, cmp_block=32, cmp_stride=16, slc_block=64)
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)
    # Block 1 reads windows 3..7 with the paper's trapezoid 1, 2, 2, 2, 1.
    assert weights[3:8, 1].tolist() == [1, 2, 2, 2, 1]


@pytest.mark.parametrize("name", list(HYPERPARAMETERS))
def test_overlap_remap_matches_brute_force(name):
    hp = HYPERPARAMETERS[name]
    weights = masks.overlap_weights(40, 23, cmp_block=hp["cmp_block"], cmp_stride=hp["cmp_stride"],
                                    slc_block=hp["slc_block"], dtype=torch.float64)
    expected = bf.remap_matrix(40, 23, cmp_block=hp["cmp_block"], cmp_stride=hp["cmp_stride"],
                               slc_block=hp["slc_block"])
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)


def known_distribution_inputs(targets):
    """q [1, 1, G, Tc], k_cmp [1, Tc, 1, Tc] such that head g's compressed probabilities equal targets[g].

    k_cmp holds the unit vectors, so q . k_i = q[i]; q = log p / scale makes softmax(q . k * scale) = p.
    """
    targets = torch.as_tensor(targets, dtype=torch.float64)
    G, Tc = targets.shape
    scale = 0.5
    q = (targets.log() / scale).reshape(1, 1, G, Tc)
    k_cmp = torch.eye(Tc, dtype=torch.float64).reshape(1, Tc, 1, Tc)
    return q, k_cmp, scale


def test_importance_of_a_known_distribution_is_the_hand_computed_remap():
    """p_cmp = (1..9)/45 over 9 compressed tokens (query at t=159 sees all nine); paper configuration."""
    p = torch.arange(1, 10, dtype=torch.float64) / 45
    q, k_cmp, scale = known_distribution_inputs(p[None])
    _, lse = reference.compressed_attention(q, k_cmp, k_cmp, cmp_block=32, cmp_stride=16, scale=scale, q_start=159)
    scores = reference.importance_scores(q, k_cmp, lse, cmp_block=32, cmp_stride=16, slc_block=64, scale=scale,
                                         q_start=159)
    # block 0: 2 (p0 + p1 + p2) + p3;  block 1: p3 + 2 (p4 + p5 + p6) + p7;  block 2: p7 + 2 p8.
    expected = torch.tensor([2 * (1 + 2 + 3) + 4, 4 + 2 * (5 + 6 + 7) + 8, 8 + 2 * 9]) / 45
    torch.testing.assert_close(scores.reshape(3).double(), expected.double(), rtol=1e-6, atol=1e-7)


def test_importance_sums_the_probabilities_of_the_group():
    """Eq. 10: the scores of a KV head are the sum over its G query heads."""
    targets = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 1, 1, 1, 1, 1, 1, 1, 30], [1] * 9],
                           dtype=torch.float64)
    targets = targets / targets.sum(-1, keepdim=True)
    q, k_cmp, scale = known_distribution_inputs(targets)
    _, lse = reference.compressed_attention(q, k_cmp, k_cmp, cmp_block=32, cmp_stride=16, scale=scale, q_start=170)
    scores = reference.importance_scores(q, k_cmp, lse, cmp_block=32, cmp_stride=16, slc_block=64, scale=scale,
                                         q_start=170)
    weights = bf.remap_matrix(9, 3, cmp_block=32, cmp_stride=16, slc_block=64)
    torch.testing.assert_close(scores.reshape(3).double(), (targets @ weights).sum(0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("T", LENGTHS)
def test_importance_matches_brute_force(T, G):
    x = make_inputs(T, G, dtype=torch.float32)
    _, lse = reference.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], cmp_block=32, cmp_stride=16)
    scores = reference.importance_scores(x["q"], x["k_cmp"], lse, cmp_block=32, cmp_stride=16, slc_block=64)
    q_pos = bf.positions(x["q"].shape[0], T, 0)
    expected = brute_scores(x, q_pos, PAPER, scores.shape[-1])
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    # Each visible compressed token spreads its probability l/d = 2 over the blocks: rows sum to 2 G.
    seen = q_pos >= 31
    torch.testing.assert_close(scores.sum(-1)[seen].double(), torch.full_like(expected.sum(-1)[seen], 2 * G),
                               rtol=1e-5, atol=1e-5)
    assert (scores[~seen] == 0).all()


@pytest.mark.parametrize("hp", [PAPER, nsa_params(16, 8, 16, 6, init_blocks=3, local_blocks=2),
                                nsa_params(12, 4, 8, 5, init_blocks=1, local_blocks=0),
                                nsa_params(8, 8, 8, 5, init_blocks=0, local_blocks=3)],
                         ids=["paper", "init3", "no-local", "no-init"])
@pytest.mark.parametrize("q_start", [0, 37])
def test_free_scores_match_brute_force(hp, q_start):
    """slc_scores "free" through its lse shift equals renormalising each head over its free blocks by hand."""
    T = 300
    x = make_inputs(T, 3, TQ=T - q_start, dtype=torch.float32, hp=hp)
    l, d, ls = hp["cmp_block"], hp["cmp_stride"], hp["slc_block"]
    config = NSAConfig(n_head=x["q"].shape[2], n_kv_head=x["k_cmp"].shape[2], head_dim=DK, v_head_dim=DV,
                       slc_scores="free", **hp)
    _, lse = reference.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], cmp_block=l, cmp_stride=d, q_start=q_start)
    free_lse = reference.selection_lse(x["q"], x["k_cmp"], lse, config=config, q_start=q_start)
    scores = reference.importance_scores(x["q"], x["k_cmp"], free_lse, cmp_block=l, cmp_stride=d, slc_block=ls,
                                         q_start=q_start)
    q_pos = bf.positions(x["q"].shape[0], T - q_start, q_start)
    expected = bf.free_importance(x["q"], x["k_cmp"], q_pos, cmp_block=l, cmp_stride=d, slc_block=ls,
                                  num_slc=scores.shape[-1], scale=DK**-0.5, init_blocks=hp["init_blocks"],
                                  local_blocks=hp["local_blocks"])
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(reference.selection_lse(x["q"], x["k_cmp"], lse, config=config.replace(slc_scores="paper"),
                                               q_start=q_start), lse)


def test_free_scores_pick_the_block_a_head_prefers_over_what_the_others_spread():
    """The case "free" is for: one head of a group puts nearly all its compressed attention on its own
    (forced) block and the rest on block 1; another spreads evenly. Eq. 10 ranks by the spread head,
    "free" gives the first head's whole remaining vote to block 1."""
    hp = nsa_params(16, 16, 16, 2, init_blocks=0, local_blocks=1)  # l = d = l': one compressed token per block
    Tc = 8
    k_cmp = torch.zeros(1, Tc, 1, 8)
    k_cmp[0, :, 0, :Tc] = torch.eye(Tc) * 10  # token i is direction i
    q = torch.zeros(1, 1, 2, 8)
    q[0, 0, 0, 7], q[0, 0, 0, 1] = 1.0, 0.6  # head 0: 0.98 on block 7 (its own), 0.018 on block 1
    q[0, 0, 1, 3] = 0.03  # head 1: 0.16 on block 3, 0.12 on every other
    config = NSAConfig(n_head=2, n_kv_head=1, head_dim=8, v_head_dim=8, slc_scores="free", **hp)
    args = {"cmp_block": 16, "cmp_stride": 16, "slc_block": 16, "top_n": 2, "init_blocks": 0, "local_blocks": 1,
            "scale": 1.0, "q_start": 127}
    _, lse = reference.compressed_attention(q, k_cmp, k_cmp, cmp_block=16, cmp_stride=16, scale=1.0, q_start=127)
    paper = reference.select_blocks(q, k_cmp, lse, **args)
    free = reference.select_blocks(q, k_cmp, reference.selection_lse(q, k_cmp, lse, config=config, scale=1.0,
                                                                     q_start=127), **args)
    assert paper[0, 0, 0].tolist() == [3, 7] and free[0, 0, 0].tolist() == [1, 7]


# Top-n ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("T", LENGTHS)
def test_selection_matches_brute_force_with_tie_tolerance(T, G):
    x = make_inputs(T, G, dtype=torch.float32)
    block_idx = reference_selection(x, PAPER)
    assert block_idx.dtype == torch.int32 and block_idx.shape == (*x["k"].shape[:3], 16)
    q_pos = bf.positions(x["q"].shape[0], T, 0)
    scores = brute_scores(x, q_pos, PAPER, T // 64 + 1)
    assert selection_problems(block_idx, scores, q_pos, slc_block=64, top_n=16, init_blocks=1, local_blocks=2,
                              eps=1e-5 * G) == []


@pytest.mark.parametrize("T", [100, 333])
@pytest.mark.parametrize("name", list(HYPERPARAMETERS))
def test_selection_rules_hold_for_every_block_configuration(name, T):
    hp = HYPERPARAMETERS[name]
    x = make_inputs(T, 2, hp=hp, dtype=torch.float32)
    block_idx = reference_selection(x, hp)
    q_pos = bf.positions(x["q"].shape[0], T, 0)
    scores = brute_scores(x, q_pos, hp, (T - 1) // hp["slc_block"] + 1)
    assert selection_problems(block_idx, scores, q_pos, slc_block=hp["slc_block"], top_n=hp["top_n"],
                              init_blocks=hp["init_blocks"], local_blocks=hp["local_blocks"], eps=1e-5) == []


@pytest.mark.parametrize("q_start", ["int", "tensor"])
def test_selection_with_q_start(q_start):
    T, TQ, B = 700, 40, 2
    x = make_inputs(T, 4, TQ=TQ, B=B, dtype=torch.float32)
    start = T - TQ if q_start == "int" else torch.tensor([T - TQ, 90])
    block_idx = reference_selection(x, PAPER, q_start=start)
    q_pos = bf.positions(B, TQ, start)
    scores = brute_scores(x, q_pos, PAPER, T // 64 + 1)
    assert selection_problems(block_idx, scores, q_pos, slc_block=64, top_n=16, init_blocks=1, local_blocks=2,
                              eps=4e-5) == []


def test_the_tie_tolerant_check_rejects_a_wrong_selection():
    """The checker itself: swapping a chosen block for a clearly lower-scored one must be reported."""
    x = make_inputs(2049, 2, B=1, dtype=torch.float32)
    block_idx = reference_selection(x, PAPER)
    q_pos = bf.positions(1, 2049, 0)
    scores = brute_scores(x, q_pos, PAPER, 33)
    t, h = 2000, 0
    chosen = set(block_idx[0, t, h].tolist())
    must = bf.forced(t, slc_block=64, init_blocks=1, local_blocks=2)
    best = max(chosen - must, key=lambda j: scores[0, t, h, j])
    worst = min(set(range(t // 64 + 1)) - chosen, key=lambda j: scores[0, t, h, j])
    wrong = block_idx[:, t:t + 1].clone()
    wrong[0, 0, h] = torch.tensor(sorted(chosen - {best} | {worst}), dtype=torch.int32)
    problems = selection_problems(wrong, scores[:, t:t + 1], q_pos[:, t:t + 1], slc_block=64, top_n=16,
                                  init_blocks=1, local_blocks=2, eps=1e-5)
    assert len(problems) == 1 and "chosen score" in problems[0]


def test_forced_blocks_win_over_any_score_and_future_blocks_never_appear():
    """Adversarial scores: huge on future blocks, tiny on forced ones, zero elsewhere."""
    pos = torch.tensor([[0, 63, 64, 130, 640, 1000]])
    scores = torch.zeros(1, 6, 1, 20)
    scores[..., 17:] = 1e9  # blocks after every query's current block
    scores[..., 0] = -1.0  # block 0 least attractive, still forced
    block_idx = reference.top_n_blocks(scores, pos, slc_block=64, top_n=4, init_blocks=1, local_blocks=2)
    assert block_idx[0, :, 0].tolist() == [
        [0, -1, -1, -1],  # t=0: only block 0 exists
        [0, -1, -1, -1],  # t=63: still block 0
        [0, 1, -1, -1],  # t=64: blocks 0 and 1 (c-1 = 0 is block 0 again: no duplicate)
        [0, 1, 2, -1],  # t=130: c=2, c-1=1, and 0; three candidates only
        [0, 1, 9, 10],  # t=640: forced 0, 9, 10; the zero-score tie goes to the lowest id
        [0, 1, 14, 15],  # t=1000: c=15
    ]


def test_ties_are_broken_deterministically_and_accepted_as_sets():
    """Identical compressed keys give uniform probabilities: the interior blocks all tie."""
    x = make_inputs(2049, 2, dtype=torch.float32)
    x["k_cmp"][:] = x["k_cmp"][:, :1]
    first, second = reference_selection(x, PAPER), reference_selection(x, PAPER)
    assert torch.equal(first, second)
    q_pos = bf.positions(1, 2049, 0)
    scores = brute_scores(x, q_pos, PAPER, 33)
    assert selection_problems(first, scores, q_pos, slc_block=64, top_n=16, init_blocks=1, local_blocks=2,
                              eps=1e-5) == []


def test_non_finite_scores_are_refused():
    pos = torch.tensor([[200]])
    scores = torch.rand(1, 1, 1, 4)
    scores[..., 2] = math.nan
    with pytest.raises(ValueError, match="finite"):
        reference.top_n_blocks(scores, pos, slc_block=64, top_n=2)


def test_a_planted_needle_is_selected_and_dominates_the_selected_branch():
    """A key far back that matches the query strongly: its block wins the top-n and its value the softmax."""
    T, needle = 2049, 650  # block 10, far outside the window of the last query
    x = make_inputs(T, 2, B=1, dtype=torch.float32)
    direction = torch.randn(DK)
    direction = direction / direction.norm()
    x["q"][:, -1] = 12 * direction  # every head of the last query looks for the needle
    x["k"][:, needle] = 12 * direction
    for i in range(x["k_cmp"].shape[1]):  # compressed tokens whose window holds the needle carry it too
        if i * 16 <= needle < i * 16 + 32:
            x["k_cmp"][:, i] = 12 * direction
    block_idx = reference_selection(x, PAPER)
    assert (block_idx[0, -1] == needle // 64).any(-1).all()  # both KV heads chose block 10
    o = reference.selected_attention(x["q"][:, -1:], x["k"], x["v"], block_idx[:, -1:], slc_block=64,
                                     q_start=T - 1)
    torch.testing.assert_close(o[0, 0], x["v"][0, needle].repeat_interleave(2, 0), rtol=0, atol=1e-3)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data(), slc_block=st.sampled_from([1, 4, 16]), top_n=st.integers(1, 6),
       init_blocks=st.integers(0, 2), local_blocks=st.integers(0, 3))
def test_top_n_equals_brute_force_on_random_scores_with_ties(data, slc_block, top_n, init_blocks, local_blocks):
    """Small integer scores make ties common; ties go to the lower id in both, so the sets match exactly."""
    if init_blocks + local_blocks > top_n:
        top_n = init_blocks + local_blocks  # the config refuses fewer slots than forced blocks
    positions = data.draw(st.lists(st.integers(0, 8 * slc_block - 1), min_size=1, max_size=6))
    pos = torch.tensor([positions])
    num_slc = max(positions) // slc_block + 1
    scores = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=len(positions) * num_slc,
                                             max_size=len(positions) * num_slc)), dtype=torch.float32)
    scores = scores.reshape(1, len(positions), 1, num_slc)
    block_idx = reference.top_n_blocks(scores, pos, slc_block=slc_block, top_n=top_n, init_blocks=init_blocks,
                                       local_blocks=local_blocks)
    expected = bf.top_n(scores.double(), pos, slc_block=slc_block, top_n=top_n, init_blocks=init_blocks,
                        local_blocks=local_blocks)
    assert [{j for j in row if j >= 0} for row in block_idx.reshape(-1, top_n).tolist()] == expected
    assert selection_problems(block_idx, scores.double(), pos, slc_block=slc_block, top_n=top_n,
                              init_blocks=init_blocks, local_blocks=local_blocks, eps=0.0) == []
