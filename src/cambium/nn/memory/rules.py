"""Token-by-token recurrences (the references) for every memory rule, and the inner-loop state they share.

Legend: B batch, H heads, T tokens, Dk key/query width, Dv value width. q, k `[B, H, T, Dk]` are expected
L2-normalised (the layers normalise them), v `[B, H, T, Dv]`, gates `[B, H, T]`: α retain (M ← (1−α)M + …),
η momentum, θ inner learning rate. Every rule reads after it writes: o_t = read(M_t, q_t). The inner loop (memory,
momentum, errors) runs in fp32 whatever the outer dtype or autocast (fp64 inputs stay fp64, for gradcheck).
A reference is a leaf: nothing here imports a fast path; `dispatch.memory_forward` picks between them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from cambium.core.errors import ConfigError
from cambium.nn.memory import knobs
from cambium.nn.memory.config import MemoryConfig
from cambium.nn.memory.delta import _inner, check_qkv

__all__ = ["MemoryState", "initial_state", "miras_recurrent", "trellis_recurrent"]


class MemoryState(NamedTuple):
    """Inner-loop state: the memory's parameters and the optimiser state (momentum or FTRL dual; () for gd)."""

    params: knobs.Params
    opt: knobs.Params


def initial_state(cfg: MemoryConfig, b: int, h: int, dk: int, dv: int, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> MemoryState:
    """A valid starting state for `cfg` (see `knobs.init_params`; trellis: random unit key slots, zero values)."""
    if cfg.rule == "trellis":
        keys = F.normalize(torch.randn(b, h, cfg.slots, dk, generator=generator, dtype=dtype), dim=-1)
        return MemoryState((keys, torch.zeros(b, h, dv, cfg.slots, dtype=dtype)), ())
    params = knobs.init_params(cfg, b, h, dk, dv, generator, dtype)
    return MemoryState(params, _fresh_opt(cfg, params))


def _fresh_opt(cfg: MemoryConfig, params: knobs.Params) -> knobs.Params:
    if cfg.algorithm in ("momentum", "newton_schulz"):
        return tuple(torch.zeros_like(p) for p in params)
    if cfg.algorithm == "ftrl":
        return knobs.ftrl_dual(cfg, params)
    return ()


def _gates(theta: torch.Tensor, alpha: torch.Tensor | None,
           eta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    th = _inner(theta)
    gamma = torch.ones_like(th) if alpha is None else 1.0 - _inner(alpha)
    return th, gamma, torch.zeros_like(th) if eta is None else _inner(eta)


def _check_state(cfg: MemoryConfig, state: MemoryState | None, b: int, h: int, dk: int, dv: int,
                 dtype: torch.dtype) -> MemoryState:
    if state is None:
        if cfg.structure == "mlp" and cfg.rule == "miras":
            raise ConfigError("structure='mlp' needs an initial memory (an all-zero MLP never learns): pass "
                              "initial=initial_state(cfg, B, H, Dk, Dv) or the layer's learned initial weights")
        return initial_state(cfg, b, h, dk, dv, dtype=dtype)
    if cfg.structure == "vector" and dk != dv:
        raise ConfigError(f"structure='vector' needs key width == value width, got Dk={dk}, Dv={dv}")
    params = tuple(_inner(p) for p in state.params)
    opt = tuple(_inner(s) for s in state.opt) if state.opt else _fresh_opt(cfg, params)
    return MemoryState(params, opt)


def _window_grads(cfg: MemoryConfig, params: knobs.Params, k: torch.Tensor, v: torch.Tensor, i: int) -> knobs.Params:
    """∇_φ Σ_j ℓ(M_φ(k_j), v_j) over the Omega window j ∈ (i − omega_window, i] (just token i by default)."""
    total: knobs.Params = ()
    for j in range(max(0, i - cfg.omega_window + 1), i + 1):
        k_j = k[:, :, j]
        grads = knobs.param_grads(cfg, params, k_j, knobs.bias_grad(cfg, knobs.predict(cfg, params, k_j), v[:, :, j]))
        total = grads if not total else tuple(a + b for a, b in zip(total, grads, strict=True))
    return total


def miras_recurrent(
    cfg: MemoryConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor | None = None,
    eta: torch.Tensor | None = None,
    initial: MemoryState | None = None,
) -> tuple[torch.Tensor, MemoryState]:
    """Reference recurrence of a MIRAS memory: for each token, ∇ = ∇_φ ℓ(M_φ(k_t), v_t), one `knobs.step`, then
    o_t = read(M_t, q_t). With omega_window = c > 1 (Atlas's Omega rule, uniform weights over the window) the
    gradient is Σ_{j=t−c+1..t} ∇_φ ℓ(M_φ(k_j), v_j), all at the current memory. Returns outputs `[B, H, T, Dv]`
    (input dtype; Dv = W's rows for read='softmax') and the final state (fp32)."""
    if cfg.rule != "miras":
        raise ConfigError(f"miras_recurrent runs rule='miras' configs, got rule={cfg.rule!r}")
    b, h, t, dk, dv = check_qkv(q, k, v, theta, alpha, eta)
    if cfg.structure == "vector" and dk != dv:
        raise ConfigError(f"structure='vector' needs key width == value width, got Dk={dk}, Dv={dv}")
    with torch.autocast(q.device.type, enabled=False):
        qf, kf, vf = _inner(q), _inner(k), _inner(v)
        th, gamma, et = _gates(theta, alpha, eta)
        params, opt = _check_state(cfg, initial, b, h, dk, dv, qf.dtype)
        outs = []
        for i in range(t):
            grads = _window_grads(cfg, params, kf, vf, i)
            params, opt = knobs.step(cfg, params, opt, grads, th[:, :, i], gamma[:, :, i], et[:, :, i])
            outs.append(knobs.read(cfg, params, qf[:, :, i]))
        o = torch.stack(outs, dim=2)
    return o.to(q.dtype), MemoryState(params, opt)


def trellis_recurrent(
    cfg: MemoryConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor | None = None,
    initial: MemoryState | None = None,
) -> tuple[torch.Tensor, MemoryState]:
    """Trellis: two-pass key/value compression into `cfg.slots` slots (cambium's rendering of Karami et al. 2025).

    Key slots K `[B, H, m, Dk]`, value slots V `[B, H, Dv, m]`; per token, with γ = 1 − α:
        pass 1 (keys):   a = softmax(K k);  K ← γK − θ diag(a)(K − 1 kᵀ)     (gd on ½ Σ_i a_i ‖K_i − k‖²)
        pass 2 (values): c = softmax(K k) with the updated K;  V ← γV − θ (V c − v) cᵀ   (delta rule on codes)
        read:            o = V softmax(K q)
    """
    if cfg.rule != "trellis":
        raise ConfigError(f"trellis_recurrent runs rule='trellis' configs, got rule={cfg.rule!r}")
    b, h, t, dk, dv = check_qkv(q, k, v, theta, alpha)
    with torch.autocast(q.device.type, enabled=False):
        qf, kf, vf = _inner(q), _inner(k), _inner(v)
        th, gamma, _ = _gates(theta, alpha, None)
        (keys, values), _ = _check_state(cfg, initial, b, h, dk, dv, qf.dtype)
        outs = []
        for i in range(t):
            k_i, g, lr = kf[:, :, i], gamma[:, :, i, None, None], th[:, :, i, None, None]
            a = F.softmax(torch.einsum("bhmk,bhk->bhm", keys, k_i), dim=-1)
            keys = g * keys - lr * a.unsqueeze(-1) * (keys - k_i.unsqueeze(-2))
            c = F.softmax(torch.einsum("bhmk,bhk->bhm", keys, k_i), dim=-1)
            err = torch.einsum("bhvm,bhm->bhv", values, c) - vf[:, :, i]
            values = g * values - lr * err.unsqueeze(-1) * c.unsqueeze(-2)
            address = F.softmax(torch.einsum("bhmk,bhk->bhm", keys, qf[:, :, i]), dim=-1)
            outs.append(torch.einsum("bhvm,bhm->bhv", values, address))
        o = torch.stack(outs, dim=2)
    return o.to(q.dtype), MemoryState((keys, values), ())
