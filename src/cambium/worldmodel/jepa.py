"""Strate II: a JEPA world-model encoder over Strate I code sequences, with an exo-clock on the Mamba-2 step size.

    codes [B, N] → embedding [B, N, D] ─┬─ masked spans → mask token → context encoder (+ clock) → h [B, N, D]
                                        │                                        → predictor(h at masked t) → ẑ_t
                                        └─ full sequence → target encoder (EMA of the context encoder) → z [B, N, D]
    loss = inv_weight · MSE(ẑ_t, z_t) + var_weight · variance hinge + cov_weight · covariance penalty   (VICReg)

Both encoders are causal, so the prediction of a masked position t uses the visible codes before t only: the objective
is to predict the latent of a future span, a world model in latent space. At masked positions the context encoder
also loses the market part of the clock (realised volatility and volume surprises of the masked patch would give the
answer away); the calendar, known in advance, stays. The variance and covariance terms (computed in fp32) apply to the
predictions and to the context latents, keeping every dimension alive and decorrelated (no collapse).

`encode(candles)` is the public latent API: candles → tokenizer codes → target encoder → [B, N, D].
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

from cambium.nn.attention import Attention
from cambium.nn.mamba2 import Mamba2Block
from cambium.nn.memory import PRESETS, MemoryLayer
from cambium.nn.mlp import SwiGLU
from cambium.worldmodel.config import EMAConfig, EncoderConfig, JEPAConfig, MaskingConfig
from cambium.worldmodel.features import CLOCK_FEATURES, N_MARKET_CLOCK, CandleBatch, clock_features
from cambium.worldmodel.tokenizer import FSQTokenizer

__all__ = ["Backbone", "JEPAOutput", "WorldModelJEPA", "block_mask", "ema_momentum", "vicreg_terms"]


class _AttentionLayer(nn.Module):
    """Pre-norm causal attention + SwiGLU layer: [B, N, D] -> [B, N, D]."""

    def __init__(self, d_model: int, n_heads: int, max_seq_len: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.attn = Attention(d_model, n_heads, max_seq_len=max_seq_len)
        self.mlp = SwiGLU(d_model, 4 * d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _MemoryLayer(nn.Module):
    """Pre-norm test-time memory (`cambium.nn.memory.MemoryLayer`) + SwiGLU layer: [B, N, D] -> [B, N, D]. The memory
    is written and read token by token in order, so the layer is causal."""

    def __init__(self, d_model: int, n_heads: int, rule: str, chunk_size: int) -> None:
        super().__init__()
        cfg = PRESETS[rule](execution="chunkwise_exact", chunk_size=chunk_size) if rule == "delta" else PRESETS[rule]()
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.memory = MemoryLayer(d_model, n_heads, cfg)
        self.mlp = SwiGLU(d_model, 4 * d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.memory(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))


class Backbone(nn.Module):
    """Causal encoder stack. forward(x [B, N, D], clock [B, N, F] | None) -> [B, N, D].

    mamba2: the clock biases every layer's dt (bounded by ±dt_max_delta); attention and nested (a memory rule of
    `cambium.nn.memory` per layer): the clock is projected and added to the input (they have no step size to bias).
    """

    def __init__(self, cfg: EncoderConfig, clock_dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.kind = cfg.backbone
        self.clock_dim = clock_dim if cfg.exo_clock else 0
        self.layers = nn.ModuleList()
        self.clock_in: nn.Linear | None = None
        if cfg.backbone == "mamba2":
            for _ in range(cfg.n_layers):
                self.layers.append(Mamba2Block(
                    cfg.d_model, d_state=cfg.d_state, n_heads=cfg.n_heads, expand=cfg.expand, d_conv=cfg.d_conv,
                    chunk_size=cfg.chunk_size, clock_dim=self.clock_dim, dt_max_delta=cfg.dt_max_delta,
                    dt_min=cfg.dt_min, dt_max=cfg.dt_max,
                ))
        else:
            if cfg.backbone == "attention":
                # RoPE tables are sized generously: encode() may see longer windows than training did.
                rope_len = max(4 * max_seq_len, 4096)
                self.layers.extend(_AttentionLayer(cfg.d_model, cfg.n_heads, rope_len) for _ in range(cfg.n_layers))
            else:
                self.layers.extend(_MemoryLayer(cfg.d_model, cfg.n_heads, cfg.memory_rule, cfg.chunk_size)
                                   for _ in range(cfg.n_layers))
            if self.clock_dim:
                self.clock_in = nn.Linear(self.clock_dim, cfg.d_model)
        self.norm = nn.RMSNorm(cfg.d_model)

    def forward(self, x: Tensor, clock: Tensor | None) -> Tensor:
        if not self.clock_dim:
            clock = None
        elif clock is None:
            raise ValueError(f"this encoder uses the exo-clock: pass clock features [B, N, {self.clock_dim}]")
        if self.kind == "mamba2":
            for layer in self.layers:
                x, _ = layer(x, clock)
        else:
            if self.clock_in is not None and clock is not None:
                x = x + self.clock_in(clock)
            for layer in self.layers:
                x = layer(x)
        return self.norm(x)


def block_mask(batch: int, n: int, cfg: MaskingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask [batch, n] (True = masked) of contiguous blocks covering about mask_ratio of each row.

    Blocks have lengths in [block_size_min, block_size_max]; position 0 always stays visible so that every masked
    position has some context before it. Rows are masked until their share reaches mask_ratio.
    """
    mask = torch.zeros(batch, n, dtype=torch.bool)
    target = max(1, min(n - 1, round(cfg.mask_ratio * n)))
    for row in range(batch):
        while int(mask[row].sum()) < target:
            size = int(torch.randint(cfg.block_size_min, cfg.block_size_max + 1, (1,), generator=generator))
            start = int(torch.randint(1, n, (1,), generator=generator))
            mask[row, start : start + size] = True
            if int(mask[row].sum()) > target:
                # Trim the block just placed so that the row never exceeds its share.
                over = int(mask[row].sum()) - target
                end = min(n, start + size)
                mask[row, max(start, end - over) : end] = False
    return mask


def vicreg_terms(x: Tensor, gamma: float, eps: float) -> tuple[Tensor, Tensor]:
    """Variance hinge and covariance penalty of x [M, D], in fp32 whatever x's dtype.

    var = mean_d relu(gamma - sqrt(Var(x_d) + eps)); cov = sum of squared off-diagonal covariances / D.
    """
    x = x.float()
    m, d = x.shape
    centred = x - x.mean(dim=0)
    var = centred.pow(2).sum(dim=0) / max(m - 1, 1)
    var_loss = F.relu(gamma - torch.sqrt(var + eps)).mean()
    cov = centred.T @ centred / max(m - 1, 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return var_loss, off.pow(2).sum() / d


def _global_mse(pred: Tensor, tgt: Tensor) -> Tensor:
    """This rank's part of the MSE over every rank's rows, valued as the global MSE.

    The gradient is world·(local squared error)/(global count), so that DDP's mean over ranks gives the gradient of
    the global MSE exactly, whatever the number of masked rows on each rank."""
    world = dist.get_world_size()
    local = (pred - tgt).pow(2).sum()
    totals = torch.stack([local.detach(), torch.tensor(float(pred.numel()), device=pred.device)])
    dist.all_reduce(totals)
    part = local * world / totals[1]
    return part + (totals[0] / totals[1] - part).detach()


def _gather_rows(x: Tensor) -> Tensor:
    """Rows [M_r, D] of every rank, concatenated in rank order, with gradients (rank counts may differ)."""
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(c) for c in counts]
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0]))
    parts = dist_nn.all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def ema_momentum(step: int, total: int, cfg: EMAConfig) -> float:
    """Target-encoder momentum at `step` of `total`: a half cosine from tau_start to tau_end."""
    p = min(max(step / max(total, 1), 0.0), 1.0)
    return cfg.tau_end - (cfg.tau_end - cfg.tau_start) * (1 + math.cos(math.pi * p)) / 2


@dataclass
class JEPAOutput:
    """Scalar losses, predictions ẑ [M, D] and targets z [M, D] at the M masked positions, context h [B, N, D]."""

    loss: Tensor
    invariance: Tensor
    variance: Tensor
    covariance: Tensor
    pred: Tensor
    target: Tensor
    context: Tensor


class WorldModelJEPA(nn.Module):
    """Strate II model over a frozen Strate I tokenizer.

    forward(indices [B, N], clock [B, N, F], mask [B, N]) -> JEPAOutput; encode(candles) -> latents [B, N, D].
    """

    def __init__(self, cfg: JEPAConfig, tokenizer: FSQTokenizer) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.encoder.d_model
        self.tokenizer = tokenizer.requires_grad_(False).eval()
        self.clock_dim = len(CLOCK_FEATURES)
        self.embed = nn.Embedding(tokenizer.codebook_size, d)
        self.mask_token = nn.Parameter(torch.randn(d) * 0.02)
        self.context_encoder = Backbone(cfg.encoder, self.clock_dim, cfg.seq_len)
        self.target_encoder = copy.deepcopy(self.context_encoder).requires_grad_(False)
        layers: list[nn.Module] = []
        width = d
        for _ in range(cfg.predictor.n_layers):
            layers += [nn.Linear(width, cfg.predictor.hidden_dim), nn.GELU(), nn.Dropout(cfg.predictor.dropout)]
            width = cfg.predictor.hidden_dim
        layers.append(nn.Linear(width, d))
        self.predictor = nn.Sequential(*layers)
        # Set by data-parallel training: the batch is split over ranks, and the loss is made the global batch's.
        self.data_parallel = False

    def train(self, mode: bool = True) -> WorldModelJEPA:
        super().train(mode)
        self.tokenizer.eval()  # frozen: Strate I is trained first and never updated here
        return self

    def forward(self, indices: Tensor, clock: Tensor, mask: Tensor) -> JEPAOutput:
        v = self.cfg.vicreg
        x = self.embed(indices)
        ctx_in = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        ctx_clock = clock.clone()
        ctx_clock[..., :N_MARKET_CLOCK] = ctx_clock[..., :N_MARKET_CLOCK].masked_fill(mask.unsqueeze(-1), 0.0)
        h = self.context_encoder(ctx_in, ctx_clock)
        with torch.no_grad():
            z = self.target_encoder(x.detach(), clock)
        pred = self.predictor(h[mask])
        tgt = z[mask]
        flat_h = h.reshape(-1, h.shape[-1])
        if self.data_parallel and dist.is_initialized() and dist.get_world_size() > 1:
            inv = _global_mse(pred.float(), tgt.float())
            pred, flat_h = _gather_rows(pred), _gather_rows(flat_h)
        else:
            inv = F.mse_loss(pred.float(), tgt.float())
        var_p, cov_p = vicreg_terms(pred, v.var_gamma, v.eps)
        var_h, cov_h = vicreg_terms(flat_h, v.var_gamma, v.eps)
        var, cov = (var_p + var_h) / 2, (cov_p + cov_h) / 2
        loss = v.inv_weight * inv + v.var_weight * var + v.cov_weight * cov
        return JEPAOutput(loss, inv, var, cov, pred, tgt, h)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """target ← tau · target + (1 - tau) · context, parameter by parameter."""
        for t, c in zip(self.target_encoder.parameters(), self.context_encoder.parameters(), strict=True):
            t.lerp_(c.detach(), 1.0 - tau)

    @torch.no_grad()
    def encode_codes(self, indices: Tensor, clock: Tensor) -> Tensor:
        """indices [B, N], clock [B, N, F] -> latents [B, N, D] from the target encoder (causal in N)."""
        return self.target_encoder(self.embed(indices), clock)

    @torch.no_grad()
    def encode(self, candles: CandleBatch) -> Tensor:
        """Candles (ohlcv [B, T, 5], open times [B, T]) -> latents [B, N, D], N = T // patch_length.

        Latent t depends on the bars up to the end of patch t only.
        """
        patch = self.tokenizer.cfg.patch_length
        indices = self.tokenizer.tokenize(candles.ohlcv)
        clock = clock_features(candles, patch).to(self.embed.weight.dtype)
        return self.encode_codes(indices, clock)
