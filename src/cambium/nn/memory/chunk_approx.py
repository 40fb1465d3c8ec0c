"""Chunkwise-parallel memory with gradients taken at the chunk-start state — an APPROXIMATION (TNT/titans-pytorch).

Legend: B batch, H heads, T tokens, N chunks, C chunk size, Dk/Dv key/value widths, Dh MLP hidden width.
For retention='l2' and algorithm 'gd' or 'momentum' the recurrence

    S_t = η_t S_{t-1} − θ_t ∇_t,   φ_t = γ_t φ_{t-1} + S_t          (gd: η ≡ 0)

is linear in the gradients, so inside a chunk φ_t = Γ_t φ_0 + B_t S_0 − Σ_{s≤t} c_{t,s} θ_s ∇_s with scalar
coefficients (Γ_t = Π γ, B_t = γ_t B_{t-1} + Π η, c_{t,s} = γ_t c_{t-1,s} + Π_{r=s+1..t} η_r). The approximation is
∇_s := ∇ℓ(φ_0; k_s, v_s) — every gradient in the chunk is taken at the chunk-start memory, so the chunk's gradients
are computed in one batched pass. Each per-token gradient is rank one per layer (u_s x_sᵀ), so reads of the
intermediate memories are linear-attention style sums and no per-token memory is materialised. With C = 1 it is the
recurrence exactly; its error grows with C and θ (`error_table`, run `python -m cambium.nn.memory.chunk_approx`).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from cambium.core.errors import ConfigError
from cambium.nn.memory import knobs
from cambium.nn.memory.config import MemoryConfig
from cambium.nn.memory.delta import _inner, check_qkv
from cambium.nn.memory.delta_kernel import LOG_GAMMA_MIN, _to_chunks, causal_masks, decay_matrix, log_retain
from cambium.nn.memory.rules import MemoryState, _check_state, miras_recurrent

__all__ = ["chunk_approx_forward", "error_table", "format_table"]


def _coefficients(
    log_gamma: torch.Tensor, log_eta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For per-chunk log gates `[B, H, N, C]` (log_eta None: gd, no momentum): Γ `[.., C]`, B `[.., C]`,
    c `[.., C, C]` (row t, column s), and the chunk-end momentum coefficients P_C `[..]`, d_{C,s} `[.., C]`.

    Closed forms: with Dγ[t, r] = Π_{j=r+1..t} γ_j and Dη[r, s] = Π_{j=s+1..r} η_j (lower triangular),
    c = Dγ Dη, P_t = Π_{j≤t} η_j and B = Dγ P."""
    c_len = log_gamma.shape[-1]
    _, incl = causal_masks(c_len, log_gamma)
    g_gamma = log_gamma.cumsum(-1)
    d_gamma = decay_matrix(g_gamma, g_gamma, incl)
    if log_eta is None:
        zeros = torch.zeros_like(log_gamma)
        eye = torch.eye(c_len, dtype=log_gamma.dtype, device=log_gamma.device)
        return g_gamma.exp(), zeros, d_gamma, zeros[..., 0], eye[-1].expand_as(log_gamma)
    g_eta = log_eta.cumsum(-1)
    d_eta = decay_matrix(g_eta, g_eta, incl)
    p_all = g_eta.exp()
    b_all = (d_gamma @ p_all.unsqueeze(-1)).squeeze(-1)
    return g_gamma.exp(), b_all, d_gamma @ d_eta, p_all[..., -1], d_eta[..., -1, :]


def _layer_read(w0: torch.Tensor, s0: torch.Tensor, u: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
                a: torch.Tensor, b: torch.Tensor, ct: torch.Tensor) -> torch.Tensor:
    """y_t = W_t z_t for a layer W_t = A_t W_0 + B_t S_0 − Σ_s ct[t, s] u_s x_sᵀ (ct already holds c·θ).
    w0, s0 `[B, H, O, I]`, u `[B, H, C, O]`, x, z `[B, H, C, I]`, a, b `[B, H, C]`, ct `[B, H, C, C]`."""
    base = a.unsqueeze(-1) * (z @ w0.mT) + b.unsqueeze(-1) * (z @ s0.mT)
    return base - (ct * (z @ x.mT)) @ u


def _layer_end(w0: torch.Tensor, s0: torch.Tensor, u: torch.Tensor, x: torch.Tensor, a_end: torch.Tensor,
               b_end: torch.Tensor, c_end: torch.Tensor, p_end: torch.Tensor,
               d_end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-end (W, S) of one layer; c_end, d_end `[B, H, C]` already hold the θ factor."""
    w = a_end[..., None, None] * w0 + b_end[..., None, None] * s0 - (c_end.unsqueeze(-1) * u).mT @ x
    s = p_end[..., None, None] * s0 - (d_end.unsqueeze(-1) * u).mT @ x
    return w, s


def chunk_approx_forward(
    cfg: MemoryConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor | None = None,
    eta: torch.Tensor | None = None,
    initial: MemoryState | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, MemoryState]:
    """Chunk-start-gradient approximation of `miras_recurrent` (same arguments; chunk_size defaults to the config's).

    q, k `[B, H, T, Dk]` L2-normalised, v `[B, H, T, Dv]`, gates `[B, H, T]`. Needs retention='l2' and algorithm
    'gd' or 'momentum' (the config validator enforces it for execution='chunkwise_approx')."""
    if cfg.rule != "miras" or cfg.retention != "l2" or cfg.algorithm not in ("gd", "momentum") or cfg.read != "linear":
        raise ConfigError(f"the chunk-start approximation needs rule='miras', retention='l2', algorithm 'gd' or "
                          f"'momentum', read='linear'; got rule={cfg.rule!r}, retention={cfg.retention!r}, "
                          f"algorithm={cfg.algorithm!r}, read={cfg.read!r}")
    chunk = cfg.chunk_size if chunk_size is None else chunk_size
    if chunk < 1:
        raise ConfigError(f"chunk_size={chunk} must be >= 1")
    b, h, t, dk, dv = check_qkv(q, k, v, theta, alpha, eta)
    with torch.autocast(q.device.type, enabled=False):
        qf, kf, vf = _inner(q), _inner(k), _inner(v)
        th = _inner(theta)
        lg = log_retain(None if alpha is None else _inner(alpha), th)
        log_eta = None
        if cfg.algorithm == "momentum":
            et = torch.zeros_like(th) if eta is None else _inner(eta)
            # Momentum gates of exactly 0 are legal (no momentum): clamp inside the log for a finite gradient.
            log_eta = _to_chunks(torch.log(et.clamp(min=math.exp(LOG_GAMMA_MIN))), chunk)
        params, opt = _check_state(cfg, initial, b, h, dk, dv, qf.dtype)
        moms = opt if opt else tuple(torch.zeros_like(p) for p in params)
        qc, kc, vc, thc = (_to_chunks(x, chunk) for x in (qf, kf, vf, th))
        # Padded tokens keep memory and momentum unchanged: γ = η = 1 (log 0), θ = 0.
        a_all, b_all, c_all, p_end, d_end = _coefficients(_to_chunks(lg, chunk), log_eta)
        ct_all = c_all * thc.unsqueeze(-2)
        outs = []
        for n in range(qc.shape[2]):
            qn, kn, vn = qc[:, :, n], kc[:, :, n], vc[:, :, n]
            an, bn, ctn = a_all[:, :, n], b_all[:, :, n], ct_all[:, :, n]
            c_end, dn = ctn[..., -1, :], d_end[:, :, n] * thc[:, :, n]
            if cfg.structure == "vector":
                m0, s0 = params[0].unsqueeze(-2), moms[0].unsqueeze(-2)
                g = knobs.bias_grad(cfg, m0 * kn, vn)
                base = an.unsqueeze(-1) * m0 + bn.unsqueeze(-1) * s0
                outs.append((base - ctn @ (g * kn)) * qn)
                m_new = (an[..., -1, None] * params[0] + bn[..., -1, None] * moms[0]
                         - (c_end.unsqueeze(-1) * g * kn).sum(-2))
                s_new = p_end[:, :, n, None] * moms[0] - (dn.unsqueeze(-1) * g * kn).sum(-2)
                params, moms = (m_new,), (s_new,)
            elif cfg.structure == "matrix":
                g = knobs.bias_grad(cfg, kn @ params[0].mT, vn)
                outs.append(_layer_read(params[0], moms[0], g, kn, qn, an, bn, ctn))
                w, s = _layer_end(params[0], moms[0], g, kn, an[..., -1], bn[..., -1], c_end, p_end[:, :, n], dn)
                params, moms = (w,), (s,)
            else:
                w1, w2 = params
                pre = kn @ w1.mT
                sig = torch.sigmoid(pre)
                act = pre * sig
                g = knobs.bias_grad(cfg, act @ w2.mT, vn)
                hid = (g @ w2) * sig * (1.0 + pre * (1.0 - sig))
                pre_q = _layer_read(w1, moms[0], hid, kn, qn, an, bn, ctn)
                outs.append(_layer_read(w2, moms[1], g, act, F.silu(pre_q), an, bn, ctn))
                ends = [_layer_end(w, s, u, x, an[..., -1], bn[..., -1], c_end, p_end[:, :, n], dn)
                        for w, s, u, x in ((w1, moms[0], hid, kn), (w2, moms[1], g, act))]
                params, moms = (ends[0][0], ends[1][0]), (ends[0][1], ends[1][1])
        o = torch.cat(outs, dim=2)[:, :, :t]
    return o.to(q.dtype), MemoryState(params, moms if cfg.algorithm == "momentum" else ())


def error_table(
    cfg: MemoryConfig,
    chunk_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    thetas: tuple[float, ...] = (0.003, 0.01, 0.03),
    b: int = 2,
    h: int = 2,
    t: int = 256,
    dk: int = 32,
    dv: int = 32,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Relative error ‖o_approx − o_ref‖ / ‖o_ref‖ of the outputs (and of the final memory) against the recurrence,
    for each mean inner learning rate θ and chunk size, on random L2-normalised keys/queries with unit-variance values,
    α ~ U(0, 0.02), η ~ U(0.5, 0.9), θ ~ U(0, 2·mean θ). Returns one row per (theta, chunk_size)."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, h, t, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(b, h, t, dk, generator=gen), dim=-1)
    v = torch.randn(b, h, t, dv, generator=gen)
    jitter = torch.rand(b, h, t, generator=gen)
    alpha = 0.02 * jitter
    eta = 0.5 + 0.4 * jitter
    init = knobs.init_params(cfg, b, h, dk, dv, generator=gen)
    rows = []
    with torch.no_grad():
        for theta_mean in thetas:
            theta = theta_mean * 2.0 * torch.rand(b, h, t, generator=gen)
            state0 = MemoryState(init, ())
            o_ref, ref = miras_recurrent(cfg, q, k, v, theta, alpha, eta, state0)
            for c in chunk_sizes:
                o, approx = chunk_approx_forward(cfg, q, k, v, theta, alpha, eta, state0, chunk_size=c)
                rel_o = float((o - o_ref).norm() / o_ref.norm())
                rel_m = max(float((a - r).norm() / r.norm()) for a, r in zip(approx.params, ref.params, strict=True))
                rows.append({"theta": theta_mean, "chunk_size": c, "rel_err_outputs": rel_o, "rel_err_memory": rel_m})
    return rows


def format_table(rows: list[dict[str, float]]) -> str:
    """Markdown table: one row per θ, one column per chunk size, cells 'outputs / memory' relative errors."""
    chunks = sorted({int(r["chunk_size"]) for r in rows})
    thetas = sorted({r["theta"] for r in rows})
    lines = ["| mean θ | " + " | ".join(f"C={c}" for c in chunks) + " |", "|---" * (len(chunks) + 1) + "|"]
    for th in thetas:
        cells = [f"{r['rel_err_outputs']:.1e} / {r['rel_err_memory']:.1e}" for c in chunks for r in rows
                 if r["theta"] == th and r["chunk_size"] == c]
        lines.append(f"| {th:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from cambium.nn.memory import presets

    parser = argparse.ArgumentParser(description="error of the chunk-start-gradient approximation vs chunk size")
    parser.add_argument("--preset", default="titans_lmm", choices=sorted(presets.PRESETS))
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args(argv)
    cfg = presets.PRESETS[args.preset]()
    print(f"preset {args.preset}: relative error of outputs / final memory vs the recurrence (T={args.tokens})")
    print(format_table(error_table(cfg, t=args.tokens)))


if __name__ == "__main__":
    main()
