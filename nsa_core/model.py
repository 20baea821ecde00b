"""NSALM: a small byte-level language model with NSA in every layer, and its dense twin.

Pre-norm decoder: RMSNorm, attention (NSA or dense causal, GQA, RoPE), RMSNorm, SwiGLU MLP.
`attention="dense"` builds the full-attention twin: the same parameters minus the NSA-only ones
(compressors and gates). Generation keeps a KV cache in reference PyTorch whose logits equal the
full-prefill logits token by token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from . import backend as backends
from . import masks, reference, tokenizer
from .compression import Compressor
from .config import NSAConfig
from .rope import apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


@dataclass
class LayerCache:
    """Decode state of one attention layer (reference PyTorch, grows by concatenation).

    k/v: every past token's keys (rotated) and values, per branch name ("shared", or "slc" and "win");
    k_cmp/v_cmp: compressed tokens so far (k rotated at its window start i*d);
    staging_k/staging_v: the last l un-rotated keys/values phi reads when the next window completes.
    """

    k: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    k_cmp: torch.Tensor | None = None
    v_cmp: torch.Tensor | None = None
    staging_k: torch.Tensor | None = None
    staging_v: torch.Tensor | None = None
    length: int = 0


@dataclass
class AttentionInputs:
    """What one NSA layer feeds its attention: enough to recompute any branch or the dense map."""

    q: torch.Tensor  # [B, T, HQ, Dk] rotated
    k: torch.Tensor  # [B, T, H, Dk] selection keys, rotated
    v: torch.Tensor  # [B, T, H, Dv]
    k_win: torch.Tensor  # [B, T, H, Dk] window keys (k when K/V are shared)
    v_win: torch.Tensor  # [B, T, H, Dv]
    k_cmp: torch.Tensor  # [B, Tc, H, Dk] compressed keys, rotated at i*d
    v_cmp: torch.Tensor  # [B, Tc, H, Dv]
    gates: torch.Tensor  # [B, T, HQ, 3] (cmp, slc, win)


class Attention(nn.Module):
    """GQA attention of one layer: NSA (three branches + gates) or dense causal."""

    def __init__(self, config: NSAConfig) -> None:
        super().__init__()
        c = self.config = config
        self.is_nsa = c.attention == "nsa"
        self.q_proj = nn.Linear(c.d_model, c.n_head * c.head_dim, bias=False)
        # Paper section 3.3.3 gives each branch its own keys and values; every open peer shares one set.
        self.kv_names = ("cmp", "slc", "win") if self.is_nsa and c.kv_mode == "independent" else ("shared",)
        self.k_proj = nn.ModuleDict({n: nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
                                     for n in self.kv_names})
        self.v_proj = nn.ModuleDict({n: nn.Linear(c.d_model, c.n_kv_head * c.v_head_dim, bias=False)
                                     for n in self.kv_names})
        self.o_proj = nn.Linear(c.n_head * c.v_head_dim, c.d_model, bias=False)
        if self.is_nsa:
            common = {"kind": c.cmp_fn, "n_kv_head": c.n_kv_head, "cmp_block": c.cmp_block,
                      "cmp_stride": c.cmp_stride, "hidden": c.cmp_mlp_hidden}
            self.k_compress = Compressor(head_dim=c.head_dim, **common)
            self.v_compress = Compressor(head_dim=c.v_head_dim, **common)
            self.gate = nn.Linear(c.d_model, 3 * c.n_head)

    def _kv_name(self, branch: str) -> str:
        return branch if branch in self.kv_names else "shared"

    def _project(self, x: torch.Tensor, branch: str, positions: torch.Tensor, rotate: bool = True):
        """k [B, T, H, Dk] (rotated unless rotate=False) and v [B, T, H, Dv] of a branch or a K/V set name."""
        c = self.config
        name = self._kv_name(branch)
        k = self.k_proj[name](x).unflatten(-1, (c.n_kv_head, c.head_dim))  # [B, T, H, Dk]
        v = self.v_proj[name](x).unflatten(-1, (c.n_kv_head, c.v_head_dim))  # [B, T, H, Dv]
        return (apply_rope(k, positions, c.rope_theta) if rotate else k), v

    def compress(self, k_raw: torch.Tensor, v_raw: torch.Tensor, *, first: int = 0):
        """phi over un-rotated k/v [B, T, H, D] whose first window is compressed token `first`.

        Each compressed key is rotated at its window start i*d.
        """
        return self.compress_keys(k_raw, first=first), self.v_compress(v_raw)

    def compress_keys(self, k_raw: torch.Tensor, *, first: int = 0) -> torch.Tensor:
        """The compressed keys [B, Tc, H, Dk] of un-rotated k_raw [B, T, H, Dk], rotated at their window starts."""
        c = self.config
        k_cmp = self.k_compress(k_raw)  # [B, Tc, H, Dk]
        starts = (torch.arange(k_cmp.shape[1], device=k_raw.device) + first) * c.cmp_stride
        return apply_rope(k_cmp, starts, c.rope_theta)

    def inputs(self, x: torch.Tensor, positions: torch.Tensor) -> AttentionInputs:
        """Projections of x [B, T, d_model] at absolute positions [T] (a whole sequence from 0)."""
        c = self.config
        q = apply_rope(self.q_proj(x).unflatten(-1, (c.n_head, c.head_dim)), positions, c.rope_theta)
        k, v = self._project(x, "slc", positions)
        if not self.is_nsa:
            gates = x.new_zeros(*x.shape[:2], c.n_head, 3)
            empty = k.new_zeros(k.shape[0], 0, *k.shape[2:])
            return AttentionInputs(q, k, v, k, v, empty, v.new_zeros(v.shape[0], 0, *v.shape[2:]), gates)
        k_win, v_win = self._project(x, "win", positions) if "win" in self.kv_names else (k, v)
        k_raw, v_raw = self._project(x, "cmp", positions, rotate=False)
        k_cmp, v_cmp = self.compress(k_raw, v_raw)
        gates = torch.sigmoid(self.gate(x)).unflatten(-1, (c.n_head, 3))  # [B, T, HQ, 3]
        return AttentionInputs(q, k, v, k_win, v_win, k_cmp, v_cmp, gates)

    def forward(self, x: torch.Tensor, *, ops, return_parts: bool = False):
        """x [B, T, d_model] -> (y [B, T, d_model], None or (AttentionInputs, NSAParts) when return_parts)."""
        positions = torch.arange(x.shape[1], device=x.device)
        a = self.inputs(x, positions)
        if not self.is_nsa:
            o = F.scaled_dot_product_attention(a.q.transpose(1, 2), a.k.transpose(1, 2), a.v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True).transpose(1, 2)  # [B, T, HQ, Dv]
            return self.o_proj(o.flatten(2)), None
        parts = ops.nsa_attention(a.q, a.k, a.v, a.k_cmp, a.v_cmp, a.gates, config=self.config,
                                  k_win=a.k_win, v_win=a.v_win, return_parts=return_parts)
        if not return_parts:
            return self.o_proj(parts.flatten(2)), None
        return self.o_proj(parts.o.flatten(2)), (a, parts)

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """Cached forward of the next TQ tokens x [B, TQ, d_model] (prefill when the cache is empty)."""
        c = self.config
        start = cache.length
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        q = apply_rope(self.q_proj(x).unflatten(-1, (c.n_head, c.head_dim)), positions, c.rope_theta)
        branches = ("slc", "win") if self.is_nsa else ("slc",)
        for name in dict.fromkeys(self._kv_name(b) for b in branches):  # "shared" once, or "slc" and "win"
            k, v = self._project(x, name, positions)
            cache.k[name] = k if name not in cache.k else torch.cat([cache.k[name], k], 1)
            cache.v[name] = v if name not in cache.v else torch.cat([cache.v[name], v], 1)
        cache.length = start + x.shape[1]
        k, v = cache.k[self._kv_name("slc")], cache.v[self._kv_name("slc")]
        if not self.is_nsa:
            if start == 0:  # prefill: a fused causal kernel; the chunked reference makes O(T^2) memory passes
                # K/V expanded to every query head: the memory-efficient kernel takes float32 but not enable_gqa.
                kq, vq = (t.repeat_interleave(c.group_size, dim=2).transpose(1, 2) for t in (k, v))
                o = F.scaled_dot_product_attention(q.transpose(1, 2), kq, vq, is_causal=True).transpose(1, 2)
            else:
                o = reference.dense_attention(q, k, v, q_start=start)
            return self.o_proj(o.flatten(2))
        self._append_compressed(x, positions, cache)
        gates = torch.sigmoid(self.gate(x)).unflatten(-1, (c.n_head, 3))
        k_win, v_win = cache.k[self._kv_name("win")], cache.v[self._kv_name("win")]
        o = reference.nsa_attention(q, k, v, cache.k_cmp, cache.v_cmp, gates, config=c, q_start=start,
                                    k_win=k_win, v_win=v_win)
        return self.o_proj(o.flatten(2))

    def _append_compressed(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache) -> None:
        """Stage the new un-rotated k/v and compress every window the new tokens complete."""
        c = self.config
        k_raw, v_raw = self._project(x, "cmp", positions, rotate=False)
        staged_from = cache.length - x.shape[1] - (0 if cache.staging_k is None else cache.staging_k.shape[1])
        sk = k_raw if cache.staging_k is None else torch.cat([cache.staging_k, k_raw], 1)
        sv = v_raw if cache.staging_v is None else torch.cat([cache.staging_v, v_raw], 1)
        done = 0 if cache.k_cmp is None else cache.k_cmp.shape[1]
        total = masks.num_compressed(cache.length, c.cmp_block, c.cmp_stride)
        if total > done:
            # Windows done..total-1 start at i*d; the staging buffer begins at absolute position staged_from.
            lo = done * c.cmp_stride - staged_from
            hi = (total - 1) * c.cmp_stride + c.cmp_block - staged_from
            k_new, v_new = self.compress(sk[:, lo:hi], sv[:, lo:hi], first=done)
            cache.k_cmp = k_new if cache.k_cmp is None else torch.cat([cache.k_cmp, k_new], 1)
            cache.v_cmp = v_new if cache.v_cmp is None else torch.cat([cache.v_cmp, v_new], 1)
        elif cache.k_cmp is None:
            cache.k_cmp = k_raw.new_zeros(k_raw.shape[0], 0, *k_raw.shape[2:])
            cache.v_cmp = v_raw.new_zeros(v_raw.shape[0], 0, *v_raw.shape[2:])
        # Keep only what the next windows can still read: from the start of window `total` on.
        keep_from = total * c.cmp_stride - staged_from
        cache.staging_k, cache.staging_v = sk[:, keep_from:], sv[:, keep_from:]


class Block(nn.Module):
    def __init__(self, config: NSAConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden)

    def forward(self, x: torch.Tensor, *, ops, return_parts: bool = False):
        y, parts = self.attn(self.attn_norm(x), ops=ops, return_parts=return_parts)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), parts

    def step(self, x: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        x = x + self.attn.step(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class NSALM(nn.Module):
    """Byte-level causal LM; forward(ids [B, T]) -> logits [B, T, vocab] (float32)."""

    def __init__(self, config: NSAConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.backend = "reference"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2 style init: N(0, 0.02), residual outputs scaled by 1/sqrt(2 n_layer), gates at 0.5."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("gate.bias") or name.endswith(("b1", "b2", "pos_emb")):
                p.zero_()
            elif p.dim() >= 2 and "compress" not in name:
                residual_out = name.endswith(("o_proj.weight", "down.weight"))
                std = 0.02 / (2 * self.config.n_layer) ** 0.5 if residual_out else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "compress" in name and p.dim() == 3:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)

    def with_selection_scores(self, slc_scores: str) -> NSALM:
        """A model with these weights (shared, not copied) that ranks blocks by another rule
        (`NSAConfig.slc_scores`); self is left as it is. The rule is not part of what the weights mean."""
        with torch.device("meta"):
            other = NSALM(self.config.replace(slc_scores=slc_scores))
        other.load_state_dict(self.state_dict(), strict=True, assign=True)
        for mine, theirs in zip(self.parameters(), other.parameters(), strict=True):
            theirs.requires_grad_(mine.requires_grad)
        other.backend = self.backend
        return other.train(self.training)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def ops(self, backend: str | None = None):
        """(functional-API module, reason) this model runs its attention on."""
        return backends.resolve(backend or self.backend, self.config, device=self.device, dtype=self.dtype)

    def forward(self, ids: torch.Tensor, *, backend: str | None = None, trace: bool = False):
        """ids [B, T] -> logits [B, T, vocab] float32, or (logits, ModelTrace) when trace is on.

        Tracing records what attention did without changing a single output bit.
        """
        ops, _ = self.ops(backend)
        x = self.embed(ids)
        records = []
        for layer in self.layers:
            x, parts = layer(x, ops=ops, return_parts=trace and self.config.attention == "nsa")
            records.append(parts)
        logits = self.lm_head(self.norm(x)).float()
        if not trace:
            return logits
        from .trace import ModelTrace

        return logits, ModelTrace.from_parts(self.config, ids, records)

    @torch.no_grad()
    def attention_inputs(self, ids: torch.Tensor, layer: int, *, backend: str | None = None) -> AttentionInputs:
        """The q/k/v/compressed tokens/gates layer `layer` computes for ids [B, T] (for on-demand analyses)."""
        if not 0 <= layer < self.config.n_layer:
            raise IndexError(f"layer must be in 0..{self.config.n_layer - 1}, got {layer}")
        ops, _ = self.ops(backend)
        x = self.embed(ids)
        for block in self.layers[:layer]:
            x, _ = block(x, ops=ops)
        block = self.layers[layer]
        return block.attn.inputs(block.attn_norm(x), torch.arange(ids.shape[1], device=ids.device))

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.layers]

    @torch.no_grad()
    def step(self, ids: torch.Tensor, cache: list[LayerCache]) -> torch.Tensor:
        """Cached forward of the next tokens ids [B, TQ] -> logits [B, TQ, vocab] float32."""
        x = self.embed(ids)
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x = layer.step(x, layer_cache)
        return self.lm_head(self.norm(x)).float()

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 stop_token: int | None = tokenizer.EOS, generator: torch.Generator | None = None,
                 return_logits: bool = False):
        """Extend ids [B, T] by up to max_new_tokens tokens with a KV cache.

        temperature 0 is greedy decoding. Stops early once every row has produced stop_token.
        Returns the new tokens [B, <=max_new_tokens] (and their logits [B, n, vocab] when return_logits).
        """
        cache = self.new_cache()
        logits = self.step(ids, cache)[:, -1]
        new_tokens, new_logits = [], []
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            new_logits.append(logits)
            if temperature <= 0:
                token = logits.argmax(-1)
            else:
                scaled = logits / temperature
                if top_k is not None:
                    kth = scaled.topk(min(top_k, scaled.shape[-1]), -1).values[..., -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                token = torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)
            new_tokens.append(token)
            if stop_token is not None:
                finished |= token == stop_token
                if bool(finished.all()):
                    break
            logits = self.step(token[:, None], cache)[:, -1]
        tokens = torch.stack(new_tokens, 1) if new_tokens else ids.new_zeros(ids.shape[0], 0)
        if return_logits:
            return tokens, torch.stack(new_logits, 1)
        return tokens

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

