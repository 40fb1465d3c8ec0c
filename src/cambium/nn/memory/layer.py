"""A memory layer: projections and gates (the outer loop) around any memory rule (the inner loop).

Legend: B batch, T tokens, D model width, H heads, E head width. `x [B, T, D]` → queries/keys/values `[B, H, T, E]`
(keys and queries L2-normalised), per-token gates `[B, H, T]`: α = σ(·) retain, η = σ(·) momentum,
θ = softplus(·) inner learning rate; the memory's starting weights are learned (one set per head). The memory rule
runs in fp32 whatever the autocast dtype; projections follow autocast.

`forward(x, state)` returns the output `[B, T, D]` and the final inner state, which a caller may pass to the next call
to carry context memory across segments (otherwise each call starts from the learned initial memory).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cambium.core.errors import ConfigError
from cambium.nn.memory import knobs
from cambium.nn.memory.config import MemoryConfig
from cambium.nn.memory.dispatch import memory_forward
from cambium.nn.memory.presets import titans_lmm
from cambium.nn.memory.rules import MemoryState, initial_state

__all__ = ["MemoryLayer", "TitansMemory"]


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class MemoryLayer(nn.Module):
    """`[B, T, D]` → `[B, T, D]` through a memory rule `cfg` with `heads` heads of width `head_dim` (default D/H)."""

    def __init__(self, dim: int, heads: int, cfg: MemoryConfig, head_dim: int | None = None,
                 init_theta: float = 0.01, init_alpha: float = 0.005, init_eta: float = 0.9, seed: int = 0) -> None:
        super().__init__()
        if head_dim is None:
            if heads < 1 or dim % heads:
                raise ConfigError(f"dim={dim} must be divisible by heads={heads} (or pass head_dim)")
            head_dim = dim // heads
        self.cfg, self.heads, self.head_dim = cfg, heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.gates = nn.Linear(dim, 3 * heads)
        self.out = nn.Linear(heads * head_dim, dim, bias=False)
        with torch.no_grad():
            self.gates.weight.mul_(0.1)
            bias = self.gates.bias.view(3, heads)
            bias[0].fill_(math.log(init_alpha / (1 - init_alpha)))
            bias[1].fill_(math.log(init_eta / (1 - init_eta)))
            bias[2].fill_(_inverse_softplus(init_theta))
        start = initial_state(cfg, 1, heads, head_dim, head_dim, generator=torch.Generator().manual_seed(seed))
        raw = [p[0] for p in start.params]
        if cfg.rule == "miras" and cfg.retention == "kl":
            raw = [p.log() for p in raw]
        self.init_memory = nn.ParameterList([nn.Parameter(p) for p in raw])

    def initial_memory(self, batch: int) -> MemoryState:
        """The learned starting memory, `[B, H, ...]` per parameter, mapped onto the retention's feasible set."""
        params = [p.float() for p in self.init_memory]
        if self.cfg.rule == "miras" and self.cfg.retention == "kl":
            params = [F.softmax(p, dim=-1) for p in params]
        elif self.cfg.rule == "miras" and self.cfg.retention == "sphere":
            params = [F.normalize(p, dim=-1) for p in params]
        expanded = tuple(p.unsqueeze(0).expand(batch, *p.shape) for p in params)
        opt: knobs.Params = ()
        if self.cfg.rule == "miras" and self.cfg.algorithm == "ftrl":
            opt = knobs.ftrl_dual(self.cfg, expanded)
        return MemoryState(expanded, opt)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x `[B, T, D]` → q, k (unit-normalised, fp32) and v, each `[B, H, T, E]`."""
        if x.dim() != 3:
            raise ConfigError(f"MemoryLayer input must be [B, T, D], got shape {tuple(x.shape)}")
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1), v

    def forward(self, x: torch.Tensor, state: MemoryState | None = None) -> tuple[torch.Tensor, MemoryState]:
        """x `[B, T, D]`, state from a previous call (or None) → (`[B, T, D]`, final state)."""
        q, k, v = self._qkv(x)
        b, t, _ = x.shape
        a_raw, e_raw, t_raw = self.gates(x).float().view(b, t, 3, self.heads).permute(2, 0, 3, 1)
        alpha, eta, theta = torch.sigmoid(a_raw), torch.sigmoid(e_raw), F.softplus(t_raw)
        o, final = memory_forward(self.cfg, q, k, v, theta, alpha, eta,
                                  state if state is not None else self.initial_memory(b))
        return self.out(o.to(x.dtype).transpose(1, 2).reshape(b, t, -1)), final

    def read(self, x: torch.Tensor, state: MemoryState | None = None) -> torch.Tensor:
        """Read the memory `state` (None: the learned initial memory) with the queries of x `[B, T, D]` and write
        nothing: every token reads the same memory → `[B, T, D]`. It is the rule run with zero inner learning rate,
        retention and momentum (θ = α = η = 0), whose step leaves every memory unchanged."""
        q, k, v = self._qkv(x)
        b, t, _ = x.shape
        zero = torch.zeros(b, self.heads, t, device=x.device)
        o, _ = memory_forward(self.cfg, q, k, v, zero, zero, zero,
                              state if state is not None else self.initial_memory(b))
        return self.out(o.to(x.dtype).transpose(1, 2).reshape(b, t, -1))


class TitansMemory(MemoryLayer):
    """Titans neural long-term memory: MLP memory, momentum, decay, run chunkwise with chunk-start gradients
    (execution='chunkwise_approx'; pass execution='recurrent' for the exact token-by-token form)."""

    def __init__(self, dim: int, heads: int, hidden_mult: float = 2.0, chunk_size: int = 64,
                 execution: str = "chunkwise_approx", **kwargs: float) -> None:
        cfg = titans_lmm(hidden_mult=hidden_mult, chunk_size=chunk_size, execution=execution)
        super().__init__(dim, heads, cfg, **kwargs)  # type: ignore[arg-type]
