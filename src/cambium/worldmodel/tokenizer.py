"""Strate I: the FSQ tokenizer turning each patch of candles into one discrete code.

    bars [B, T, 5] → bar_features → patches [B, N, P, 5] → RevIN (per patch and channel) → SymLog
        → dilated causal CNN encoder → last step → linear → FSQ code [B, N, d] / index [B, N]
        → decoder (linear → [P, hidden] → dilated causal CNN → 1x1 conv) → reconstruction [B, N, P, 5]

RevIN removes each patch's own level and scale, so codes describe shape (the path of the bar relative to its range),
and the clock features of Strate II carry the scale. SymLog, sign(x)·log(1 + |x|), then compresses the normalised
fat tails so that a flash crash does not dominate the loss while keeping its sign and order. The reconstruction loss is
a Huber loss in that normalised SymLog space.

Legend: B batch, T bars, N patches, P bars per patch, C = 5 bar features, H hidden channels, d = len(fsq_levels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cambium.nn.fsq import FSQ, codebook_usage, perplexity
from cambium.worldmodel.config import TokenizerConfig
from cambium.worldmodel.features import N_BAR_FEATURES, bar_features, patch_bars

__all__ = ["FSQTokenizer", "TokenizerOutput", "revin", "symexp", "symlog"]


def symlog(x: Tensor) -> Tensor:
    """sign(x) · log(1 + |x|): identity near 0, logarithmic in the tails, odd and monotone."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(y: Tensor) -> Tensor:
    """Inverse of `symlog`."""
    return torch.sign(y) * torch.expm1(y.abs())


def revin(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-window normalisation over dim -2: x [..., P, C] -> ((x - mean) / std, mean [..., 1, C], std [..., 1, C])."""
    mean = x.mean(dim=-2, keepdim=True)
    std = torch.sqrt(x.var(dim=-2, keepdim=True, unbiased=False) + eps)
    return (x - mean) / std, mean, std


class _CausalConv(nn.Conv1d):
    """Conv1d [M, H, L] -> [M, H, L] padded on the left only: output t sees inputs <= t."""

    def forward(self, x: Tensor) -> Tensor:
        left = (self.kernel_size[0] - 1) * self.dilation[0]
        return super().forward(F.pad(x, (left, 0)))


class _DilatedStack(nn.Module):
    """n residual layers GELU(causal conv, dilation base**i) → 1x1 conv; [M, H, L] -> [M, H, L]."""

    def __init__(self, hidden: int, n_layers: int, kernel_size: int, dilation_base: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            _CausalConv(hidden, hidden, kernel_size, dilation=dilation_base**i) for i in range(n_layers)
        )
        self.mixes = nn.ModuleList(nn.Conv1d(hidden, hidden, 1) for _ in range(n_layers))

    def forward(self, x: Tensor) -> Tensor:
        for conv, mix in zip(self.convs, self.mixes, strict=True):
            x = x + mix(F.gelu(conv(x)))
        return x


@dataclass
class TokenizerOutput:
    """loss (scalar), recon and target [B, N, P, C] (normalised SymLog space), codes [B, N, d], indices [B, N]."""

    loss: Tensor
    recon: Tensor
    target: Tensor
    codes: Tensor
    indices: Tensor


class FSQTokenizer(nn.Module):
    """Strate I model. forward(ohlcv [B, T, 5]) -> TokenizerOutput; tokenize(ohlcv) -> indices [B, N]."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, p, c = cfg.hidden_channels, cfg.patch_length, N_BAR_FEATURES
        self.fsq = FSQ(cfg.fsq_levels)
        d = self.fsq.dim
        self.enc_in = nn.Conv1d(c, h, 1)
        self.enc = _DilatedStack(h, cfg.n_layers, cfg.kernel_size, cfg.dilation_base)
        self.enc_out = nn.Linear(h, d)
        self.dec_in = nn.Linear(d, h * p)
        self.dec = _DilatedStack(h, cfg.n_layers, cfg.kernel_size, cfg.dilation_base)
        self.dec_out = nn.Conv1d(h, c, 1)

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    def normalise(self, ohlcv: Tensor) -> Tensor:
        """ohlcv [B, T, 5] -> patches [B, N, P, C] after RevIN and SymLog (the space codes are learned in)."""
        patches, _ = patch_bars(bar_features(ohlcv), self.cfg.patch_length)
        normed, _, _ = revin(patches, self.cfg.revin_eps)
        return symlog(normed)

    def encode_patches(self, x: Tensor) -> Tensor:
        """x [M, P, C] -> pre-quantisation latents [M, d] (the last step of the causal stack sees the whole patch)."""
        hid = self.enc(self.enc_in(x.transpose(1, 2)))
        return self.enc_out(hid[..., -1])

    def decode_codes(self, codes: Tensor) -> Tensor:
        """codes [M, d] -> reconstructed patches [M, P, C] in normalised SymLog space."""
        hid = self.dec_in(codes).view(codes.shape[0], self.cfg.hidden_channels, self.cfg.patch_length)
        return self.dec_out(self.dec(hid)).transpose(1, 2)

    def forward(self, ohlcv: Tensor) -> TokenizerOutput:
        target = self.normalise(ohlcv)
        b, n, p, c = target.shape
        codes, indices = self.fsq(self.encode_patches(target.reshape(b * n, p, c)))
        recon = self.decode_codes(codes).reshape(b, n, p, c)
        loss = F.huber_loss(recon, target, delta=self.cfg.huber_delta)
        return TokenizerOutput(loss, recon, target, codes.reshape(b, n, -1), indices.reshape(b, n))

    @torch.no_grad()
    def tokenize(self, ohlcv: Tensor) -> Tensor:
        """ohlcv [B, T, 5] -> code indices [B, N] int64 (N = T // patch_length, the latest patches)."""
        x = self.normalise(ohlcv)
        b, n, p, c = x.shape
        _, indices = self.fsq(self.encode_patches(x.reshape(b * n, p, c)))
        return indices.reshape(b, n)

    @torch.no_grad()
    def code_stats(self, indices: Tensor) -> dict[str, float]:
        """Codebook usage (fraction of codes seen) and perplexity of `indices` [...]."""
        return {
            "codebook_usage": codebook_usage(indices, self.codebook_size),
            "perplexity": perplexity(indices, self.codebook_size),
        }
