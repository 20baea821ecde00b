"""Triton forward kernels for NSA, with the keyword-only signatures of nsa_core.reference.

One module per stage: compressed.py (compressed branch + lse), select.py (fused scoring and top-n),
selected.py (selected-block attention), window.py (sliding window, optionally fused with the gated
sum), nsa.py (the whole layer); interval_attention.py holds the kernel the compressed and window
branches share. `supports` says whether a model configuration runs here, and why not.
"""

from __future__ import annotations

import torch

from .common import MAX_GROUP, MAX_HEAD_DIM, SUPPORTED_DTYPES
from .compressed import compressed_attention
from .nsa import nsa_attention
from .select import select_blocks
from .selected import selected_attention
from .window import window_attention

__all__ = [
    "compressed_attention",
    "nsa_attention",
    "select_blocks",
    "selected_attention",
    "supports",
    "window_attention",
]


def supports(config, *, device, dtype) -> tuple[bool, str]:
    """(ok, reason): whether the kernels run this NSAConfig on device in dtype; reason says why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the kernels need a CUDA device, this is {device.type}"
    if dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {dtype} is not supported (use bfloat16, float16 or float32)"
    if getattr(config, "attention", "nsa") != "nsa":
        return False, f"attention={config.attention!r} has no NSA layer to run"
    group = config.n_head // config.n_kv_head
    if group > MAX_GROUP:
        return False, f"group size {group} exceeds {MAX_GROUP}"
    if max(config.head_dim, config.v_head_dim) > MAX_HEAD_DIM:
        return False, f"head dims ({config.head_dim}, {config.v_head_dim}) exceed {MAX_HEAD_DIM}"
    if config.cmp_block - config.cmp_stride > config.slc_block:
        return False, (f"l - d ({config.cmp_block} - {config.cmp_stride}) exceeds l' ({config.slc_block}): "
                       "a compressed token would overlap more than two selection blocks")
    if config.top_n > 256:
        return False, f"top_n ({config.top_n}) exceeds 256"
    return True, f"G={group}, head dims {config.head_dim}/{config.v_head_dim}, {dtype} on {device}"
