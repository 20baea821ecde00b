"""A short live benchmark for the Performance page: NSA attention against dense causal attention.

Random inputs at the loaded model's attention shape (HQ query heads, H KV heads, head dims) for each
context length; the NSA side is the functional API of the backend the model runs on (the Triton
kernels on a GPU), the dense side PyTorch's `scaled_dot_product_attention` (FlashAttention on a
GPU). Times are medians of a few calls after a warm-up, synchronised on CUDA. No Streamlit here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import torch
from torch.nn import functional as F

from nsa_core import masks
from nsa_core.config import NSAConfig


@dataclass(frozen=True)
class BenchRow:
    length: int
    nsa_ms: float
    dense_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.nsa_ms


def _median_ms(fn: Callable[[], object], *, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def run(
    ops: ModuleType,
    config: NSAConfig,
    lengths: list[int],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[BenchRow]:
    """Time one NSA attention call (ops.nsa_attention) and one dense causal call per length."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    HQ, H, Dk, Dv = config.n_head, config.n_kv_head, config.head_dim, config.v_head_dim
    rows = []

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    for i, T in enumerate(lengths):
        q, k, v = rand(1, T, HQ, Dk), rand(1, T, H, Dk), rand(1, T, H, Dv)
        Tc = masks.num_compressed(T, config.cmp_block, config.cmp_stride)
        k_cmp, v_cmp = rand(1, Tc, H, Dk), rand(1, Tc, H, Dv)
        gates = torch.sigmoid(rand(1, T, HQ, 3))
        nsa = partial(ops.nsa_attention, q, k, v, k_cmp, v_cmp, gates, config=config)
        dense = partial(
            F.scaled_dot_product_attention,
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=True,
        )
        nsa_ms = _median_ms(nsa, device=device, repeats=repeats, warmup=warmup)
        dense_ms = _median_ms(dense, device=device, repeats=repeats, warmup=warmup)
        rows.append(BenchRow(T, nsa_ms, dense_ms))
        if progress is not None:
            progress(i + 1, len(lengths))
    return rows
