"""Host-side helpers shared by the kernel wrappers: argument checks, query positions, launch sizes.

Nothing here launches a kernel. The checks raise ValueError (bad shapes) or RuntimeError (a caller
that needs gradients) with a message that names the offending argument, before any launch.
"""

from __future__ import annotations

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

# log2(e): the kernels use exp2, so scores are pre-multiplied by scale * LOG2E.
LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_GROUP = 64


def forward_only(*tensors: torch.Tensor) -> None:
    """Refuse inputs that require grad: these kernels have no backward and would silently cut the graph."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            "the Triton NSA kernels are forward-only: an input requires grad. Run under torch.no_grad(), "
            "or use backend='reference' (nsa_core.reference), which is differentiable."
        )


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k_name: str = "k", v_name: str = "v") -> int:
    """Validate q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv]; return G = HQ // H."""
    for name, x in (("q", q), (k_name, k), (v_name, v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    B, _, HQ, DK = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, {k_name} {k.shape[0]}, {v_name} {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"{k_name} {tuple(k.shape)} and {v_name} {tuple(v.shape)} must share [B, T, H]")
    if k.shape[3] != DK:
        raise ValueError(f"q head dim {DK} differs from {k_name} head dim {k.shape[3]}")
    H = k.shape[2]
    if H == 0 or HQ % H:
        raise ValueError(f"query heads ({HQ}) must be a multiple of KV heads ({H})")
    G = HQ // H
    if G > MAX_GROUP:
        raise ValueError(f"group size G = {G} exceeds the kernels' limit of {MAX_GROUP}")
    if max(DK, v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims ({DK}, {v.shape[3]}) exceed the kernels' limit of {MAX_HEAD_DIM}")
    return G


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/time/head strides but need unit stride along the head dim."""
    return x if x.stride(-1) == 1 else x.contiguous()


def query_starts(q_start, batch: int, default: int, device: torch.device) -> torch.Tensor:
    """Absolute position of each batch row's first query as an int64 [B] tensor on device."""
    if q_start is None:
        q_start = default
    if isinstance(q_start, torch.Tensor):
        if q_start.shape != (batch,):
            raise ValueError(f"q_start must be an int or a [B={batch}] tensor, got shape {tuple(q_start.shape)}")
        if q_start.is_floating_point():
            raise ValueError(f"q_start must hold integers, got {q_start.dtype}")
        return q_start.to(device=device, dtype=torch.int64).contiguous()
    q_start = int(q_start)
    if q_start < 0:
        raise ValueError(f"q_start must be >= 0, got {q_start}")
    return torch.full((batch,), q_start, dtype=torch.int64, device=device)


def pow2(x: int, minimum: int = 1) -> int:
    return max(triton.next_power_of_2(max(int(x), 1)), minimum)


def resolve_scale(q: torch.Tensor, scale) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact fp32 products (tf32 would cost about 1e-3 relative); 16-bit ones the fast path."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Key splits (flash-decoding): when a launch has too few programs to fill the GPU (decode, short chunks
# of queries over a long cache), each row tile's keys are shared out among this many programs at most,
# each keeping at least MIN_TILES_PER_SPLIT key tiles so that its loads still pipeline.
MAX_KEY_SPLITS = 16
MIN_TILES_PER_SPLIT = 4


def key_splits(programs: int, tiles: int, device: torch.device, splits: int | None = None) -> int:
    """Programs per row tile: enough that programs * splits fills every SM about twice.

    programs: the launch's programs without splits; tiles: key tiles of its longest row tile.
    splits: a forced count (tests), clamped to [1, tiles]. The interpreter gets 1 unless forced.
    """
    if splits is not None:
        return max(1, min(int(splits), tiles))
    if device.type != "cuda" or programs <= 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, programs)
    return max(1, min(want, tiles // MIN_TILES_PER_SPLIT, MAX_KEY_SPLITS))


def tile_descriptors(block_n: int, *tensors: torch.Tensor):
    """Tensor descriptors (TMA on Hopper) of [block_n, D] key tiles of each [B, T, H, D] tensor, or None where
    a tile cannot go through one: a GPU without TMA (compute capability below 9, where Triton would emulate
    the descriptors: the kernels keep their pointer loads there), an empty tensor (a descriptor's sizes must
    be non-zero: a prompt shorter than one compressed block has no compressed tokens), a head dim that is
    not a power of two from 16 (its tile would be padded), or a stride or base address that is not 16-byte
    aligned. Rows past T read as zeros. Under the interpreter (CPU) they are built too, so that the tests
    cover the descriptor path."""
    device = tensors[0].device
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return None
    for x in tensors:
        size = x.element_size()
        if x.numel() == 0 or x.shape[3] != pow2(x.shape[3], 16):
            return None
        if x.data_ptr() % 16 or any(st * size % 16 for st in x.stride()[:-1]):
            return None
    return tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), [1, block_n, 1, x.shape[3]]) for x in tensors)
