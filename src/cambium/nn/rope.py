"""Rotary position embeddings (RoPE), "half-split" convention.

A head vector of width D is read as D/2 pairs (x[i], x[i + D/2]); pair i at position t is rotated by the angle
t · θ^(-2i/D). The half-split pairing (rather than interleaved neighbours) keeps the rotation two contiguous slices.
Tensors are `[B, T, H, D]` (batch, time, heads, head width).
"""

from __future__ import annotations

import torch
from torch import nn

from cambium.core.errors import ConfigError

__all__ = ["RotaryEmbedding", "apply_rope", "apply_rope_reference", "rope_angles"]


def rope_angles(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each `[max_seq_len, head_dim // 2]` in fp64 (cast at use)."""
    if head_dim % 2 != 0 or head_dim <= 0:
        raise ConfigError(f"RoPE head_dim={head_dim} must be a positive even number")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, T, H, D]` by `cos`/`sin` `[T, D/2]`; returns `[B, T, H, D]` in x's dtype."""
    half = x.shape[-1] // 2
    # Rotate in at least fp32: bf16 angles drift badly at long positions.
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :].to(xf.dtype), sin[:, None, :].to(xf.dtype)
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(x.dtype)


def apply_rope_reference(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as complex multiplication, one position at a time (slow, for tests). `[B, T, H, D]`."""
    _b, t, _h, d = x.shape
    half = d // 2
    out = torch.empty_like(x, dtype=torch.float64)
    for pos in range(t):
        freqs = torch.tensor([pos * theta ** (-2.0 * i / d) for i in range(half)], dtype=torch.float64)
        z = torch.complex(x[:, pos, :, :half].double(), x[:, pos, :, half:].double()) * torch.polar(
            torch.ones_like(freqs), freqs
        )
        out[:, pos, :, :half], out[:, pos, :, half:] = z.real, z.imag
    return out.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables (non-persistent buffers: rebuilt, never checkpointed) for one head width."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        cos, sin = rope_angles(head_dim, max_seq_len, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate `x` `[B, T, H, D]` whose first position is `offset`."""
        t = x.shape[1]
        if offset + t > self.max_seq_len:
            raise ConfigError(
                f"sequence of {offset + t} positions exceeds max_seq_len={self.max_seq_len}; raise max_seq_len"
            )
        return apply_rope(x, self.cos[offset : offset + t], self.sin[offset : offset + t])
