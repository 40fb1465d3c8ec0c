"""WM-5 Multiverse Crossing: how robust are the sampled futures of an origin to a small change of its context latent?

Public API (wired by the Strate IV environment and backtest)::

    cfg = MultiverseConfig(copies=8, futures=8, angle=0.05, sampler="midpoint", ode_steps=8, batch_origins=64)
    feats = multiverse_features(velocity, contexts, cfg, generator=torch.Generator().manual_seed(0),
                                latent_dims=D)        # velocity: flow.VelocityNet (FutureModel.velocity)
    feats.convergence, feats.bifurcation, feats.lyapunov    # np.ndarray float32 [T] each
    feats.stack()                                           # [T, 3] in that order (observation features)

`contexts` [T, C] are the flow's conditioning rows (`FutureModel.context(latent, vol)`: the standardised latent [D]
followed by the volatility features); only the first `latent_dims` columns (the context latent) are perturbed, the
rest is kept. The flow's futures are F patches of D latent dimensions ([F·D], standardised like the context latent).

Per origin, with x the context latent (its first `latent_dims` columns), r = ‖x‖ and u = x / r:

- Worlds. World 0 is the original context; worlds 1 … M (`copies`) are geodesic perturbations on the sphere of
  radius r: a tangent direction v (Gaussian noise minus its component along u, normalised) and the exponential map
  u' = cos(θ)·u + sin(θ)·v, x' = r·u' (θ = `angle` in radians). So ‖x'‖ = ‖x‖ and the great-circle angle between x
  and x' is exactly θ. A zero latent has no direction and stays as it is.
- Futures. N (`futures`) latent futures per world from the trained flow (`flow.integrate`, the ODE sampler of
  Strate III) with common random numbers: the N noise draws of an origin are shared by its M + 1 worlds. With θ = 0
  every world gives the same N futures, and differences between worlds come from the perturbation alone.
- Convergence ∈ [0, 1]: with Y[w, n] the futures (W = M + 1 worlds), μ_w the mean of world w and μ the grand mean,
  the total spread T = mean_{w,n} ‖Y[w,n] − μ‖² splits exactly into within-world W_s = mean_{w,n} ‖Y[w,n] − μ_w‖² and
  between-world B = mean_w ‖μ_w − μ‖² (equal group sizes). Convergence = W_s / T = 1 − η² (η² the correlation
  ratio): 1 when the perturbed worlds expect the same future, → 0 when the worlds' expectations differ by much more
  than one world's own uncertainty. T = 0 (every future identical) counts as 1.
- Bifurcation index ∈ [0, 1]: the (W·N) futures of the origin, centred on their mean, as rows of X; the eigenvalues
  λ_i of the Gram matrix X Xᵀ (the same nonzero ones as XᵀX), p_i = λ_i / Σλ, entropy H = −Σ p_i log p_i, divided by
  its largest possible value log(min(W·N − 1, P)) (P = F·D; the centred rows span at most that many dimensions).
  0 when the futures vary along one direction only (rank 1, e.g. two branches on a line), 1 when they spread equally
  in every direction (isotropic). No spread at all counts as 0.
- Lyapunov proxy (per latent patch): δ_0 = RMS over worlds m ≥ 1 of ‖x'_m − x‖ = 2r·sin(θ/2) (the chord of the
  perturbation) and, for patch f = 1 … F, δ_f = RMS over (m ≥ 1, n) of ‖Y[m,n,f] − Y[0,n,f]‖ (each world's future
  against the original world's future from the same noise). The proxy is the least-squares slope of log δ_f over
  f = 0 … F: the log growth per patch of a small perturbation of the present, > 0 when it is amplified (a chaotic
  regime), < 0 when the flow contracts it. When nothing was perturbed (θ = 0 or a zero latent) the proxy is 0, and
  δ_f is floored at 1e-6·δ_0 before the log (a flow that ignores its context gives a finite, very negative
  proxy, not −inf).

Invariances (tested): convergence is unchanged by adding a vector to, scaling, or rotating every future of an origin
(and by permuting worlds or futures); the bifurcation index is unchanged by scaling, translating, rotating or
permuting the futures; the Lyapunov proxy of futures that scale the perturbation by a^f is log a.

Position sizing by convergence is applied by the backtest; this module only computes the per-origin features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from cambium.core.config import ConfigModel
from cambium.core.errors import ConfigError, DataError
from cambium.worldmodel.flow import SAMPLERS, integrate

__all__ = [
    "MultiverseConfig",
    "MultiverseFeatures",
    "bifurcation_index",
    "convergence_score",
    "lyapunov_proxy",
    "multiverse_features",
    "perturb_on_sphere",
]

_FLOOR = 1e-12
_REL_FLOOR = 1e-6


class MultiverseConfig(ConfigModel):
    """WM-5 Multiverse Crossing: perturbed copies of each context latent and the futures the flow samples from them."""

    copies: int = Field(8, ge=1, le=256, description="M perturbed copies of the context latent per origin (the "
                        "original is sampled too, as world 0)")
    futures: int = Field(8, ge=2, le=1024, description="N futures sampled per world, the same N noise draws for "
                         "every world of an origin")
    angle: float = Field(0.05, ge=0, le=math.pi, allow_inf_nan=False,
                         description="geodesic angle (radians) between the context latent and each perturbed copy")
    sampler: Literal["euler", "midpoint", "rk4"] = Field("midpoint", description="ODE solver of the flow sampler")
    ode_steps: int = Field(8, ge=1, le=1000, description="fixed ODE steps from noise to a future")
    batch_origins: int = Field(64, ge=1, description="origins sampled per batch (memory ∝ batch·(M+1)·N·F·D)")


@dataclass(frozen=True)
class MultiverseFeatures:
    """Per origin: convergence, bifurcation index and Lyapunov proxy, float32 [T] each (module docstring)."""

    convergence: np.ndarray
    bifurcation: np.ndarray
    lyapunov: np.ndarray

    def __len__(self) -> int:
        return int(self.convergence.shape[0])

    def stack(self) -> np.ndarray:
        """[T, 3]: convergence, bifurcation, lyapunov."""
        return np.stack([self.convergence, self.bifurcation, self.lyapunov], axis=1)


def perturb_on_sphere(x: Tensor, angle: float, copies: int, generator: torch.Generator) -> Tensor:
    """`copies` geodesic perturbations of each row of x [T, D] by `angle` radians: [T, copies, D], each row with the
    norm of its original (exponential map of a random unit tangent vector; rows of zeros are returned unchanged)."""
    eps = torch.randn(x.shape[0], copies, x.shape[1], generator=generator, dtype=x.dtype).to(x.device)
    return _geodesic(x, angle, eps)


def _geodesic(x: Tensor, angle: float, eps: Tensor) -> Tensor:
    """x [T, D] moved by `angle` along the tangent directions given by the Gaussian draws eps [T, M, D]."""
    t, copies, d = eps.shape
    if angle == 0:
        return x[:, None].expand(t, copies, d).clone()
    r = x.norm(dim=-1, keepdim=True)  # [T, 1]
    u = torch.where(r > 0, x / r.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))[:, None]  # [T, 1, D]
    v = eps - (eps * u).sum(-1, keepdim=True) * u
    vn = v.norm(dim=-1, keepdim=True)  # > 0 almost surely for D >= 2
    v = v / vn.clamp_min(torch.finfo(x.dtype).tiny)
    out = r[:, None] * (math.cos(angle) * u + math.sin(angle) * v)
    return torch.where(r[:, None] > 0, out, x[:, None].expand(t, copies, d))


def convergence_score(futures: Tensor) -> Tensor:
    """futures [T, W, N, P] (W worlds of N futures) -> [T]: within-world share of the total spread (docstring)."""
    y = futures.double()
    mu_w = y.mean(2, keepdim=True)
    within = (y - mu_w).pow(2).sum(-1).mean((1, 2))
    between = (mu_w.squeeze(2) - y.mean((1, 2))[:, None]).pow(2).sum(-1).mean(1)
    total = within + between
    return torch.where(total > 0, within / total.clamp_min(1e-300), torch.ones_like(total)).clamp(0.0, 1.0)


def bifurcation_index(futures: Tensor) -> Tensor:
    """futures [T, K, P] (K futures per origin) -> [T]: normalised eigenvalue entropy of the centred Gram matrix."""
    y = futures.double()
    k, p = y.shape[1], y.shape[2]
    x = y - y.mean(1, keepdim=True)
    gram = x @ x.transpose(1, 2) if k <= p else x.transpose(1, 2) @ x  # the smaller of XXᵀ and XᵀX
    lam = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    total = lam.sum(-1, keepdim=True)
    prob = lam / total.clamp_min(1e-300)
    # eigvalsh leaves round-off (≈ 1e-16 of the largest eigenvalue) in the null space: it is no spread.
    prob = torch.where(prob > 1e-12, prob, torch.zeros_like(prob))
    prob = prob / prob.sum(-1, keepdim=True).clamp_min(1e-300)
    entropy = -(prob * torch.log(prob.clamp_min(1e-300))).sum(-1)
    rank_max = min(k - 1, p)
    if rank_max < 2:
        return torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
    out = entropy / math.log(rank_max)
    return torch.where(total.squeeze(-1) > 0, out, torch.zeros_like(out)).clamp(0.0, 1.0)


def lyapunov_proxy(futures: Tensor, delta0: Tensor) -> Tensor:
    """futures [T, W, N, F, D] (world 0 the original) and δ_0 [T] -> [T]: slope of log δ_f over f = 0 … F."""
    y = futures.double()
    diff = (y[:, 1:] - y[:, :1]).pow(2).sum(-1)  # [T, M, N, F]
    delta = diff.mean((1, 2)).sqrt()  # [T, F]
    d0 = delta0.double()
    floor = _REL_FLOOR * d0.clamp_min(_FLOOR)
    logs = torch.cat([torch.log(d0.clamp_min(_FLOOR))[:, None], torch.log(torch.maximum(delta, floor[:, None]))], 1)
    f = torch.arange(logs.shape[1], dtype=torch.float64, device=y.device)
    fc = f - f.mean()
    slope = ((logs - logs.mean(1, keepdim=True)) * fc).sum(1) / fc.pow(2).sum()
    return torch.where(d0 > 0, slope, torch.zeros_like(slope))


def _check(velocity: nn.Module, contexts: Tensor, latent_dims: int) -> tuple[int, int]:
    dim = int(getattr(velocity, "dim", 0))
    if contexts.ndim != 2:
        raise ConfigError(f"contexts must be [T, C], got shape {list(contexts.shape)}")
    if not 2 <= latent_dims <= contexts.shape[1]:
        raise ConfigError(f"latent_dims={latent_dims} must be in [2, C={contexts.shape[1]}] (the context latent "
                          "is the first latent_dims columns of each context row; a 1-D sphere has no geodesics)")
    if dim < 1 or dim % latent_dims:
        raise ConfigError(f"the flow's future dimension {dim} is not a whole number of patches of "
                          f"latent_dims={latent_dims}")
    if not bool(torch.isfinite(contexts).all()):
        bad = int((~torch.isfinite(contexts)).any(1).sum())
        raise DataError(f"{bad} of {contexts.shape[0]} context rows hold NaN or inf values")
    return dim, dim // latent_dims


@torch.no_grad()
def multiverse_features(velocity: nn.Module, contexts: Tensor, cfg: MultiverseConfig, *,
                        generator: torch.Generator, latent_dims: int | None = None) -> MultiverseFeatures:
    """Convergence, bifurcation index and Lyapunov proxy at each of T origins (see the module docstring).

    velocity: the trained flow's velocity net v(x [B, P], t [B], cond [B, C]) with attribute `dim` = P = F·D
    (`FutureModel.velocity`); contexts [T, C]: its conditioning rows; latent_dims: D, the leading columns of a
    context that are the context latent (default: all C). Noise (perturbations, flow noise) comes from `generator`
    on the CPU, origin by origin, so the features are the same on any device and for any batch_origins."""
    d = contexts.shape[1] if latent_dims is None else latent_dims
    p, n_patches = _check(velocity, contexts, d)
    if cfg.sampler not in SAMPLERS:
        raise ConfigError(f"sampler={cfg.sampler!r} is not one of {list(SAMPLERS)}")
    was_training = velocity.training
    velocity.eval()
    w, n = cfg.copies + 1, cfg.futures
    out = np.empty((3, contexts.shape[0]), dtype=np.float32)
    try:
        for chunk in torch.arange(contexts.shape[0]).split(cfg.batch_origins):
            ctx = contexts[chunk]
            b = ctx.shape[0]
            lat = ctx[:, :d]
            # drawn origin by origin, so that the features do not depend on batch_origins (tested)
            draws = [(torch.randn(cfg.copies, d, generator=generator), torch.randn(n, p, generator=generator))
                     for _ in range(b)]
            eps = torch.stack([e for e, _ in draws]).to(device=ctx.device, dtype=ctx.dtype)
            noise = torch.stack([z for _, z in draws])[:, None].to(device=ctx.device, dtype=ctx.dtype)
            moved = _geodesic(lat, cfg.angle, eps)  # [b, M, D]
            worlds = ctx[:, None].repeat(1, w, 1)
            worlds[:, 1:, :d] = moved
            delta0 = (moved - lat[:, None]).pow(2).sum(-1).mean(1).sqrt()  # [b]
            x0 = noise.expand(b, w, n, p).reshape(b * w * n, p)
            cond = worlds.repeat_interleave(n, dim=1).reshape(b * w * n, -1)

            def field(x: Tensor, t: Tensor, c: Tensor = cond) -> Tensor:
                return velocity(x, t, c)

            fut = integrate(field, x0, cfg.ode_steps, cfg.sampler).view(b, w, n, p)
            out[0, chunk.numpy()] = convergence_score(fut).float().cpu().numpy()
            out[1, chunk.numpy()] = bifurcation_index(fut.reshape(b, w * n, p)).float().cpu().numpy()
            out[2, chunk.numpy()] = lyapunov_proxy(fut.view(b, w, n, n_patches, d), delta0).float().cpu().numpy()
    finally:
        velocity.train(was_training)
    return MultiverseFeatures(out[0].copy(), out[1].copy(), out[2].copy())
