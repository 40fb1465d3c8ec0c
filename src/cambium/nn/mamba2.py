"""The Mamba-2 block (Dao & Gu, 2024) with an exogenous clock on its step size.

Mixer, per layer: in-projection to (z, x, B, C, dt) → short depthwise causal conv + SiLU on (x, B, C) → SSD scan
with one scalar decay A_h per head (`cambium.nn.ssd`) plus a D skip → gate by SiLU(z) → RMSNorm → out-projection.

Exo-clock: optional features `clock` [B, L, F] (realised volatility, calendar, ...) shift each head's step size before
the softplus, ``dt = softplus(dt_raw + dt_bias + dt_max_delta · tanh(W · clock))``. The tanh bounds the shift to
±dt_max_delta whatever the features do, so a volatility spike can speed the clock up (forget faster) or slow it down
but never blow the recurrence up; W starts at zero so the clock is neutral until it learns.

The mixer carries a `Mamba2State` (last conv inputs and the SSM state) so that a sequence processed in pieces gives
the same outputs as processed at once.

Legend: b batch, l length, d d_model, e d_inner = expand · d_model, h heads, p head dim = e / h, g groups, n state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cambium.core.errors import ConfigError
from cambium.nn.ssd import ssd_chunked, ssd_sequential

__all__ = ["Mamba2Block", "Mamba2Mixer", "Mamba2State", "bounded_dt_shift"]


def bounded_dt_shift(raw: Tensor, dt_max_delta: float) -> Tensor:
    """The exo-clock shift of dt before softplus: dt_max_delta · tanh(raw), in [-dt_max_delta, dt_max_delta]."""
    return dt_max_delta * torch.tanh(raw)


@dataclass
class Mamba2State:
    """Recurrent state of one mixer: conv [b, conv_dim, d_conv - 1] (last conv inputs), ssm [b, h, p, n] (fp32)."""

    conv: Tensor
    ssm: Tensor


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer. forward(u [b, l, d], clock [b, l, F] | None, state | None) -> (y [b, l, d], Mamba2State)."""

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 64,
        n_heads: int = 8,
        expand: int = 2,
        d_conv: int = 4,
        n_groups: int = 1,
        chunk_size: int = 64,
        clock_dim: int = 0,
        dt_max_delta: float = 2.0,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        a_init_range: tuple[float, float] = (1.0, 16.0),
        norm_eps: float = 1e-5,
        scan: Literal["chunked", "sequential"] = "chunked",
    ) -> None:
        super().__init__()
        d_inner = expand * d_model
        if d_inner % n_heads:
            raise ConfigError(f"d_inner = expand*d_model = {d_inner} must be divisible by n_heads={n_heads}")
        if n_heads % n_groups:
            raise ConfigError(f"n_heads={n_heads} must be divisible by n_groups={n_groups}")
        if dt_max_delta < 0:
            raise ConfigError(f"dt_max_delta={dt_max_delta} must be >= 0")
        if not 0 < dt_min <= dt_max:
            raise ConfigError(f"need 0 < dt_min={dt_min} <= dt_max={dt_max}")
        if scan not in ("chunked", "sequential"):
            raise ConfigError(f"scan={scan!r} must be 'chunked' or 'sequential'")
        self.d_model, self.d_inner, self.d_state = d_model, d_inner, d_state
        self.n_heads, self.head_dim, self.n_groups = n_heads, d_inner // n_heads, n_groups
        self.d_conv, self.chunk_size, self.scan = d_conv, chunk_size, scan
        self.clock_dim, self.dt_max_delta = clock_dim, dt_max_delta
        self.conv_dim = d_inner + 2 * n_groups * d_state

        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * n_groups * d_state + n_heads, bias=False)
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=True)
        self.clock_proj = nn.Linear(clock_dim, n_heads, bias=False) if clock_dim > 0 else None
        self.norm = nn.RMSNorm(d_inner, eps=norm_eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

        # Step sizes start log-uniform in [dt_min, dt_max]; dt_bias is their inverse softplus.
        dt = torch.exp(torch.rand(n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        lo, hi = a_init_range
        self.A_log = nn.Parameter(torch.log(torch.empty(n_heads).uniform_(lo, hi)))
        self.D = nn.Parameter(torch.ones(n_heads))
        if self.clock_proj is not None:
            nn.init.zeros_(self.clock_proj.weight)

    def dt(self, dt_raw: Tensor, clock: Tensor | None) -> Tensor:
        """Step sizes [b, l, h] from the projected dt_raw [b, l, h] and the clock features [b, l, F]."""
        pre = dt_raw.float() + self.dt_bias.float()
        if self.clock_proj is not None:
            if clock is None:
                raise ValueError(
                    f"this mixer has clock_dim={self.clock_dim}: pass clock features [b, l, {self.clock_dim}]"
                )
            if clock.shape[:-1] != dt_raw.shape[:-1] or clock.shape[-1] != self.clock_dim:
                raise ValueError(
                    f"clock must be [b, l, {self.clock_dim}] = {(*dt_raw.shape[:-1], self.clock_dim)}, "
                    f"got {tuple(clock.shape)}"
                )
            pre = pre + bounded_dt_shift(self.clock_proj(clock.to(self.clock_proj.weight.dtype)).float(),
                                         self.dt_max_delta)
        elif clock is not None:
            raise ValueError("clock features were passed to a mixer built with clock_dim=0")
        return F.softplus(pre)

    def initial_state(self, batch: int, device: torch.device | None = None) -> Mamba2State:
        """Zero state, as at the start of a sequence."""
        w = self.in_proj.weight
        return Mamba2State(
            conv=torch.zeros(batch, self.conv_dim, self.d_conv - 1, dtype=w.dtype, device=device or w.device),
            ssm=torch.zeros(batch, self.n_heads, self.head_dim, self.d_state, dtype=torch.float32,
                            device=device or w.device),
        )

    def forward(
        self, u: Tensor, clock: Tensor | None = None, state: Mamba2State | None = None
    ) -> tuple[Tensor, Mamba2State]:
        b, l, _ = u.shape
        if state is None:
            state = self.initial_state(b, u.device)
        zxbcdt = self.in_proj(u)
        z, xbc, dt_raw = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.n_heads], dim=-1)

        # Causal depthwise conv: the previous d_conv - 1 inputs (zeros at the start) are prepended.
        xbc_t = torch.cat([state.conv.to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)  # [b, conv_dim, d_conv - 1 + l]
        new_conv = xbc_t[..., xbc_t.shape[-1] - (self.d_conv - 1) :]
        xbc = F.silu(self.conv(xbc_t).transpose(1, 2))  # [b, l, conv_dim]
        x, B, C = torch.split(xbc, [self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        x = x.reshape(b, l, self.n_heads, self.head_dim)
        B = B.reshape(b, l, self.n_groups, self.d_state)
        C = C.reshape(b, l, self.n_groups, self.d_state)

        dt = self.dt(dt_raw, clock)
        A = -torch.exp(self.A_log.float())
        if self.scan == "chunked":
            y, ssm = ssd_chunked(x, dt, A, B, C, chunk_size=self.chunk_size, initial_state=state.ssm)
        else:
            y, ssm = ssd_sequential(x, dt, A, B, C, initial_state=state.ssm)
        y = y + x * self.D.to(x.dtype)[:, None]
        y = self.norm(y.reshape(b, l, self.d_inner) * F.silu(z))
        return self.out_proj(y), Mamba2State(conv=new_conv, ssm=ssm.float())


class Mamba2Block(nn.Module):
    """Pre-norm residual Mamba-2 layer: u + mixer(RMSNorm(u)). Same signature as `Mamba2Mixer`."""

    def __init__(self, d_model: int, *, norm_eps: float = 1e-5, **mixer_kwargs: object) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.mixer = Mamba2Mixer(d_model, norm_eps=norm_eps, **mixer_kwargs)  # type: ignore[arg-type]

    def forward(
        self, u: Tensor, clock: Tensor | None = None, state: Mamba2State | None = None
    ) -> tuple[Tensor, Mamba2State]:
        out, new_state = self.mixer(self.norm(u), clock, state)
        return u + out, new_state
