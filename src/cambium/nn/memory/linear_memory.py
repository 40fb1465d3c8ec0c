"""Linear (matrix) memory with momentum — the Titans LMM step with a matrix memory — and its kernel pair.

Legend: B batch, H heads, T tokens, Dk key/query width, Dv value width. Memory M and momentum S are `[B, H, Dv, Dk]`.
Per token t, with retain gate α_t (γ_t = 1 − α_t), momentum gate η_t and inner learning rate θ_t:

    e_t = M_{t-1} k_t − v_t                     (gradient of ½‖M k − v‖² is e kᵀ)
    S_t = η_t S_{t-1} − θ_t e_t k_tᵀ
    M_t = γ_t M_{t-1} + S_t
    o_t = M_t q_t

η ≡ 0 gives the delta rule. `linear_memory_recurrent` is the autograd reference. `LinearMemoryFunction` is the fused
forward (no autograd graph, states kept only every `segment` tokens) with an analytic backward that recomputes each
segment's states and runs the adjoint recurrence in reverse:

    dM_t += do_t q_tᵀ;  dS_t += dM_t;  dη_t = ⟨dS_t, S_{t-1}⟩;  dθ_t = −e_tᵀ dS_t k_t;  de_t = −θ_t dS_t k_t
    dγ_t = ⟨dM_t, M_{t-1}⟩;  dM_{t-1} = γ_t dM_t + de_t k_tᵀ;  dS_{t-1} = η_t dS_t
    dk_t = −θ_t dS_tᵀ e_t + M_{t-1}ᵀ de_t;  dv_t = −de_t;  dq_t = M_tᵀ do_t
"""

from __future__ import annotations

from typing import Any

import torch

from cambium.core.errors import ConfigError
from cambium.nn.memory.delta import _inner, check_qkv

__all__ = ["LinearMemoryFunction", "linear_memory_fused", "linear_memory_recurrent"]


def linear_memory_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor | None = None,
    eta: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Reference recurrence (autograd), fp32 inside. q, k `[B, H, T, Dk]` (L2-normalised by the caller),
    v `[B, H, T, Dv]`, gates `[B, H, T]`, initial_state (M, S) `[B, H, Dv, Dk]` each.
    Returns outputs `[B, H, T, Dv]` (input dtype) and the final (M, S) in fp32."""
    b, h, t, dk, dv = check_qkv(q, k, v, theta, alpha, eta)
    with torch.autocast(q.device.type, enabled=False):
        qf, kf, vf, th = _inner(q), _inner(k), _inner(v), _inner(theta)
        if initial_state is None:
            m = q.new_zeros(b, h, dv, dk, dtype=_inner(q).dtype)
            s = torch.zeros_like(m)
        else:
            m, s = _inner(initial_state[0]), _inner(initial_state[1])
        outs = []
        for i in range(t):
            k_i = kf[:, :, i]
            err = (m @ k_i.unsqueeze(-1)).squeeze(-1) - vf[:, :, i]
            grad = err.unsqueeze(-1) * k_i.unsqueeze(-2)
            s = (0.0 if eta is None else _inner(eta[:, :, i, None, None]) * s) - th[:, :, i, None, None] * grad
            m = (m if alpha is None else (1.0 - _inner(alpha[:, :, i, None, None])) * m) + s
            outs.append((m @ qf[:, :, i].unsqueeze(-1)).squeeze(-1))
        o = torch.stack(outs, dim=2)
    return o.to(q.dtype), (m, s)


def _step(
    m: torch.Tensor, s: torch.Tensor, k_i: torch.Tensor, v_i: torch.Tensor, th: torch.Tensor, gm: torch.Tensor,
    et: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    err = torch.einsum("bhvk,bhk->bhv", m, k_i) - v_i
    s = et[..., None, None] * s - th[..., None, None] * err.unsqueeze(-1) * k_i.unsqueeze(-2)
    m = gm[..., None, None] * m + s
    return m, s, err


class LinearMemoryFunction(torch.autograd.Function):
    """apply(q, k `[B, H, T, Dk]`, v `[B, H, T, Dv]`, theta, gamma, eta `[B, H, T]`, m0, s0 `[B, H, Dv, Dk]`, segment)
    → (outputs `[B, H, T, Dv]`, final M, final S). All inputs fp32 (or fp64 for gradcheck)."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        theta: torch.Tensor,
        gamma: torch.Tensor,
        eta: torch.Tensor,
        m0: torch.Tensor,
        s0: torch.Tensor,
        segment: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = q.shape[2]
        m, s = m0, s0
        out = v.new_empty(v.shape)
        saved_m, saved_s = [], []
        for i in range(t):
            if i % segment == 0:
                saved_m.append(m)
                saved_s.append(s)
            m, s, _ = _step(m, s, k[:, :, i], v[:, :, i], theta[:, :, i], gamma[:, :, i], eta[:, :, i])
            out[:, :, i] = torch.einsum("bhvk,bhk->bhv", m, q[:, :, i])
        ctx.save_for_backward(q, k, v, theta, gamma, eta, torch.stack(saved_m, 2), torch.stack(saved_s, 2))
        ctx.segment = segment
        return out, m, s

    @staticmethod
    def backward(
        ctx: Any, d_o: torch.Tensor | None, d_m: torch.Tensor | None, d_s: torch.Tensor | None
    ) -> tuple[Any, ...]:
        q, k, v, theta, gamma, eta, saved_m, saved_s = ctx.saved_tensors
        t, seg = q.shape[2], ctx.segment
        dm = torch.zeros_like(saved_m[:, :, 0]) if d_m is None else d_m.clone()
        ds = torch.zeros_like(dm) if d_s is None else d_s.clone()
        d_o = torch.zeros_like(v) if d_o is None else d_o
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dth, dgm, det = torch.empty_like(theta), torch.empty_like(gamma), torch.empty_like(eta)
        for j in reversed(range(saved_m.shape[2])):
            lo, hi = j * seg, min((j + 1) * seg, t)
            ms, ss, errs = [saved_m[:, :, j]], [saved_s[:, :, j]], []
            for i in range(lo, hi):
                m, s, err = _step(ms[-1], ss[-1], k[:, :, i], v[:, :, i], theta[:, :, i], gamma[:, :, i], eta[:, :, i])
                ms.append(m)
                ss.append(s)
                errs.append(err)
            for i in reversed(range(lo, hi)):
                r = i - lo
                m_prev, m_cur, s_prev = ms[r], ms[r + 1], ss[r]
                k_i, err = k[:, :, i], errs[r]
                dq[:, :, i] = torch.einsum("bhvk,bhv->bhk", m_cur, d_o[:, :, i])
                dm = dm + d_o[:, :, i].unsqueeze(-1) * q[:, :, i].unsqueeze(-2)
                ds = ds + dm
                det[:, :, i] = (ds * s_prev).sum((-1, -2))
                dgm[:, :, i] = (dm * m_prev).sum((-1, -2))
                ds_k = torch.einsum("bhvk,bhk->bhv", ds, k_i)
                dth[:, :, i] = -(err * ds_k).sum(-1)
                de = -theta[:, :, i, None] * ds_k
                dk[:, :, i] = -theta[:, :, i, None] * torch.einsum("bhvk,bhv->bhk", ds, err) + torch.einsum(
                    "bhvk,bhv->bhk", m_prev, de
                )
                dv[:, :, i] = -de
                dm = gamma[:, :, i, None, None] * dm + de.unsqueeze(-1) * k_i.unsqueeze(-2)
                ds = eta[:, :, i, None, None] * ds
        return dq, dk, dv, dth, dgm, det, dm, ds, None


def linear_memory_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor | None = None,
    eta: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    segment: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Same contract as `linear_memory_recurrent`, through the kernel pair; activation memory is one (M, S) pair per
    `segment` tokens instead of one per token."""
    if segment < 1:
        raise ConfigError(f"segment={segment} must be >= 1")
    b, h, _, dk, dv = check_qkv(q, k, v, theta, alpha, eta)
    with torch.autocast(q.device.type, enabled=False):
        th = _inner(theta)
        gm = torch.ones_like(th) if alpha is None else 1.0 - _inner(alpha)
        et = torch.zeros_like(th) if eta is None else _inner(eta)
        if initial_state is None:
            m0 = q.new_zeros(b, h, dv, dk, dtype=_inner(q).dtype)
            s0 = torch.zeros_like(m0)
        else:
            m0, s0 = _inner(initial_state[0]), _inner(initial_state[1])
        o, m, s = LinearMemoryFunction.apply(_inner(q), _inner(k), _inner(v), th, gm, et, m0, s0, segment)
    return o.to(q.dtype), (m, s)
