"""Rotary position embedding (RoPE) on [B, T, H, D] tensors at arbitrary absolute positions."""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., dim // 2] (float32) for integer positions [...]."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., dim/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, T, H, D] by position * theta^(-2i/D).

    positions is [T] (shared by the batch) or [B, T]; the math runs in float32 and returns x's dtype.
    """
    cos, sin = rope_angles(positions, x.shape[-1], theta)  # [(B,) T, D/2]
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B|1, T, 1, D/2]
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, H, D/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
