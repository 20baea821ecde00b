"""Each branch of the reference against the float64 brute force, plus empty rows, q_start and causality.

Shapes stay tiny (Dk=8, Dv=6, one or two KV heads) so that T=2049 with G=16 stays cheap. The T x G grid
runs the reference in float32, its everyday precision, and checks it at 1e-5 (a one-token masking error
moves outputs by about 1e-3); the full-layer tests run it in float64 and check it at 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch

from nsa_core import reference
from nsa_core.config import NSAConfig
from tests import brute_force as bf

LENGTHS = [1, 31, 32, 63, 64, 65, 1000, 2049]
GROUPS = [1, 2, 3, 4, 16]


def nsa_params(cmp_block, cmp_stride, slc_block, top_n, *, init_blocks=1, local_blocks=2, window=512):
    """NSA hyperparameters (l, d, l', n, forced blocks, w) as keyword arguments for NSAConfig."""
    return {"cmp_block": cmp_block, "cmp_stride": cmp_stride, "slc_block": slc_block, "top_n": top_n,
            "init_blocks": init_blocks, "local_blocks": local_blocks, "window": window}


PAPER = nsa_params(32, 16, 64, 16)
DK, DV = 8, 6  # q/k dim differs from v dim on purpose
TIGHT = {"rtol": 1e-10, "atol": 1e-10}  # float64 reference against float64 brute force
F32 = {"rtol": 1e-5, "atol": 1e-5}  # float32 reference against float64 brute force


def num_cmp(T, cmp_block, cmp_stride):
    """Complete compression windows in T tokens, counted by hand: windows [i*d, i*d + l) with i*d + l <= T."""
    return sum(1 for i in range(T) if i * cmp_stride + cmp_block <= T)


def make_inputs(T, G, *, TQ=None, B=None, hp=PAPER, dtype=torch.float64):
    """Random q [B, TQ, HQ, DK], k/v [B, T, H, D*], k_cmp/v_cmp [B, Tc, H, D*] (independent of k, v)."""
    H = 1 if G >= 16 or T >= 1000 else 2  # two KV heads check the head-to-group mapping; one keeps long T cheap
    B = B if B is not None else (2 if T <= 65 else 1)
    TQ = T if TQ is None else TQ
    Tc = num_cmp(T, hp["cmp_block"], hp["cmp_stride"])
    return {
        "q": torch.randn(B, TQ, G * H, DK, dtype=dtype),
        "k": torch.randn(B, T, H, DK, dtype=dtype),
        "v": torch.randn(B, T, H, DV, dtype=dtype),
        "k_cmp": torch.randn(B, Tc, H, DK, dtype=dtype),
        "v_cmp": torch.randn(B, Tc, H, DV, dtype=dtype),
    }


def block_idx_from_sets(sets, shape):
    """[B, TQ, H, n] int32 from brute_force.top_n's sets: ascending ids, then -1."""
    out = torch.full(shape, -1, dtype=torch.int32)
    flat = out.view(-1, shape[-1])
    for row, chosen in enumerate(sets):
        flat[row, : len(chosen)] = torch.tensor(sorted(chosen), dtype=torch.int32)
    return out


def brute_selection(x, q_pos, hp=PAPER):
    """Block sets chosen by the brute force for x's queries."""
    num_slc = int(q_pos.max()) // hp["slc_block"] + 1
    scores = bf.importance(x["q"], x["k_cmp"], q_pos, cmp_block=hp["cmp_block"], cmp_stride=hp["cmp_stride"],
                           slc_block=hp["slc_block"], num_slc=num_slc, scale=DK**-0.5)
    return bf.top_n(scores, q_pos, slc_block=hp["slc_block"], top_n=hp["top_n"], init_blocks=hp["init_blocks"],
                    local_blocks=hp["local_blocks"])


# Each branch against brute force, T x G ---------------------------------------------------------
# The reference runs on every query in float32; the brute force checks the rows of `checked_rows` in
# float64 (every row up to T=65, a few hundred rows, block boundaries and both ends included, beyond).


def checked_rows(T):
    """Query rows the brute force checks: all of them for short inputs, a boundary-heavy sample otherwise."""
    if T <= 65:
        return torch.arange(T)
    boundaries = torch.arange(64, T, 64)
    picks = [torch.arange(96), torch.arange(T - 96, T), boundaries - 1, boundaries, torch.randperm(T)[:64]]
    return torch.cat(picks).unique()


def brute_rows(x, rows):
    """x with only the given query rows, and their absolute positions [B, R]."""
    y = dict(x, q=x["q"][:, rows])
    return y, rows.expand(x["q"].shape[0], -1)


@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("T", LENGTHS)
def test_compressed_matches_brute_force(T, G):
    x = make_inputs(T, G, dtype=torch.float32)
    o, lse = reference.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], cmp_block=32, cmp_stride=16)
    rows = checked_rows(T)
    y, q_pos = brute_rows(x, rows)
    o_bf, lse_bf = bf.compressed_attention(y["q"], y["k_cmp"], y["v_cmp"], q_pos, cmp_block=32, cmp_stride=16,
                                           scale=DK**-0.5)
    torch.testing.assert_close(o[:, rows].double(), o_bf, **F32)
    torch.testing.assert_close(lse[:, rows].double(), lse_bf, **F32)
    blind = torch.arange(T) < 31  # no compression window [i*16, i*16 + 31] has ended yet
    assert torch.isneginf(lse[:, blind]).all() and (o[:, blind] == 0).all()
    assert torch.isfinite(lse[:, ~blind]).all()


@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("T", LENGTHS)
def test_selected_matches_brute_force(T, G):
    x = make_inputs(T, G, dtype=torch.float32)
    _, lse = reference.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], cmp_block=32, cmp_stride=16)
    block_idx = reference.select_blocks(x["q"], x["k_cmp"], lse, cmp_block=32, cmp_stride=16, slc_block=64,
                                        top_n=16)
    # Shuffled slots: the branch must accept -1 and ids in any order, not only the canonical layout.
    block_idx = block_idx.gather(-1, torch.rand(block_idx.shape).argsort(-1))
    o = reference.selected_attention(x["q"], x["k"], x["v"], block_idx, slc_block=64)
    rows = checked_rows(T)
    y, q_pos = brute_rows(x, rows)
    o_bf = bf.selected_attention(y["q"], y["k"], y["v"], block_idx[:, rows], q_pos, slc_block=64, scale=DK**-0.5)
    torch.testing.assert_close(o[:, rows].double(), o_bf, **F32)


@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("T", LENGTHS)
def test_window_matches_brute_force(T, G):
    x = make_inputs(T, G, dtype=torch.float32)
    o = reference.window_attention(x["q"], x["k"], x["v"], window=512)
    rows = checked_rows(T)
    y, q_pos = brute_rows(x, rows)
    o_bf = bf.window_attention(y["q"], y["k"], y["v"], q_pos, window=512, scale=DK**-0.5)
    torch.testing.assert_close(o[:, rows].double(), o_bf, **F32)


@pytest.mark.parametrize("window", [1, 2, 17, 64])
def test_window_sizes_count_the_query_itself(window):
    x = make_inputs(100, 2)
    o = reference.window_attention(x["q"], x["k"], x["v"], window=window, scale=0.3)
    o_bf = bf.window_attention(x["q"], x["k"], x["v"], bf.positions(1, 100, 0), window=window, scale=0.3)
    torch.testing.assert_close(o, o_bf, **TIGHT)
    if window == 1:  # one token: the query's own value, whatever the scores
        torch.testing.assert_close(o, x["v"].repeat_interleave(2, dim=2), **TIGHT)


@pytest.mark.parametrize("T", [65, 1000])
def test_dense_matches_brute_force(T):
    x = make_inputs(T, 3)
    o = reference.dense_attention(x["q"], x["k"], x["v"])
    o_bf = bf.dense_attention(x["q"], x["k"], x["v"], bf.positions(x["q"].shape[0], T, 0), scale=DK**-0.5)
    torch.testing.assert_close(o, o_bf, **TIGHT)


HYPERPARAMETERS = {
    "l=d=l'": nsa_params(16, 16, 16, 3, window=16),
    "l'<l": nsa_params(32, 8, 16, 5, window=7),
    "d<l<l'": nsa_params(16, 8, 32, 4, init_blocks=2, local_blocks=1, window=40),
    "no forced": nsa_params(8, 4, 8, 2, init_blocks=0, local_blocks=0, window=3),
}


@pytest.mark.parametrize("T", [100, 333])
@pytest.mark.parametrize("name", list(HYPERPARAMETERS))
def test_full_layer_matches_brute_force(name, T):
    """nsa_attention in several block configurations: every part checked against brute force."""
    hp = HYPERPARAMETERS[name]
    config = NSAConfig(**hp, n_head=4, n_kv_head=2, head_dim=DK, v_head_dim=DV)
    x = make_inputs(T, 2, hp=hp)
    gates = torch.rand(1, T, 4, 3, dtype=torch.float64)
    k_win, v_win = torch.randn_like(x["k"]), torch.randn_like(x["v"])  # independent K/V for the window
    parts = reference.nsa_attention(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], gates, config=config,
                                    k_win=k_win, v_win=v_win, return_parts=True)
    q_pos = bf.positions(1, T, 0)
    scale = DK**-0.5
    o_cmp, lse = bf.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], q_pos, cmp_block=hp["cmp_block"],
                                         cmp_stride=hp["cmp_stride"], scale=scale)
    # Ties aside (none with random inputs), the chosen sets must be the brute-force ones.
    chosen = [{int(j) for j in row if j >= 0} for row in parts.block_idx.reshape(-1, hp["top_n"])]
    assert chosen == brute_selection(x, q_pos, hp)
    o_slc = bf.selected_attention(x["q"], x["k"], x["v"], parts.block_idx, q_pos, slc_block=hp["slc_block"],
                                  scale=scale)
    o_win = bf.window_attention(x["q"], k_win, v_win, q_pos, window=hp["window"], scale=scale)
    torch.testing.assert_close(parts.o_cmp, o_cmp, **TIGHT)
    torch.testing.assert_close(parts.lse_cmp.double(), lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts.o_slc, o_slc, **TIGHT)
    torch.testing.assert_close(parts.o_win, o_win, **TIGHT)
    o = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win
    torch.testing.assert_close(parts.o, o, **TIGHT)
    plain = reference.nsa_attention(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], gates, config=config,
                                    k_win=k_win, v_win=v_win)
    assert torch.equal(plain, parts.o)


def test_float32_inputs_match_brute_force_at_float32_tolerance():
    x = make_inputs(1000, 4, dtype=torch.float32)
    o, lse = reference.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], cmp_block=32, cmp_stride=16)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    q_pos = bf.positions(1, 1000, 0)
    o_bf, lse_bf = bf.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], q_pos, cmp_block=32, cmp_stride=16,
                                           scale=DK**-0.5)
    torch.testing.assert_close(o.double(), o_bf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse_bf, rtol=1e-5, atol=1e-5)
    o_win = reference.window_attention(x["q"], x["k"], x["v"], window=512)
    torch.testing.assert_close(o_win.double(), bf.window_attention(x["q"], x["k"], x["v"], q_pos, window=512,
                                                                   scale=DK**-0.5), rtol=1e-5, atol=1e-5)


def test_chunked_evaluation_matches_one_chunk(monkeypatch):
    """Long inputs run in chunks of queries; the chunk size must not change a single bit."""
    config = NSAConfig(**PAPER, n_head=4, n_kv_head=2, head_dim=DK, v_head_dim=DV)
    x = make_inputs(400, 2, dtype=torch.float32)
    gates = torch.rand(1, 400, 4, 3)
    whole = reference.nsa_attention(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], gates, config=config,
                                    return_parts=True)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1 << 16)  # about 16 queries per chunk
    chunked = reference.nsa_attention(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], gates, config=config,
                                      return_parts=True)
    for name, a, b in zip(whole._fields, whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    assert torch.equal(whole.block_idx, chunked.block_idx)


# q_start: queries that are the last TQ of TK tokens, or ragged per batch row ----------------------


@pytest.mark.parametrize("q_start", ["int", "tensor"])
def test_q_start_matches_brute_force(q_start):
    T, TQ, B = 300, 37, 2
    x = make_inputs(T, 3, TQ=TQ, B=B)
    start = T - TQ if q_start == "int" else torch.tensor([T - TQ, 101])
    q_pos = bf.positions(B, TQ, start)
    scale = DK**-0.5
    o, lse = reference.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], cmp_block=32, cmp_stride=16,
                                            q_start=start)
    o_bf, lse_bf = bf.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], q_pos, cmp_block=32, cmp_stride=16,
                                           scale=scale)
    torch.testing.assert_close(o, o_bf, **TIGHT)
    torch.testing.assert_close(lse.double(), lse_bf, rtol=1e-6, atol=1e-6)
    block_idx = block_idx_from_sets(brute_selection(x, q_pos), (B, TQ, 2, 16))
    o_slc = reference.selected_attention(x["q"], x["k"], x["v"], block_idx, slc_block=64, q_start=start)
    torch.testing.assert_close(o_slc, bf.selected_attention(x["q"], x["k"], x["v"], block_idx, q_pos, slc_block=64,
                                                            scale=scale), **TIGHT)
    o_win = reference.window_attention(x["q"], x["k"], x["v"], window=50, q_start=start)
    torch.testing.assert_close(o_win, bf.window_attention(x["q"], x["k"], x["v"], q_pos, window=50, scale=scale),
                               **TIGHT)


def test_q_start_defaults():
    """None means: the last TQ of TK keys for raw-key branches, position 0 for the compressed branch."""
    x = make_inputs(200, 2, TQ=20)
    q, k, v = x["q"], x["k"], x["v"]
    assert torch.equal(reference.window_attention(q, k, v, window=30),
                       reference.window_attention(q, k, v, window=30, q_start=180))
    assert torch.equal(reference.dense_attention(q, k, v), reference.dense_attention(q, k, v, q_start=180))
    o_default, _ = reference.compressed_attention(q, x["k_cmp"], x["v_cmp"], cmp_block=32, cmp_stride=16)
    o_zero, _ = reference.compressed_attention(q, x["k_cmp"], x["v_cmp"], cmp_block=32, cmp_stride=16, q_start=0)
    assert torch.equal(o_default, o_zero)


def test_decode_slice_equals_prefill_rows():
    """The last TQ queries with q_start give the prefill's last TQ rows, for the whole layer."""
    config = NSAConfig(**PAPER, n_head=4, n_kv_head=2, head_dim=DK, v_head_dim=DV)
    x = make_inputs(300, 2)
    gates = torch.rand(1, 300, 4, 3, dtype=torch.float64)
    full = reference.nsa_attention(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], gates, config=config,
                                   return_parts=True)
    tail = reference.nsa_attention(x["q"][:, -9:], x["k"], x["v"], x["k_cmp"], x["v_cmp"], gates[:, -9:],
                                   config=config, return_parts=True)
    assert torch.equal(full.block_idx[:, -9:], tail.block_idx)
    torch.testing.assert_close(full.o[:, -9:], tail.o, **TIGHT)


# Queries that see no compressed token ------------------------------------------------------------


@pytest.mark.parametrize("T", [20, 40, 100])
def test_empty_compressed_rows_have_zero_output_and_gradient(T):
    """t < l - 1 sees nothing: o = 0, lse = -inf, no NaN in outputs or gradients, zero gradient there."""
    x = make_inputs(T, 2)
    q, k_cmp, v_cmp = (x[n].requires_grad_() for n in ("q", "k_cmp", "v_cmp"))
    o, lse = reference.compressed_attention(q, k_cmp, v_cmp, cmp_block=32, cmp_stride=16)
    (o * torch.randn_like(o)).sum().backward()
    assert (o[:, :31] == 0).all() and torch.isneginf(lse[:, :31]).all()
    assert torch.isfinite(o).all()
    for grad in (q.grad, k_cmp.grad, v_cmp.grad):
        assert torch.isfinite(grad).all()
    assert (q.grad[:, :31] == 0).all()
    if T > 47:  # from t = 47 on a query sees two compressed tokens, so its softmax depends on q
        assert (q.grad[:, 47:] != 0).any()


def test_empty_rows_give_finite_gradients_through_the_whole_layer():
    config = NSAConfig(**PAPER, n_head=4, n_kv_head=2, head_dim=DK, v_head_dim=DV)
    x = make_inputs(20, 2)  # no compressed token at all: Tc = 0
    leaves = [x[n].requires_grad_() for n in ("q", "k", "v")]
    gates = torch.rand(2, 20, 4, 3, dtype=torch.float64, requires_grad=True)
    o = reference.nsa_attention(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], gates, config=config)
    o.square().sum().backward()
    assert torch.isfinite(o).all()
    for t in [*leaves, gates]:
        assert torch.isfinite(t.grad).all()
    assert (gates.grad[..., 0] == 0).all()  # o_cmp = 0, so its gate learns nothing


def test_gradients_match_finite_differences():
    """gradcheck in float64 on tiny inputs, empty compressed rows and a partial last block included."""
    hp = {"cmp_block": 4, "cmp_stride": 2, "slc_block": 4}
    x = make_inputs(11, 2, B=1, hp=hp)
    q, k, v, k_cmp, v_cmp = (x[n].requires_grad_() for n in ("q", "k", "v", "k_cmp", "v_cmp"))
    assert torch.autograd.gradcheck(
        lambda q, kc, vc: reference.compressed_attention(q, kc, vc, cmp_block=4, cmp_stride=2)[0],
        (q, k_cmp, v_cmp), fast_mode=True)
    block_idx = torch.tensor([0, 2, -1], dtype=torch.int32).expand(1, 11, 2, 3).clone()
    assert torch.autograd.gradcheck(
        lambda q, k, v: reference.selected_attention(q, k, v, block_idx, slc_block=4), (q, k, v), fast_mode=True)
    assert torch.autograd.gradcheck(lambda q, k, v: reference.window_attention(q, k, v, window=5), (q, k, v),
                                    fast_mode=True)


# Causality: nothing after t changes anything at or before t ---------------------------------------


def perturb_after(x, t, hp=PAPER):
    """A copy of x with every raw token after t, and every compressed token whose window ends after t, redrawn."""
    y = {name: value.clone() for name, value in x.items()}
    for name in ("k", "v"):
        y[name][:, t + 1:] = torch.randn_like(y[name][:, t + 1:])
    y["q"][:, t + 1:] = torch.randn_like(y["q"][:, t + 1:])
    first_late = sum(1 for i in range(y["k_cmp"].shape[1]) if i * hp["cmp_stride"] + hp["cmp_block"] - 1 <= t)
    for name in ("k_cmp", "v_cmp"):
        y[name][:, first_late:] = torch.randn_like(y[name][:, first_late:])
    return y


@pytest.mark.parametrize("t", [0, 30, 31, 63, 64, 200])
def test_each_branch_and_the_layer_are_causal(t):
    config = NSAConfig(**dict(PAPER, window=40), n_head=4, n_kv_head=2, head_dim=DK, v_head_dim=DV)
    x = make_inputs(300, 2, dtype=torch.float32)
    y = perturb_after(x, t)
    gates = torch.rand(1, 300, 4, 3)
    gates_y = gates.clone()
    gates_y[:, t + 1:] = torch.rand_like(gates_y[:, t + 1:])
    a = reference.nsa_attention(*(x[n] for n in ("q", "k", "v", "k_cmp", "v_cmp")), gates, config=config,
                                return_parts=True)
    b = reference.nsa_attention(*(y[n] for n in ("q", "k", "v", "k_cmp", "v_cmp")), gates_y, config=config,
                                return_parts=True)
    for name, before, after in zip(a._fields, a, b, strict=True):
        assert torch.equal(before[:, : t + 1], after[:, : t + 1]), name
        assert not torch.equal(before[:, t + 1:], after[:, t + 1:]) or name == "block_idx", name


# Bad input ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x = make_inputs(64, 2)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        reference.window_attention(x["q"][:, :, :3], x["k"], x["v"], window=8)
    with pytest.raises(ValueError, match=r"\[B=2\] tensor"):
        reference.window_attention(x["q"], x["k"], x["v"], window=8, q_start=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="q_start must be >= 0"):
        reference.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], cmp_block=32, cmp_stride=16, q_start=-1)
    too_far = torch.full((2, 64, 2, 1), 1, dtype=torch.int32)  # 64 keys hold block 0 only
    with pytest.raises(ValueError, match="block id >= 1"):
        reference.selected_attention(x["q"], x["k"], x["v"], too_far, slc_block=64)


def test_lse_is_minus_infinity_not_a_finite_sentinel():
    x = make_inputs(31, 1)
    _, lse = reference.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], cmp_block=32, cmp_stride=16)
    assert lse.shape == (2, 31, 2) and (lse == -math.inf).all()
