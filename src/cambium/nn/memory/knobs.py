"""The four MIRAS knobs as small functions over a memory's parameters.

A memory's parameters are a tuple of fp32 tensors with leading `[B, H]` (one memory per batch row and head):
  vector  (m `[B, H, D]`,)                          M(x) = m ⊙ x            (needs Dk = Dv)
  matrix  (W `[B, H, Dv, Dk]`,)                     M(x) = W x
  mlp     (W1 `[B, H, Dh, Dk]`, W2 `[B, H, Dv, Dh]`)  M(x) = W2 silu(W1 x)
x is `[B, H, Dk]`. Gradients of the attentional bias are written out by hand (no autograd inside the inner loop), so
the outer loop differentiates through them like any other tensor op.

Knobs:
  structure  `predict`, `param_grads`
  bias       `bias_grad`: ∂ℓ/∂p for p = M(k): l2 p − v; dot_product −v; huber clip(p − v, ±δ); lp sign(e)|e|^(p−1)
  retention  `retain`: combines the decayed parameters (γ = 1 − α) with an update u:
             l2 γφ + u; elastic_net soft(γφ + u, θλ); kl softmax(γ log φ + u) per row; sphere normalise(γφ + u⊥) per
             row with u⊥ the part of u orthogonal to the row (the row moves along the sphere)
  algorithm  `step` (gd u = −θ∇; momentum S = ηS − θ∇, u = S; newton_schulz S = ηS + ∇, u = −θ NS(S);
             ftrl G = γG + θ∇, φ = link(−G) with the retention's link: identity, soft-threshold, softmax, normalise)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cambium.nn.memory.config import MemoryConfig

__all__ = [
    "Params",
    "bias_grad",
    "init_params",
    "newton_schulz",
    "param_grads",
    "predict",
    "read",
    "retain",
    "step",
]

Params = tuple[torch.Tensor, ...]
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def init_params(cfg: MemoryConfig, b: int, h: int, dk: int, dv: int, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> Params:
    """A valid starting memory: zeros for linear memories (uniform rows for kl, random unit rows for sphere), a small
    random MLP (an all-zero MLP has zero gradient)."""
    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    if cfg.structure == "mlp":
        dh = max(1, round(cfg.hidden_mult * dk))
        w1, w2 = rnd(b, h, dh, dk) / dk**0.5, rnd(b, h, dv, dh) / dh**0.5
        params: Params = (w1, w2)
    elif cfg.structure == "matrix":
        params = (torch.zeros(b, h, dv, dk, dtype=dtype),)
    else:
        params = (torch.zeros(b, h, dk, dtype=dtype),)
    if cfg.retention == "kl":
        params = tuple(torch.full_like(p, 1.0 / p.shape[-1]) if cfg.structure != "mlp" else F.softmax(p, -1)
                       for p in params)
    if cfg.retention == "sphere":
        params = tuple(F.normalize(rnd(*p.shape), dim=-1) for p in params)
    return params


def predict(cfg: MemoryConfig, params: Params, x: torch.Tensor) -> torch.Tensor:
    """M(x): x `[B, H, Dk]` → `[B, H, Dv]`."""
    if cfg.structure == "vector":
        return params[0] * x
    if cfg.structure == "matrix":
        return torch.einsum("bhvk,bhk->bhv", params[0], x)
    w1, w2 = params
    return torch.einsum("bhvd,bhd->bhv", w2, F.silu(torch.einsum("bhdk,bhk->bhd", w1, x)))


def read(cfg: MemoryConfig, params: Params, q: torch.Tensor) -> torch.Tensor:
    """The read-out for query q `[B, H, Dk]`: M(q), or softmax over the rows of W for read='softmax'."""
    out = predict(cfg, params, q)
    return F.softmax(out, dim=-1) if cfg.read == "softmax" else out


def bias_grad(cfg: MemoryConfig, pred: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """∂ℓ(p, v)/∂p for prediction p and value v `[B, H, Dv]`."""
    if cfg.bias == "l2":
        return pred - v
    if cfg.bias == "dot_product":
        return -v
    err = pred - v
    if cfg.bias == "huber":
        return err.clamp(-cfg.huber_delta, cfg.huber_delta)
    return err.sign() * err.abs().pow(cfg.lp_p - 1.0)


def param_grads(cfg: MemoryConfig, params: Params, x: torch.Tensor, g_out: torch.Tensor) -> Params:
    """∇_φ ⟨g_out, M_φ(x)⟩: the parameter gradient given the output gradient g_out `[B, H, Dv]`."""
    if cfg.structure == "vector":
        return (g_out * x,)
    if cfg.structure == "matrix":
        return (g_out.unsqueeze(-1) * x.unsqueeze(-2),)
    w1, w2 = params
    pre = torch.einsum("bhdk,bhk->bhd", w1, x)
    sig = torch.sigmoid(pre)
    g_w2 = g_out.unsqueeze(-1) * (pre * sig).unsqueeze(-2)
    g_hidden = torch.einsum("bhvd,bhv->bhd", w2, g_out) * sig * (1.0 + pre * (1.0 - sig))
    return (g_hidden.unsqueeze(-1) * x.unsqueeze(-2), g_w2)


def newton_schulz(m: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximate orthogonalisation U Vᵀ of `[..., a, b]` matrices by the quintic Newton–Schulz iteration."""
    x = m / (m.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    wide = x.shape[-2] > x.shape[-1]
    if wide:
        x = x.mT
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if wide else x


def _gate(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a `[B, H]` gate against a `[B, H, ...]` parameter."""
    return g.reshape(*g.shape, *([1] * (like.dim() - 2)))


def _link(cfg: MemoryConfig, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Map a primal-space point z to the retention's feasible set (identity for l2)."""
    if cfg.retention == "kl":
        return F.softmax(z, dim=-1)
    if cfg.retention == "sphere":
        return F.normalize(z, dim=-1)
    if cfg.retention == "elastic_net":
        thr = _gate(theta, z) * cfg.l1
        return z.sign() * (z.abs() - thr).clamp(min=0.0)
    return z


def retain(cfg: MemoryConfig, param: torch.Tensor, update: torch.Tensor, gamma: torch.Tensor,
           theta: torch.Tensor) -> torch.Tensor:
    """New parameter from the old one, the algorithm's update and γ = 1 − α `[B, H]` (θ for the l1 threshold)."""
    g = _gate(gamma, param)
    if cfg.retention == "kl":
        return F.softmax(g * param.clamp(min=1e-30).log() + update, dim=-1)
    if cfg.retention == "sphere":
        unit = F.normalize(param, dim=-1)
        update = update - (update * unit).sum(-1, keepdim=True) * unit
    return _link(cfg, g * param + update, theta)


def ftrl_dual(cfg: MemoryConfig, params: Params) -> Params:
    """FTRL's accumulated (decayed) gradient G such that link(−G) is the starting memory."""
    if cfg.retention == "kl":
        return tuple(-p.clamp(min=1e-30).log() for p in params)
    return tuple(-p for p in params)


def step(cfg: MemoryConfig, params: Params, opt: Params, grads: Params, theta: torch.Tensor, gamma: torch.Tensor,
         eta: torch.Tensor) -> tuple[Params, Params]:
    """One inner optimisation step. opt is the momentum (momentum, newton_schulz) or the dual G (ftrl), else ()."""
    if cfg.algorithm == "ftrl":
        dual = tuple(_gate(gamma, g) * d + _gate(theta, g) * g for d, g in zip(opt, grads, strict=True))
        return tuple(_link(cfg, -d, theta) for d in dual), dual
    if cfg.algorithm == "gd":
        updates = tuple(-_gate(theta, g) * g for g in grads)
    elif cfg.algorithm == "momentum":
        opt = tuple(_gate(eta, g) * s - _gate(theta, g) * g for s, g in zip(opt, grads, strict=True))
        updates = opt
    else:
        opt = tuple(_gate(eta, g) * s + g for s, g in zip(opt, grads, strict=True))
        updates = tuple(-_gate(theta, s) * newton_schulz(s, cfg.ns_steps) for s in opt)
    new = tuple(retain(cfg, p, u, gamma, theta) for p, u in zip(params, updates, strict=True))
    return new, opt
