"""SwiGLU feed-forward: W2 · (silu(W1 x) ⊙ W3 x), no biases. Used for dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLU", "swiglu_reference"]


class SwiGLU(nn.Module):
    """`[..., D]` → `[..., D]` through a hidden width `hidden`.

    Gate (W1) and up (W3) projections are one fused `[2·hidden, D]` matrix: one matmul instead of two.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


def swiglu_reference(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Unfused form with weights `w1`, `w3` `[H, D]` and `w2` `[D, H]` (nn.Linear layout)."""
    g = x @ w1.T
    return (g * torch.sigmoid(g) * (x @ w3.T)) @ w2.T
