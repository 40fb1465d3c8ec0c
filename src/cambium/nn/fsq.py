"""Finite Scalar Quantization (Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple", ICLR 2024).

Each of the d channels of a latent is squashed to a bounded interval and rounded to one of `levels[i]` values, so the
codebook is implicit: prod(levels) codes, no embedding table, no commitment loss, no dead codes to revive.

Level handling follows the paper: a channel with L levels is bounded by
``tanh(z + shift) * half_l - offset`` with ``half_l = (L - 1)(1 + eps) / 2``; for even L, ``offset = 0.5`` and
``shift = atanh(offset / half_l)`` so that rounding yields exactly L integers ({-L/2, ..., L/2 - 1}) and z = 0 maps to
the centre of the range. For odd L the integers are {-(L-1)/2, ..., (L-1)/2}. Codes are the rounded integers divided by
``L // 2``, so they lie in [-1, 1]. Rounding uses a straight-through estimator (identity gradient).

Indices are mixed-radix numbers over the per-channel digits ``code * (L // 2) + L // 2`` in {0, ..., L - 1}, first
channel least significant; `codes_to_indices` and `indices_to_codes` are exact inverses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cambium.core.errors import ConfigError, DataError

__all__ = ["FSQ", "codebook_usage", "perplexity"]


class FSQ(nn.Module):
    """Finite scalar quantizer with `levels` per channel.

    forward(z [..., d]) -> (codes [..., d] in [-1, 1], indices [...] int64 in [0, prod(levels))).
    """

    _half_l: Tensor
    _offset: Tensor
    _shift: Tensor
    _half_width: Tensor
    _levels: Tensor
    _basis: Tensor

    def __init__(self, levels: Sequence[int], eps: float = 1e-3) -> None:
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or any(v < 2 for v in levels):
            raise ConfigError(f"FSQ levels={levels} must be a non-empty list of integers >= 2 (e.g. [8, 5, 5, 5])")
        if not 0.0 <= eps < 0.5:
            raise ConfigError(f"FSQ eps={eps} must be in [0, 0.5)")
        self.levels = tuple(levels)
        self.eps = eps
        lv = torch.tensor(levels, dtype=torch.float64)
        half_l = (lv - 1) * (1 + eps) / 2
        offset = torch.where(lv.remainder(2) == 0, 0.5, 0.0).to(torch.float64)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]], dtype=torch.int64), dim=0)
        self.register_buffer("_half_l", half_l.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half_l).float(), persistent=False)
        self.register_buffer("_half_width", (lv // 2).float(), persistent=False)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def dim(self) -> int:
        """Number of channels d a latent must have."""
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        """prod(levels): the number of distinct codes."""
        return math.prod(self.levels)

    def bound(self, z: Tensor) -> Tensor:
        """Squash z [..., d] so that rounding gives exactly `levels[i]` integers per channel (computed in fp32)."""
        zf = z.float()
        return torch.tanh(zf + self._shift) * self._half_l - self._offset

    def quantize(self, z: Tensor) -> Tensor:
        """z [..., d] -> codes [..., d] in [-1, 1] with a straight-through gradient through the rounding."""
        bounded = self.bound(z)
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        return (rounded / self._half_width).to(z.dtype)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ expects a last dimension of {self.dim} (levels={list(self.levels)}), got {z.shape}")
        codes = self.quantize(z)
        return codes, self.codes_to_indices(codes)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """codes [..., d] (values k / (L // 2)) -> indices [...] int64."""
        digits = torch.round(codes.float() * self._half_width + self._half_width).long()
        return (digits * self._basis).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices [...] int64 -> codes [..., d] float32; the exact inverse of `codes_to_indices`."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise DataError(
                f"FSQ indices must lie in [0, {self.codebook_size}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]; were they written with other levels?"
            )
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels
        return (digits.float() - self._half_width) / self._half_width

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, codebook_size={self.codebook_size}"


def codebook_usage(indices: Tensor, codebook_size: int) -> float:
    """Fraction of the `codebook_size` codes that occur at least once in `indices` [...]."""
    counts = torch.bincount(indices.reshape(-1).long(), minlength=codebook_size)
    return float((counts > 0).sum()) / codebook_size


def perplexity(indices: Tensor, codebook_size: int) -> float:
    """exp(entropy) of the empirical code distribution of `indices` [...]; equals codebook_size when uniform."""
    counts = torch.bincount(indices.reshape(-1).long(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp())
