"""RMSNorm: x / sqrt(mean(x²) + eps) · weight, computed in fp32 whatever the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "rms_norm_reference"]


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension. Input `[..., D]`, output the same shape and dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under bf16 autocast the reduction still runs in fp32: squaring bf16 activations loses the small ones.
        wide = torch.promote_types(x.dtype, torch.float32)
        out = F.rms_norm(x.to(wide), (x.shape[-1],), self.weight.to(wide), self.eps)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The formula written out, for tests: `[..., D]` → `[..., D]`."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)).to(x.dtype)
