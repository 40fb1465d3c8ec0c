"""Host networks morph grows: a small CIFAR-10 CNN and a transformer block stack.

Neither is special to morph — `wrap` takes any nn.Module — but the demonstration and the tests need one of each.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cambium.core.errors import ConfigError

__all__ = ["HostCNN", "TransformerStack", "host_cnn_params", "widths_for_params"]


class HostCNN(nn.Module):
    """Conv stages (conv3×3 → BN → ReLU → 2×2 max-pool) then global pool and a linear head.

    x `[B, 3, 32, 32]` → logits `[B, num_classes]`. Stage i outputs `[B, widths[i], 32/2^(i+1), 32/2^(i+1)]`;
    the stages are named `stages.0`, `stages.1`, ... (natural seed locations).
    """

    def __init__(self, widths: tuple[int, ...] = (8, 16, 16), num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        stages = []
        c = in_channels
        for w in widths:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)
                )
            )
            c = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(x)
        return self.head(h.mean(dim=(2, 3)))


def host_cnn_params(widths: tuple[int, ...], num_classes: int = 10, in_channels: int = 3) -> int:
    """Parameter count of `HostCNN(widths, num_classes)` (conv 3×3 without bias, BN scale+shift, linear head)."""
    total, c = 0, in_channels
    for w in widths:
        total += c * w * 9 + 2 * w
        c = w
    return total + c * num_classes + num_classes


def widths_for_params(widths: tuple[int, ...], num_classes: int, min_params: int, *, step: float = 0.05,
                      max_mult: float = 64.0) -> tuple[tuple[int, ...], float]:
    """The smallest uniform widening of `widths` (multiplier 1, 1 + step, ...) whose HostCNN has >= `min_params`.

    Each stage gets `ceil(w · mult)` channels, so the stages keep their proportions. Returns (widths, multiplier).
    """
    if min_params <= host_cnn_params(widths, num_classes):
        return tuple(widths), 1.0
    k = 1
    while 1.0 + k * step <= max_mult:
        mult = 1.0 + k * step
        wide = tuple(math.ceil(w * mult - 1e-9) for w in widths)
        if host_cnn_params(wide, num_classes) >= min_params:
            return wide, round(mult, 6)
        k += 1
    raise ConfigError(
        f"no widening of widths={list(widths)} up to ×{max_mult} reaches {min_params} parameters; "
        "lower compare.param_ratio"
    )


class TransformerStack(nn.Module):
    """Token embedding, `depth` pre-norm encoder blocks (named `blocks.0` ...), and a linear head.

    tokens `[B, T]` (int64 < vocab) → logits `[B, T, vocab]`.
    """

    def __init__(self, vocab: int = 32, dim: int = 32, heads: int = 4, depth: int = 2, max_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))
