"""The exact chunkwise delta rule (WY/UT transform): the chunk forward, its kernel pair and `delta_rule_chunkwise`.

Legend: B batch, H heads, T tokens, Dk key/query width, Dv value width, N chunks, C chunk size.
Same recurrence as the reference in `delta.py` (M_t = γ_t M_{t-1} − θ_t (M_{t-1} k_t − v_t) k_tᵀ, o_t = M_t q_t).
The chunkwise form writes M_t = Γ_t M_0 + Σ_{s≤t} (Γ_t/Γ_s) w_s k_sᵀ inside a chunk (Γ the running product of γ
from the chunk start) and solves the unit-lower-triangular system for the chunk's w's:

    w_t + θ_t Σ_{s<t} (Γ_{t-1}/Γ_s) (k_tᵀ k_s) w_s = θ_t (v_t − Γ_{t-1} M_0 k_t)

so that, with U = (I+L)⁻¹ (θ ⊙ V) and Wk = (I+L)⁻¹ (θ Γ_{t-1} ⊙ K) computed for all chunks at once, only
W = U − Wk M_0ᵀ, the outputs and the chunk-end state need the sequential pass over chunks. It is exact: the same
numbers as the recurrence up to rounding. Decays are handled in log space (log γ clamped at `LOG_GAMMA_MIN`, so a gate
of exactly 1 forgets everything without producing inf − inf).

Kernel pair (`DeltaChunkFunction`): the forward is `prepare_chunks` + `chunk_scan` run without building an autograd
graph; it keeps only the WY factors, the chunk-start states `[B, H, N, Dv, Dk]` and the inputs. The backward walks the
chunks in reverse to carry the state gradient, then differentiates the per-chunk (state-independent) quantities for
all chunks at once: the triangular solve is differentiated with a transposed solve (dR = (I+L)⁻ᵀ dX, dL = −dR Xᵀ),
decays in log space. Checked with `torch.autograd.gradcheck` in float64 and against autograd through the recurrence
(tests/nn/memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cambium.core.errors import ConfigError
from cambium.nn.memory.delta import _inner, check_qkv

__all__ = [
    "LOG_GAMMA_MIN",
    "ChunkTensors",
    "DeltaChunkFunction",
    "chunk_scan",
    "delta_rule_chunkwise",
    "log_retain",
    "prepare_chunks",
]

LOG_GAMMA_MIN = -60.0


def log_retain(alpha: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """log(1 − α) `[B, H, T]`, clamped below at LOG_GAMMA_MIN; zeros when there is no retain gate.

    A gate at (or within 1e-6 of) 1 maps to LOG_GAMMA_MIN with a zero gradient, never to −inf or a NaN gradient."""
    if alpha is None:
        return torch.zeros_like(like)
    near_one = 1.0 - 1e-6
    safe = torch.log1p(-alpha.clamp(max=near_one))
    return torch.where(alpha < near_one, safe, torch.full_like(safe, LOG_GAMMA_MIN)).clamp(min=LOG_GAMMA_MIN)


@dataclass
class ChunkTensors:
    """Per-chunk quantities that do not depend on the carried state, all `[B, H, N, C, ·]` (fp32).

    u `[.., C, Dv]`, wk `[.., C, Dk]`: the WY factors (W = u − wk M_0ᵀ); p `[.., C, C]`: decayed causal q·k scores;
    qg `[.., C, Dk]`: queries scaled by Γ_t; kd `[.., C, Dk]`: keys scaled by Γ_C/Γ_s; ec `[.., 1]`: Γ_C (None
    without decay).
    """

    u: torch.Tensor
    wk: torch.Tensor
    p: torch.Tensor
    qg: torch.Tensor
    kd: torch.Tensor
    ec: torch.Tensor | None


def _to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """`[B, H, T, ...]` → `[B, H, N, C, ...]`, zero-padding T up to a multiple of C."""
    t = x.shape[2]
    pad = (-t) % chunk
    if pad:
        widths = [0, 0] * (x.dim() - 3) + [0, pad]
        x = F.pad(x, widths)
    return x.reshape(*x.shape[:2], -1, chunk, *x.shape[3:])


def decay_matrix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(a_t − b_s) where mask[t, s] is 1, else 0; a, b `[..., C]`, mask `[C, C]` float (0/1).

    Masked-out entries are zeroed before the exp (they could overflow) and after it; no clamp, so gradients pass
    through every kept entry even when rounding makes a_t − b_s slightly positive."""
    return ((a.unsqueeze(-1) - b.unsqueeze(-2)) * mask).exp() * mask


def causal_masks(c: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Strictly-lower and lower-including-diagonal `[C, C]` 0/1 masks in the dtype of `like`."""
    ones = torch.ones(c, c, dtype=like.dtype, device=like.device)
    return ones.tril(-1), ones.tril()


def prepare_chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor, log_gamma: torch.Tensor | None, chunk: int
) -> ChunkTensors:
    """Everything the chunk scan needs that can be computed for all chunks at once (inputs already chunked, fp32).

    q, k `[B, H, N, C, Dk]`, v `[B, H, N, C, Dv]`, theta, log_gamma `[B, H, N, C]` (None: no decay, γ ≡ 1).
    """
    c = q.shape[-2]
    strict, incl = causal_masks(c, q)
    kk = k @ k.mT
    qk = q @ k.mT
    th = theta.unsqueeze(-1)
    if log_gamma is None:
        lower = th * strict * kk
        rhs = torch.cat([th * v, th * k], dim=-1)
        p, qg, kd, ec = incl * qk, q, k, None
    else:
        g = log_gamma.cumsum(-1)
        gp = g - log_gamma
        gc = g[..., -1:]
        lower = th * decay_matrix(gp, g, strict) * kk
        rhs = torch.cat([th * v, (theta * gp.exp()).unsqueeze(-1) * k], dim=-1)
        p, qg, ec = decay_matrix(g, g, incl) * qk, g.exp().unsqueeze(-1) * q, gc.exp()
        kd = (gc - g).exp().unsqueeze(-1) * k
    eye = torch.eye(c, dtype=q.dtype, device=q.device)
    sol = torch.linalg.solve_triangular(eye + lower, rhs, upper=False, unitriangular=True)
    dv = v.shape[-1]
    return ChunkTensors(u=sol[..., :dv], wk=sol[..., dv:], p=p, qg=qg, kd=kd, ec=ec)


def chunk_scan(
    ct: ChunkTensors, state: torch.Tensor, keep_states: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Sequential pass over chunks. state `[B, H, Dv, Dk]`; returns outputs `[B, H, N, C, Dv]`, the final state and
    (if keep_states) the state at the start of every chunk."""
    b, h, n, c, dv = ct.u.shape
    dk = ct.kd.shape[-1]

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b * h, *x.shape[2:])

    # One matmul per chunk serves both W = U − Wk Mᵀ and the inter-chunk read Qg Mᵀ.
    wq, u, p, kd = flat(torch.cat([ct.wk, ct.qg], dim=-2)), flat(ct.u), flat(ct.p), flat(ct.kd)
    ec = None if ct.ec is None else flat(ct.ec)
    m = flat(state)
    inference = not torch.is_grad_enabled()
    out = u.new_empty(b * h, n, c, dv) if inference else None
    outs, starts = [], []
    for i in range(n):
        if keep_states:
            starts.append(m.reshape(b, h, dv, dk))
        both = torch.bmm(wq[:, i], m.mT)
        w = u[:, i] - both[:, :c]
        if out is not None:
            torch.baddbmm(both[:, c:], p[:, i], w, out=out[:, i])
        else:
            outs.append(torch.baddbmm(both[:, c:], p[:, i], w))
        m = torch.baddbmm(m if ec is None else ec[:, i, :, None] * m, w.mT, kd[:, i])
    o = out if out is not None else torch.stack(outs, dim=1)
    return o.view(b, h, n, c, dv), m.reshape(b, h, dv, dk), starts


class DeltaChunkFunction(torch.autograd.Function):
    """apply(q, k `[B, H, T, Dk]`, v `[B, H, T, Dv]`, theta, log_gamma `[B, H, T]`, s0 `[B, H, Dv, Dk]`, chunk)
    → (outputs `[B, H, T, Dv]`, final state `[B, H, Dv, Dk]`)."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        theta: torch.Tensor,
        log_gamma: torch.Tensor | None,
        s0: torch.Tensor,
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, t, _ = q.shape
        dv = v.shape[-1]
        qc, kc, vc, thc = (_to_chunks(x, chunk) for x in (q, k, v, theta))
        lgc = None if log_gamma is None else _to_chunks(log_gamma, chunk)
        ct = prepare_chunks(qc, kc, vc, thc, lgc, chunk)
        needs_grad = any(ctx.needs_input_grad)
        o, state, starts = chunk_scan(ct, s0, keep_states=needs_grad)
        if needs_grad:
            ctx.save_for_backward(qc, kc, vc, thc, lgc, ct.u, ct.wk, torch.stack(starts, dim=2))
        ctx.t = t
        return o.reshape(b, h, -1, dv)[:, :, :t], state

    @staticmethod
    def backward(ctx: Any, d_o: torch.Tensor | None, d_state: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, theta, lg, u, wk, starts = ctx.saved_tensors
        b, h, n, c, dk = q.shape
        dv = v.shape[-1]
        gated = lg is not None
        if lg is None:
            lg = torch.zeros_like(theta)
        strict, incl = causal_masks(c, q)
        g = lg.cumsum(-1)
        gp = g - lg
        gc = g[..., -1:]
        e1 = decay_matrix(gp, g, strict)
        e2 = decay_matrix(g, g, incl)
        kk = k @ k.mT
        p = e2 * (q @ k.mT)
        qg = g.exp().unsqueeze(-1) * q
        edec = (gc - g).exp()
        kd = edec.unsqueeze(-1) * k
        ec = gc.exp()

        if d_o is None:
            d_o = q.new_zeros(b, h, ctx.t, dv)
        do_c = _to_chunks(d_o, c)
        ds = q.new_zeros(b, h, dv, dk) if d_state is None else d_state
        du = torch.empty_like(u)
        dwk = torch.empty_like(wk)
        dp = torch.empty_like(p)
        dqg = torch.empty_like(qg)
        dkd = torch.empty_like(kd)
        dec = q.new_empty(b, h, n)
        for i in reversed(range(n)):
            s0 = starts[:, :, i]
            w = u[:, :, i] - wk[:, :, i] @ s0.mT
            do_i = do_c[:, :, i]
            dw = kd[:, :, i] @ ds.mT + p[:, :, i].mT @ do_i
            dkd[:, :, i] = w @ ds
            dec[:, :, i] = (ds * s0).sum((-1, -2))
            dqg[:, :, i] = do_i @ s0
            dp[:, :, i] = do_i @ w.mT
            du[:, :, i] = dw
            dwk[:, :, i] = -(dw @ s0)
            ds = ec[:, :, i, :, None] * ds + do_i.mT @ qg[:, :, i] - dw.mT @ wk[:, :, i]

        eye = torch.eye(c, dtype=q.dtype, device=q.device)
        lower = theta.unsqueeze(-1) * e1 * kk
        sol = torch.cat([u, wk], dim=-1)
        d_rhs = torch.linalg.solve_triangular((eye + lower).mT, torch.cat([du, dwk], dim=-1), upper=True,
                                              unitriangular=True)
        d_lower = -(d_rhs @ sol.mT) * strict
        d_vth, d_kth = d_rhs[..., :dv], d_rhs[..., dv:]

        d_kk = d_lower * theta.unsqueeze(-1) * e1
        d_theta = (d_lower * e1 * kk).sum(-1)
        gl = d_lower * lower
        d_gp = gl.sum(-1)
        d_g = -gl.sum(-2)
        d_k = (d_kk + d_kk.mT) @ k

        d_qk = dp * e2
        gp2 = dp * p
        d_g = d_g + gp2.sum(-1) - gp2.sum(-2)
        d_q = d_qk @ k
        d_k = d_k + d_qk.mT @ q

        d_v = theta.unsqueeze(-1) * d_vth
        d_theta = d_theta + (d_vth * v).sum(-1)
        egp = gp.exp()
        d_k = d_k + (theta * egp).unsqueeze(-1) * d_kth
        ck = (d_kth * k).sum(-1)
        d_theta = d_theta + ck * egp
        d_gp = d_gp + ck * theta * egp

        d_q = d_q + g.exp().unsqueeze(-1) * dqg
        d_g = d_g + (dqg * qg).sum(-1)

        d_k = d_k + edec.unsqueeze(-1) * dkd
        hk = (dkd * kd).sum(-1)
        d_gc = hk.sum(-1) + dec * ec.squeeze(-1)
        d_g = d_g - hk
        d_g[..., -1] += d_gc
        d_g = d_g + d_gp
        d_lg = d_g.flip(-1).cumsum(-1).flip(-1) - d_gp

        t = ctx.t

        def unchunk(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, h, n * c, *x.shape[4:])[:, :, :t]

        return unchunk(d_q), unchunk(d_k), unchunk(d_v), unchunk(d_theta), unchunk(d_lg) if gated else None, ds, None


def delta_rule_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "kernel",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact chunkwise delta rule; same arguments and results as `delta_rule_recurrent`.

    q, k: `[B, H, T, Dk]`, v: `[B, H, T, Dv]`, theta/alpha: `[B, H, T]`, initial_state `[B, H, Dv, Dk]`.
    backend "kernel" uses the fused forward with the analytic backward (`DeltaChunkFunction`); "autograd"
    differentiates through the same forward with torch autograd. The inner loop is fp32 under any autocast.
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} must be >= 1")
    b, h, t, dk, dv = check_qkv(q, k, v, theta, alpha)
    with torch.autocast(q.device.type, enabled=False):
        lg = None if alpha is None else log_retain(_inner(alpha), _inner(theta))
        s0 = q.new_zeros(b, h, dv, dk, dtype=_inner(q).dtype) if initial_state is None else _inner(initial_state)
        args = (_inner(q), _inner(k), _inner(v), _inner(theta), lg)
        if backend == "kernel":
            o, state = DeltaChunkFunction.apply(*args, s0, chunk_size)
        elif backend == "autograd":
            chunks = [_to_chunks(x, chunk_size) for x in args[:4]]
            qc, kc, vc, thc = chunks[:4]
            lgc = None if lg is None else _to_chunks(lg, chunk_size)
            o, state, _ = chunk_scan(prepare_chunks(qc, kc, vc, thc, lgc, chunk_size), s0)
            o = o.reshape(b, h, -1, dv)[:, :, :t]
        else:
            raise ConfigError(f"backend={backend!r} is not one of 'kernel', 'autograd'")
    return o.to(q.dtype), state
