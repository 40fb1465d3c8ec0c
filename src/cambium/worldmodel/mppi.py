"""MPPI planning over a learned latent model with a CVaR objective (the planner of TD-MPC2, `worldmodel.tdmpc`).

Shapes: z [1, L] the latent of the present, actions [H, S, A] (H horizon, S samples, A action dims), atoms [S, K].

One decision (`mppi_plan`), following the TD-MPC2 reference (Hansen et al. 2024):
1. `policy_trajectories` (P) action sequences roll out the policy prior from z (one draw each, noise given);
2. for each of `iterations` rounds, S − P sequences are drawn from N(mean, std²) per step, clamped to [−1, 1];
   every sequence is scored by its planned return G = Σ_{t<H} γ^t r̂(z_t, a_t) + γ^H·Z(z_H, π̄(z_H)), with z_{t+1}
   the latent dynamics, r̂ the reward head and Z the terminal value distribution: the quantile atoms of two critics of
   the ensemble (a pair drawn once per decision, as the reference draws a random pair), pooled into 2K atoms; π̄ is
   the policy prior's mean action (the reference draws a sample there). The objective is the CVaR of G at level
   α = `cvar_alpha`: the mean of the lowest ceil(α·2K) atoms (α = 1 is the mean, the reference's risk-neutral
   average of the pair). The `elites` best sequences re-fit mean and std by softmax(temperature·(value − max))
   weights; std is clamped to [min_std, max_std].
3. The decision is the first step of the last mean (deterministic: evaluation), or, when exploring, the first step of
   an elite drawn with probability ∝ its weight plus std·noise, clamped to [−1, 1] (the reference's training act).

All randomness of a decision is drawn up front into `PlanNoise` (`draw_noise`), so the vectorised planner and the
per-sample loop reference (`mppi_plan_reference`) can be run on the same draws and compared (tests/worldmodel/
test_tdmpc.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from pydantic import Field, model_validator
from torch import Tensor

from cambium.core.config import ConfigModel

__all__ = ["LatentModel", "PlanNoise", "PlannerConfig", "cvar", "draw_noise", "mppi_plan", "mppi_plan_reference"]


class PlannerConfig(ConfigModel):
    """MPPI over the latent model (defaults: the TD-MPC2 reference's planner, plus the CVaR level)."""

    horizon: int = Field(3, ge=1, le=64, description="planning horizon in steps (also the length of the training "
                         "rollouts of the latent model, as in the reference)")
    iterations: int = Field(6, ge=1, le=64, description="MPPI re-fitting rounds per decision")
    samples: int = Field(512, ge=2, le=65536, description="action sequences scored per round (policy ones included)")
    elites: int = Field(64, ge=1, description="best sequences that re-fit the sampling distribution")
    policy_trajectories: int = Field(24, ge=0, description="sequences rolled out from the policy prior (the rest "
                                     "are drawn from the MPPI distribution)")
    min_std: float = Field(0.05, gt=0, allow_inf_nan=False, description="lower clamp of the sampling std")
    max_std: float = Field(2.0, gt=0, allow_inf_nan=False, description="initial sampling std and its upper clamp")
    temperature: float = Field(0.5, gt=0, allow_inf_nan=False, description="softmax temperature of elite weights")
    cvar_alpha: float = Field(0.5, gt=0, le=1, allow_inf_nan=False,
                              description="CVaR level of the planned-return objective: the mean of the lowest "
                              "alpha share of return atoms (1 = risk-neutral mean)")

    @model_validator(mode="after")
    def _check(self) -> PlannerConfig:
        if self.policy_trajectories >= self.samples:
            raise ValueError(f"policy_trajectories={self.policy_trajectories} must be < samples={self.samples}")
        if self.elites > self.samples:
            raise ValueError(f"elites={self.elites} must be <= samples={self.samples}")
        if self.min_std > self.max_std:
            raise ValueError(f"min_std={self.min_std} must be <= max_std={self.max_std}")
        return self


class LatentModel(Protocol):
    """What the planner needs of a world model (batched over rows)."""

    def next(self, z: Tensor, a: Tensor) -> Tensor:
        """z [B, L], a [B, A] -> next latent [B, L]."""
        ...

    def reward(self, z: Tensor, a: Tensor) -> Tensor:
        """z [B, L], a [B, A] -> predicted reward [B]."""
        ...

    def pi(self, z: Tensor, eps: Tensor | None) -> Tensor:
        """Policy prior action [B, A] in [−1, 1]: its mean when eps is None, else the squashed sample with noise eps."""
        ...

    def quantiles(self, z: Tensor, a: Tensor, members: Tensor | None = None) -> Tensor:
        """Quantile atoms [E, B, K] of every critic of the ensemble, or [len(members), B, K] of those members."""
        ...


@dataclass(frozen=True)
class PlanNoise:
    """Every random draw of one decision: sampling noise [I, H, S − P, A], policy-rollout noise [H, P, A], the critic
    pair [2], and (exploration) a Gumbel vector [elites] and action noise [A]."""

    sample: Tensor
    policy: Tensor
    pair: Tensor
    gumbel: Tensor
    action: Tensor


def draw_noise(cfg: PlannerConfig, action_dim: int, n_critics: int, generator: torch.Generator) -> PlanNoise:
    h, p = cfg.horizon, cfg.policy_trajectories
    sample = torch.randn(cfg.iterations, h, cfg.samples - p, action_dim, generator=generator)
    policy = torch.randn(h, p, action_dim, generator=generator)
    pair = torch.randperm(n_critics, generator=generator)[:2]
    u = torch.rand(cfg.elites, generator=generator).clamp(1e-12, 1 - 1e-12)
    return PlanNoise(sample, policy, pair, -torch.log(-torch.log(u)), torch.randn(action_dim, generator=generator))


def cvar(atoms: Tensor, alpha: float) -> Tensor:
    """Mean of the lowest ceil(alpha·K) of K atoms: [..., K] -> [...]."""
    k = max(1, math.ceil(alpha * atoms.shape[-1] - 1e-9))
    return atoms.topk(k, dim=-1, largest=False).values.mean(-1)


def _policy_actions(model: LatentModel, z: Tensor, noise: Tensor) -> Tensor:
    """[H, P, A] policy-prior rollout from z [1, L]."""
    h, p = noise.shape[0], noise.shape[1]
    zs = z.expand(p, -1)
    out = []
    for t in range(h):
        a = model.pi(zs, noise[t])
        out.append(a)
        if t < h - 1:
            zs = model.next(zs, a)
    return torch.stack(out)


def _values(model: LatentModel, z: Tensor, actions: Tensor, pair: Tensor, discount: float, alpha: float) -> Tensor:
    """CVaR_α of the planned return of each sequence: z [S, L], actions [H, S, A] -> [S]."""
    g = torch.zeros(actions.shape[1], dtype=z.dtype)
    for t in range(actions.shape[0]):
        g = g + discount**t * model.reward(z, actions[t])
        z = model.next(z, actions[t])
    q = model.quantiles(z, model.pi(z, None), pair)  # [2, S, K]
    atoms = g[:, None] + discount ** actions.shape[0] * torch.cat([q[0], q[1]], dim=-1)
    return cvar(atoms, alpha).nan_to_num(0.0)


def _refit(values: Tensor, actions: Tensor, cfg: PlannerConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Elite weights [E], elite actions [H, E, A], new mean and std [H, A]."""
    # a stable sort breaks ties by the lower index, as the reference does (topk's order among ties is unspecified)
    idx = torch.sort(values, descending=True, stable=True).indices[: cfg.elites]
    ev, ea = values[idx], actions[:, idx]
    w = torch.exp(cfg.temperature * (ev - ev.max()))
    w = w / w.sum()
    mean = (w[None, :, None] * ea).sum(1)
    std = (w[None, :, None] * (ea - mean[:, None]) ** 2).sum(1).sqrt().clamp(cfg.min_std, cfg.max_std)
    return w, ea, mean, std


def _decide(w: Tensor, ea: Tensor, mean: Tensor, std: Tensor, noise: PlanNoise, explore: bool) -> Tensor:
    if not explore:
        return mean[0].clamp(-1, 1)
    k = int(torch.argmax(torch.log(w.clamp_min(1e-30)) + noise.gumbel[: w.shape[0]]))
    return (ea[0, k] + std[0] * noise.action).clamp(-1, 1)


@torch.no_grad()
def mppi_plan(model: LatentModel, z: Tensor, cfg: PlannerConfig, noise: PlanNoise, *, discount: float,
              explore: bool = False) -> Tensor:
    """One MPPI decision from the latent z [1, L]: the action [A] in [−1, 1] (module docstring)."""
    h, s, p = cfg.horizon, cfg.samples, cfg.policy_trajectories
    a_dim = noise.sample.shape[-1]
    actions = torch.empty(h, s, a_dim, dtype=z.dtype)
    if p:
        actions[:, :p] = _policy_actions(model, z, noise.policy)
    zs = z.expand(s, -1)
    mean = torch.zeros(h, a_dim, dtype=z.dtype)
    std = torch.full((h, a_dim), cfg.max_std, dtype=z.dtype)
    w = ea = None
    for i in range(cfg.iterations):
        actions[:, p:] = (mean[:, None] + std[:, None] * noise.sample[i]).clamp(-1, 1)
        values = _values(model, zs, actions, noise.pair, discount, cfg.cvar_alpha)
        w, ea, mean, std = _refit(values, actions, cfg)
    assert w is not None and ea is not None
    return _decide(w, ea, mean, std, noise, explore)


@torch.no_grad()
def mppi_plan_reference(model: LatentModel, z: Tensor, cfg: PlannerConfig, noise: PlanNoise, *, discount: float,
                        explore: bool = False) -> Tensor:
    """The same decision as `mppi_plan`, one sequence at a time with plain Python loops (the slow reference)."""
    h, s, p = cfg.horizon, cfg.samples, cfg.policy_trajectories
    a_dim = noise.sample.shape[-1]
    pi_seqs = []
    for j in range(p):
        zj, rollout = z, []
        for t in range(h):
            a = model.pi(zj, noise.policy[t, j : j + 1])
            rollout.append(a[0])
            zj = model.next(zj, a)
        pi_seqs.append(torch.stack(rollout))
    mean = [[0.0] * a_dim for _ in range(h)]
    std = [[cfg.max_std] * a_dim for _ in range(h)]
    elites: list[tuple[float, Tensor]] = []
    for i in range(cfg.iterations):
        scored: list[tuple[float, int, Tensor]] = []
        for j in range(s):
            if j < p:
                seq = pi_seqs[j]
            else:
                seq = torch.stack([torch.stack([
                    torch.clamp(mean[t][d] + std[t][d] * noise.sample[i, t, j - p, d], -1.0, 1.0)
                    for d in range(a_dim)]) for t in range(h)]).to(z.dtype)
            zj, g = z, 0.0
            for t in range(h):
                g += discount**t * float(model.reward(zj, seq[t : t + 1])[0])
                zj = model.next(zj, seq[t : t + 1])
            q = model.quantiles(zj, model.pi(zj, None))
            atoms = sorted([g + discount**h * float(x) for c in noise.pair.tolist() for x in q[c, 0]])
            k = max(1, math.ceil(cfg.cvar_alpha * len(atoms) - 1e-9))
            value = sum(atoms[:k]) / k
            scored.append((value if math.isfinite(value) else 0.0, j, seq))
        scored.sort(key=lambda x: (-x[0], x[1]))
        elites = [(v, seq) for v, _, seq in scored[: cfg.elites]]
        top = elites[0][0]
        raw = [math.exp(cfg.temperature * (v - top)) for v, _ in elites]
        weights = [r / sum(raw) for r in raw]
        for t in range(h):
            for d in range(a_dim):
                m = sum(wk * float(seq[t, d]) for wk, (_, seq) in zip(weights, elites, strict=True))
                var = sum(wk * (float(seq[t, d]) - m) ** 2 for wk, (_, seq) in zip(weights, elites, strict=True))
                mean[t][d] = m
                std[t][d] = min(max(math.sqrt(var), cfg.min_std), cfg.max_std)
    if not explore:
        return torch.tensor([min(max(m, -1.0), 1.0) for m in mean[0]], dtype=z.dtype)
    gumbel = noise.gumbel.tolist()
    k = max(range(len(elites)), key=lambda e: math.log(max(weights[e], 1e-30)) + gumbel[e])
    first = elites[k][1][0]
    return torch.tensor([min(max(float(first[d]) + std[0][d] * float(noise.action[d]), -1.0), 1.0)
                         for d in range(a_dim)], dtype=z.dtype)
