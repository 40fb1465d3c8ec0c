"""WM-3 building blocks: conditional flow matching with minibatch optimal-transport coupling, and ODE samplers.

Shapes: x [B, D] (a point of the flow's space: here a standardised latent future), cond [B, C] (the conditioning
context), t [B] in [0, 1].

Training (OT-CFM, Tong et al. 2024): noise x0 ~ N(0, I) is paired with the batch's targets x1 by the optimal transport
plan of the squared Euclidean cost, ‖x0_i − x1_j‖² (exact, `ot.emd`, for batches up to `exact_max_batch`; entropic
Sinkhorn above, on the cost divided by its maximum). Each source row i keeps its place and draws its partner j from row
i of the plan (the exact plan of two uniform batches of one size is a permutation, so the draw is that permutation);
the conditioning row moves with its target: (x0_i, x1_j, cond_j). A plan on the x cost alone biases the noise that each
context receives (noise near one context's targets ends up paired with that context, so x0 | cond is no longer
N(0, I) and conditional samples drawn from N(0, I) come out wrong: `tests/worldmodel/test_flow.py` shows it). So each
source row i also carries the context of batch row i, and the cost adds `cond_weight`·‖cond_i − cond_j‖²: large
weights keep pairs within (nearly) equal contexts, 0 is the plain minibatch OT of the marginal.
Then x_t = (1 − t)·x0 + t·x1 (+ σ·ε) and the velocity net regresses the straight-line velocity x1 − x0. OT pairs
cross less than random ones, so the learned field is straighter and a few ODE steps sample it well.

Sampling integrates dx/dt = v(x, t, cond) from t = 0 to 1 with a fixed step count: Euler (1 evaluation per step),
midpoint (2) or classical RK4 (4).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import ot
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cambium.core.errors import ConfigError

__all__ = ["SAMPLERS", "VelocityNet", "cfm_loss", "cfm_pairs", "integrate", "ot_couple", "ot_plan", "pair_cost",
           "sample_conditional"]

Sampler = Literal["euler", "midpoint", "rk4"]
SAMPLERS: tuple[Sampler, ...] = ("euler", "midpoint", "rk4")
Coupling = Literal["ot", "independent"]
# (x [B, D], t [B]) -> velocity [B, D]
VelocityFn = Callable[[Tensor, Tensor], Tensor]


def pair_cost(x0: Tensor, x1: Tensor) -> Tensor:
    """Squared Euclidean cost [B0, B1] between the rows of x0 [B0, D] and x1 [B1, D] (float64)."""
    a, b = x0.detach().double().flatten(1), x1.detach().double().flatten(1)
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2.0 * a @ b.T).clamp_min(0.0)


def ot_plan(x0: Tensor, x1: Tensor, *, exact_max_batch: int = 256, sinkhorn_reg: float = 0.05,
            cond: Tensor | None = None, cond_weight: float = 0.0) -> np.ndarray:
    """The OT plan [B0, B1] (float64, entries sum to 1) between two uniform batches for the squared Euclidean cost
    (plus cond_weight·‖cond_i − cond_j‖² when `cond` [B, C] is given: source row i carries context row i).

    Exact (network simplex, `ot.emd`) when max(B0, B1) <= exact_max_batch; otherwise log-domain Sinkhorn with
    regularisation `sinkhorn_reg` on the cost divided by its maximum."""
    cost_t = pair_cost(x0, x1)
    if cond is not None and cond_weight > 0:
        cost_t = cost_t + cond_weight * pair_cost(cond, cond)
    cost = cost_t.numpy()
    a, b = ot.unif(cost.shape[0]), ot.unif(cost.shape[1])
    if max(cost.shape) <= exact_max_batch:
        plan = ot.emd(a, b, cost)
    else:
        plan = ot.sinkhorn(a, b, cost / max(float(cost.max()), 1e-300), sinkhorn_reg, method="sinkhorn_log")
    plan = np.asarray(plan, dtype=np.float64)
    if not np.isfinite(plan).all() or plan.sum() < 1e-8:
        raise FloatingPointError(f"OT plan of a {cost.shape} batch is degenerate (sum {plan.sum():.3g}); raise "
                                 "flow.sinkhorn_reg or lower the batch below flow.exact_max_batch")
    return plan


def ot_couple(x0: Tensor, x1: Tensor, cond: Tensor, generator: torch.Generator, *, exact_max_batch: int = 256,
              sinkhorn_reg: float = 0.05, cond_weight: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(x0, x1[j], cond[j]): each source row i with a partner j drawn from row i of the OT plan; the context row
    travels with its target."""
    plan = torch.from_numpy(ot_plan(x0, x1, exact_max_batch=exact_max_batch, sinkhorn_reg=sinkhorn_reg, cond=cond,
                                    cond_weight=cond_weight))
    j = torch.multinomial(plan.clamp_min(0.0) + 1e-300, 1, generator=generator).squeeze(1).to(x1.device)
    return x0, x1[j], cond[j]


def _time_features(t: Tensor, n: int) -> Tensor:
    """Sinusoidal features [B, n] of t [B] in [0, 1] (frequencies 1 … 1000, geometric)."""
    half = n // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=t.device, dtype=t.dtype))
    arg = t[:, None] * freqs[None] * math.pi
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class _Block(nn.Module):
    def __init__(self, hidden: int, cond_hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(cond_hidden, 2 * hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.film(c).chunk(2, dim=-1)
        return h + self.fc2(F.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))


class VelocityNet(nn.Module):
    """v(x [B, D], t [B], cond [B, C]) -> [B, D]: a residual MLP on x whose blocks are modulated (FiLM) by an
    embedding of (t, cond)."""

    def __init__(self, dim: int, cond_dim: int, hidden: int = 256, n_layers: int = 3, time_dim: int = 32) -> None:
        super().__init__()
        self.dim, self.cond_dim, self.time_dim = dim, cond_dim, time_dim
        self.inp = nn.Linear(dim, hidden)
        self.embed = nn.Sequential(nn.Linear(time_dim + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                   nn.SiLU())
        self.blocks = nn.ModuleList(_Block(hidden, hidden) for _ in range(n_layers))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        c = self.embed(torch.cat([_time_features(t.to(x.dtype), self.time_dim), cond], dim=-1))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(self.out_norm(h))


def cfm_pairs(x1: Tensor, cond: Tensor, generator: torch.Generator, *, coupling: Coupling = "ot", sigma: float = 0.0,
              exact_max_batch: int = 256, sinkhorn_reg: float = 0.05,
              cond_weight: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One flow-matching batch from targets x1 [B, D] with contexts cond [B, C]: (x_t [B, D], t [B], cond [B, C],
    velocity target [B, D]) (see the module docstring).

    Every draw (noise, pairing, times) comes from `generator` on the CPU, so the batch is reproducible on any device
    (and the same on every data-parallel rank, which then takes its rows)."""
    x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
    if coupling == "ot":
        x0, x1, cond = ot_couple(x0, x1, cond, generator, exact_max_batch=exact_max_batch,
                                 sinkhorn_reg=sinkhorn_reg, cond_weight=cond_weight)
    t = torch.rand(x1.shape[0], generator=generator, dtype=x1.dtype).to(x1.device)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    if sigma > 0:
        xt = xt + sigma * torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
    return xt, t, cond, x1 - x0


def cfm_loss(net: VelocityNet, x1: Tensor, cond: Tensor, generator: torch.Generator, *, coupling: Coupling = "ot",
             sigma: float = 0.0, exact_max_batch: int = 256, sinkhorn_reg: float = 0.05,
             cond_weight: float = 0.0) -> Tensor:
    """Flow-matching loss of a batch (`cfm_pairs`): MSE of the velocity net against the straight-line velocity."""
    xt, t, c, target = cfm_pairs(x1, cond, generator, coupling=coupling, sigma=sigma, exact_max_batch=exact_max_batch,
                                 sinkhorn_reg=sinkhorn_reg, cond_weight=cond_weight)
    return F.mse_loss(net(xt, t, c), target)


def integrate(velocity: VelocityFn, x0: Tensor, steps: int, method: Sampler = "rk4") -> Tensor:
    """Solve dx/dt = velocity(x, t) from t = 0 (x0 [B, D]) to t = 1 with `steps` fixed steps of `method`."""
    if steps < 1:
        raise ConfigError(f"ODE steps={steps} must be >= 1")
    if method not in SAMPLERS:
        raise ConfigError(f"sampler={method!r} is not one of {list(SAMPLERS)}")
    x, h = x0, 1.0 / steps
    for k in range(steps):
        t = torch.full((x.shape[0],), k * h, dtype=x.dtype, device=x.device)
        if method == "euler":
            x = x + h * velocity(x, t)
        elif method == "midpoint":
            x = x + h * velocity(x + 0.5 * h * velocity(x, t), t + 0.5 * h)
        else:
            k1 = velocity(x, t)
            k2 = velocity(x + 0.5 * h * k1, t + 0.5 * h)
            k3 = velocity(x + 0.5 * h * k2, t + 0.5 * h)
            k4 = velocity(x + h * k3, t + h)
            x = x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@torch.no_grad()
def sample_conditional(net: VelocityNet, cond: Tensor, n: int, steps: int, method: Sampler,
                       generator: torch.Generator) -> Tensor:
    """N = `n` samples per context: cond [B, C] -> [B, n, D] (noise drawn from `generator` on the CPU)."""
    b = cond.shape[0]
    x0 = torch.randn(b * n, net.dim, generator=generator).to(device=cond.device, dtype=cond.dtype)
    c = cond.repeat_interleave(n, dim=0)
    return integrate(lambda x, t: net(x, t, c), x0, steps, method).view(b, n, net.dim)
