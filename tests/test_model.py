"""NSALM: causality (layer, model, cached decode), gradients to every parameter, decode equal to prefill.

Tiny models with small blocks (l=8, d=4, l'=16, w=12) so that a hundred tokens cross many compression,
selection and window boundaries; one case keeps the paper's block sizes.
"""

from __future__ import annotations

import pytest
import torch

from nsa_core import reference
from nsa_core.config import NSAConfig
from nsa_core.model import NSALM
from nsa_core.rope import apply_rope

TINY = NSAConfig(d_model=32, n_layer=2, n_head=4, n_kv_head=2, head_dim=8, v_head_dim=6, mlp_hidden=48,
                 cmp_block=8, cmp_stride=4, slc_block=16, top_n=3, window=12, cmp_mlp_hidden=16)
VARIANTS = {
    "mlp-shared": TINY,
    "mlp-independent": TINY.replace(kv_mode="independent"),
    "mean-shared": TINY.replace(cmp_fn="mean"),
    "mean-independent": TINY.replace(cmp_fn="mean", kv_mode="independent"),
    "paper-blocks": TINY.replace(cmp_block=32, cmp_stride=16, slc_block=64, top_n=4, window=40),
    "dense": TINY.replace(attention="dense"),
}
# fp32 on the CPU: cached and full computations differ only by summation order (about 1e-6 on O(1) logits).
CLOSE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Decode runs thousands of tiny ops, where thread synchronisation costs more than the math (40x on a
    busy 2-core machine); one thread keeps this file fast whatever else the machine runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(name):
    torch.manual_seed(0)
    model = NSALM(VARIANTS[name]).eval()
    # Unit-scale weights (the training init is 0.02) make logits O(1) and every branch matter, and non-zero
    # biases and position encodings hide no parameter's effect behind its init value.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("bias", "b1", "b2", "pos_emb")):
                p.normal_(0, 0.1)
            elif p.dim() == 2 and "norm" not in pname:
                p.normal_(0, p.shape[-1] ** -0.5)
    return model


def random_ids(batch, length, seed=1):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# Causality ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp-independent", "mean-shared", "paper-blocks", "dense"])
def test_model_is_causal(name):
    model = make_model(name)
    ids = random_ids(2, 150)
    with torch.no_grad():
        logits = model(ids)
        for t in [0, 7, 15, 16, 63, 100]:
            changed = ids.clone()
            changed[:, t + 1:] = random_ids(2, 149 - t, seed=t + 2)
            after = model(changed)
            assert torch.equal(logits[:, : t + 1], after[:, : t + 1]), t
            assert not torch.equal(logits[:, t + 1:], after[:, t + 1:])


@pytest.mark.parametrize("name", ["mlp-shared", "mean-independent"])
def test_attention_layer_is_causal(name):
    """One layer's NSA output, every part included, from hidden states perturbed after t."""
    attn = make_model(name).layers[0].attn
    x = torch.randn(1, 120, 32)
    with torch.no_grad():
        _, (_, parts) = attn(x, ops=reference, return_parts=True)
        for t in [3, 11, 40, 95]:
            changed = x.clone()
            changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:])
            _, (_, after) = attn(changed, ops=reference, return_parts=True)
            for field, a, b in zip(parts._fields, parts, after, strict=True):
                assert torch.equal(a[:, : t + 1], b[:, : t + 1]), (t, field)


@pytest.mark.parametrize("name", ["mlp-independent", "dense"])
def test_cached_decode_is_causal(name):
    """A chunk stepped through the KV cache: tokens late in the chunk change nothing before them."""
    model = make_model(name)
    ids = random_ids(1, 90)
    outputs = []
    for tail_seed in (10, 11):
        chunk = ids[:, 60:].clone()
        chunk[:, 20:] = random_ids(1, 10, seed=tail_seed)
        cache = model.new_cache()
        prefix_logits = model.step(ids[:, :60], cache)
        outputs.append((prefix_logits, model.step(chunk, cache)))
    (prefix_a, chunk_a), (prefix_b, chunk_b) = outputs
    assert torch.equal(prefix_a, prefix_b)
    assert torch.equal(chunk_a[:, :20], chunk_b[:, :20])
    assert not torch.equal(chunk_a[:, 20:], chunk_b[:, 20:])


# Gradients ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_reach_every_parameter(name):
    model = make_model(name).train()
    ids = random_ids(2, 100)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    names = {n for n, _ in model.named_parameters()}
    if name == "dense":
        assert not any("compress" in n or "attn.gate" in n for n in names)
    else:
        assert any("gate" in n for n in names)
        assert any("pos_emb" in n for n in names) == (model.config.cmp_fn == "mlp")
        assert any("k_proj.cmp" in n for n in names) == (model.config.kv_mode == "independent")
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_gradients_are_finite_when_no_compressed_token_exists():
    """Shorter than one compression window: the compressed branch is empty everywhere."""
    model = make_model("mlp-shared").train()
    logits = model(random_ids(2, 7))
    logits.logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname


# Decode against prefill --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp-shared", "mean-independent", "paper-blocks", "dense"])
def test_generate_logits_equal_prefill_logits(name):
    """Greedy decoding token by token, across many d, l, l' and window boundaries."""
    model = make_model(name)
    prompt = random_ids(2, 5 if name != "paper-blocks" else 50)
    steps = 70 if name != "paper-blocks" else 90  # paper blocks: crosses 64 and 128
    tokens, logits = model.generate(prompt, max_new_tokens=steps, stop_token=None, return_logits=True)
    assert tokens.shape == (2, steps) and logits.shape == (2, steps, 260)
    full = model(torch.cat([prompt, tokens], 1))
    torch.testing.assert_close(logits, full[:, prompt.shape[1] - 1: -1], **CLOSE)
    assert torch.equal(tokens, logits.argmax(-1))


@pytest.mark.parametrize("name", ["mlp-independent", "mean-shared", "paper-blocks"])
def test_chunked_prefill_equals_full_prefill(name):
    model = make_model(name)
    ids = random_ids(2, 150)
    cache = model.new_cache()
    pieces, start = [], 0
    for size in [7, 1, 13, 30, 2, 19, 1, 1, 40, 36]:
        pieces.append(model.step(ids[:, start:start + size], cache))
        start += size
    assert start == 150 and all(c.length == 150 for c in cache)
    torch.testing.assert_close(torch.cat(pieces, 1), model(ids), **CLOSE)


def test_compressed_cache_matches_recomputed_compression():
    """After decoding, the cache holds exactly the compressed tokens a full pass computes."""
    model = make_model("mlp-independent")
    ids = random_ids(1, 77)
    cache = model.new_cache()
    for t in range(77):
        model.step(ids[:, t:t + 1], cache)
    attn = model.layers[0].attn
    inputs = attn.inputs(model.layers[0].attn_norm(model.embed(ids)), torch.arange(77))
    assert cache[0].k_cmp.shape[1] == (77 - 8) // 4 + 1
    torch.testing.assert_close(cache[0].k_cmp, inputs.k_cmp, **CLOSE)
    torch.testing.assert_close(cache[0].v_cmp, inputs.v_cmp, **CLOSE)
    assert cache[0].staging_k.shape[1] < 8  # only what the next window still reads


# RoPE and parameter layout -----------------------------------------------------------------------


def test_rope_scores_depend_only_on_the_relative_position():
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def at(x, position):
        return apply_rope(x, torch.tensor([position]), 10000.0)

    assert torch.allclose((at(q, 7) * at(k, 3)).sum(), (at(q, 104) * at(k, 100)).sum(), atol=1e-5)
    assert torch.allclose(at(q, 7).norm(), q.norm(), atol=1e-6)
    assert torch.equal(at(q, 0), q)


def test_compressed_keys_are_rotated_at_their_window_start():
    """phi reads un-rotated keys; compressed key i is then rotated at position i*d (design.md)."""
    attn = make_model("mlp-shared").layers[0].attn
    x = torch.randn(1, 40, 32)
    with torch.no_grad():
        inputs = attn.inputs(x, torch.arange(40))
        k_raw = attn.k_proj["shared"](x).unflatten(-1, (2, 8))  # [1, 40, H, Dk] un-rotated
        k_cmp = attn.k_compress(k_raw)  # [1, 9, H, Dk]
        expected = apply_rope(k_cmp, torch.arange(9) * 4, TINY.rope_theta)
    torch.testing.assert_close(inputs.k_cmp, expected, rtol=0, atol=0)
    torch.testing.assert_close(inputs.v_cmp, attn.v_compress(attn.v_proj["shared"](x).unflatten(-1, (2, 6))))


def test_dense_twin_has_the_nsa_parameters_minus_the_nsa_only_ones():
    nsa = set(make_model("mlp-shared").state_dict())
    dense = set(make_model("dense").state_dict())
    nsa_only = {n for n in nsa if ".k_compress." in n or ".v_compress." in n or ".attn.gate." in n}
    assert nsa_only and dense == nsa - nsa_only


def test_attention_inputs_are_what_the_forward_pass_uses():
    """model.attention_inputs (the app's on-demand analyses) returns exactly the layer's forward inputs."""
    model = make_model("mlp-independent")
    ids = random_ids(1, 70)
    with torch.no_grad():
        x = model.embed(ids)
        for block in model.layers[:1]:
            x, _ = block(x, ops=reference)
        _, (inputs, parts) = model.layers[1].attn(model.layers[1].attn_norm(x), ops=reference, return_parts=True)
        on_demand = model.attention_inputs(ids, 1)
    for name in ("q", "k", "v", "k_win", "v_win", "k_cmp", "v_cmp", "gates"):
        assert torch.equal(getattr(inputs, name), getattr(on_demand, name)), name


def test_sampling_with_top_k_one_is_greedy_and_generation_stops_at_the_stop_token():
    model = make_model("mlp-shared")
    prompt = random_ids(2, 9)
    greedy = model.generate(prompt, max_new_tokens=12, stop_token=None)
    sampled = model.generate(prompt, max_new_tokens=12, stop_token=None, temperature=0.8, top_k=1,
                             generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy, sampled)
    # Generation ends once every row has produced the stop token (here row 0's fifth token), or at the limit.
    stop = int(greedy[0, 4])
    stopped = model.generate(prompt, max_new_tokens=12, stop_token=stop)
    first_stop = [int((row == stop).nonzero()[0]) if (row == stop).any() else 12 for row in greedy]
    assert stopped.shape[1] == min(max(first_stop) + 1, 12)
    assert torch.equal(stopped, greedy[:, : stopped.shape[1]])


def test_with_selection_scores_shares_the_weights_and_changes_only_the_rule():
    model = make_model("paper-blocks").requires_grad_(False)
    free = model.with_selection_scores("free")
    assert model.config.slc_scores == "paper" and free.config == model.config.replace(slc_scores="free")
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(model.parameters(), free.parameters(), strict=True))
    assert not any(p.requires_grad for p in free.parameters()) and not free.training
    # The same as a model built under that rule and given those weights.
    built = NSALM(model.config.replace(slc_scores="free")).eval()
    built.load_state_dict(model.state_dict())
    ids = random_ids(1, 320)
    torch.testing.assert_close(free(ids), built(ids), rtol=0, atol=0)
    # 320 tokens hold 5 blocks of 64, one more than top_n = 4 with 3 of them forced: the rules pick differently.
    assert not torch.equal(free(ids), model(ids))
