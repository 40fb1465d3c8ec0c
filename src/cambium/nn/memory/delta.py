"""The (gated) delta rule: token-by-token recurrence and the exact chunkwise form (WY/UT transform).

Legend: B batch, H heads, T tokens, Dk key/query width, Dv value width, N chunks, C chunk size.
Memory `M` is `[B, H, Dv, Dk]` (it maps a key to a value: `M k ≈ v`). Per token t, with retain gate α_t, inner
learning rate θ_t and γ_t = 1 − α_t:

    e_t = M_{t-1} k_t − v_t
    M_t = γ_t M_{t-1} − θ_t e_t k_tᵀ          (one gradient step on ½‖M k_t − v_t‖² plus L2 decay)
    o_t = M_t q_t                              (read after write)

This is the spec's Delta rule. It differs from the gated delta rule of Yang et al. (fla `gated_delta_rule`), where the
error is taken against the already-decayed memory; the two coincide under θ = β·γ, v = v'/γ (tested).

The chunkwise form writes M_t = Γ_t M_0 + Σ_{s≤t} (Γ_t/Γ_s) w_s k_sᵀ inside a chunk (Γ the running product of γ
from the chunk start) and solves the unit-lower-triangular system for the chunk's w's:

    w_t + θ_t Σ_{s<t} (Γ_{t-1}/Γ_s) (k_tᵀ k_s) w_s = θ_t (v_t − Γ_{t-1} M_0 k_t)

so that, with U = (I+L)⁻¹ (θ ⊙ V) and Wk = (I+L)⁻¹ (θ Γ_{t-1} ⊙ K) computed for all chunks at once, only
W = U − Wk M_0ᵀ, the outputs and the chunk-end state need the sequential pass over chunks. It is exact: the same
numbers as the recurrence up to rounding. Decays are handled in log space (log γ clamped at `LOG_GAMMA_MIN`, so a gate
of exactly 1 forgets everything without producing inf − inf).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cambium.core.errors import ConfigError

__all__ = [
    "LOG_GAMMA_MIN",
    "ChunkTensors",
    "check_qkv",
    "chunk_scan",
    "delta_rule_chunkwise",
    "delta_rule_recurrent",
    "log_retain",
    "prepare_chunks",
]

LOG_GAMMA_MIN = -60.0


def _inner(x: torch.Tensor) -> torch.Tensor:
    """The inner loop's dtype: fp32, or fp64 when the input is fp64 (gradcheck); never bf16/fp16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def log_retain(alpha: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """log(1 − α) `[B, H, T]`, clamped below at LOG_GAMMA_MIN; zeros when there is no retain gate.

    A gate at (or within 1e-6 of) 1 maps to LOG_GAMMA_MIN with a zero gradient, never to −inf or a NaN gradient."""
    if alpha is None:
        return torch.zeros_like(like)
    near_one = 1.0 - 1e-6
    safe = torch.log1p(-alpha.clamp(max=near_one))
    return torch.where(alpha < near_one, safe, torch.full_like(safe, LOG_GAMMA_MIN)).clamp(min=LOG_GAMMA_MIN)


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *gates: torch.Tensor | None
) -> tuple[int, int, int, int, int]:
    """Validate `[B, H, T, Dk]` queries/keys, `[B, H, T, Dv]` values and `[B, H, T]` gates; return B, H, T, Dk, Dv."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ConfigError(f"queries {tuple(q.shape)} and keys {tuple(k.shape)} must both be [B, H, T, Dk]")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ConfigError(f"values {tuple(v.shape)} must be [B, H, T, Dv] with B, H, T of the keys {tuple(k.shape)}")
    for gate in gates:
        if gate is not None and gate.shape != q.shape[:3]:
            raise ConfigError(f"gate of shape {tuple(gate.shape)} must be [B, H, T] = {tuple(q.shape[:3])}")
    b, h, t, dk = q.shape
    return b, h, t, dk, v.shape[-1]


def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference recurrence, one token at a time, in fp32 whatever the input dtype (fp64 stays fp64).

    q, k: `[B, H, T, Dk]` (callers pass L2-normalised keys/queries), v: `[B, H, T, Dv]`, theta/alpha: `[B, H, T]`,
    initial_state: `[B, H, Dv, Dk]`. Returns outputs `[B, H, T, Dv]` (input dtype) and the final state (fp32).
    """
    b, h, t, dk, dv = check_qkv(q, k, v, theta, alpha)
    with torch.autocast(q.device.type, enabled=False):
        qf, kf, vf, th = _inner(q), _inner(k), _inner(v), _inner(theta)
        gamma = None if alpha is None else 1.0 - _inner(alpha)
        m = q.new_zeros(b, h, dv, dk, dtype=_inner(q).dtype) if initial_state is None else _inner(initial_state)
        outs = []
        for i in range(t):
            k_i = kf[:, :, i]
            err = (m @ k_i.unsqueeze(-1)).squeeze(-1) - vf[:, :, i]
            step = th[:, :, i, None, None] * err.unsqueeze(-1) * k_i.unsqueeze(-2)
            m = (m if gamma is None else gamma[:, :, i, None, None] * m) - step
            outs.append((m @ qf[:, :, i].unsqueeze(-1)).squeeze(-1))
        o = torch.stack(outs, dim=2)
    return o.to(q.dtype), m


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
            from cambium.nn.memory.delta_kernel import DeltaChunkFunction

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
