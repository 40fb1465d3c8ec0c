"""Kernel pair for the exact chunkwise delta rule: fused forward + analytic backward.

The forward is `prepare_chunks` + `chunk_scan` from `delta.py` run without building an autograd graph; it keeps only
the WY factors, the chunk-start states `[B, H, N, Dv, Dk]` and the inputs. The backward walks the chunks in reverse
to carry the state gradient, then differentiates the per-chunk (state-independent) quantities for all chunks at once:
the triangular solve is differentiated with a transposed solve (dR = (I+L)⁻ᵀ dX, dL = −dR Xᵀ), decays in log space.
Checked with `torch.autograd.gradcheck` in float64 and against autograd through the recurrence (tests/nn/memory).

Legend: B batch, H heads, T tokens, N chunks, C chunk size, Dk key width, Dv value width.
"""

from __future__ import annotations

from typing import Any

import torch

from cambium.nn.memory.delta import _to_chunks, causal_masks, chunk_scan, decay_matrix, prepare_chunks

__all__ = ["DeltaChunkFunction"]


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
