"""Mamba-2 state-space duality (SSD): the chunked algorithm and its sequential-scan reference.

Dao & Gu, "Transformers are SSMs" (ICML 2024). One head h with a scalar decay A_h < 0 runs the recurrence

    S_t = exp(dt_t · A_h) · S_{t-1} + dt_t · x_t ⊗ B_t        S_t: [P, N]
    y_t = S_t · C_t                                           y_t: [P]

The chunked algorithm splits the sequence into chunks of Q steps: inside a chunk the recurrence is a masked
(decay-weighted) attention-like matmul, across chunks only the [P, N] states are carried, one step per chunk.
Cumulative sums of dt·A and every state decay are computed in fp32 (fp64 if the inputs are fp64) whatever the
input dtype, because in bf16 a long cumsum loses its mantissa and exp() of it turns into NaN deep into training.

Legend: b batch, l sequence length, h heads, p head dim, g groups of B/C (h % g == 0), n state size,
c chunks, q/s positions inside a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ssd_chunked", "ssd_sequential"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None) -> None:
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be [b, l, h] = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be [h] = {(h,)}, got {tuple(A.shape)}")
    if B.ndim != 4 or B.shape[:2] != (b, l) or B.shape != C.shape:
        raise ValueError(
            f"B and C must both be [b, l, g, n] with b, l = {(b, l)}, got {tuple(B.shape)}, {tuple(C.shape)}"
        )
    if h % B.shape[2]:
        raise ValueError(f"heads h={h} must be a multiple of the B/C groups g={B.shape[2]}")
    if initial_state is not None and initial_state.shape != (b, h, p, B.shape[3]):
        raise ValueError(
            f"initial_state must be [b, h, p, n] = {(b, h, p, B.shape[3])}, got {tuple(initial_state.shape)}"
        )


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan.

    x [b, l, h, p], dt [b, l, h] (positive, after softplus), A [h] (negative), B and C [b, l, g, n],
    initial_state [b, h, p, n] or None (zeros). Returns (y [b, l, h, p] in x.dtype, final_state [b, h, p, n] in
    the compute dtype, fp32 or fp64).
    """
    _check(x, dt, A, B, C, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    q = chunk_size
    cdt = _compute_dtype(x, dt, A, B, C)
    pad = (-l) % q
    # Padding with dt = 0 keeps the state untouched (decay exp(0) = 1, input 0), so the final state is exact.
    xdt = (x.to(cdt) * dt.to(cdt).unsqueeze(-1))
    a = dt.to(cdt) * A.to(cdt)
    Bf, Cf = B.to(cdt), C.to(cdt)
    if pad:
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    c = (l + pad) // q
    # One copy of each input into a heads-major, chunk-contiguous layout so that every matmul below is a plain bmm.
    x_c = xdt.view(b, c, q, g, r, p).permute(0, 3, 4, 1, 2, 5).contiguous()  # [b, g, r, c, q, p]
    B_c = Bf.view(b, c, q, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2).contiguous()  # [b, g, 1, c, q, n]
    C_c = Cf.view(b, c, q, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2).contiguous()  # [b, g, 1, c, q, n]
    a_cum = a.view(b, c, q, g, r).permute(0, 3, 4, 1, 2).cumsum(dim=-1)  # [b, g, r, c, q]

    # Intra-chunk (diagonal blocks): decays exp(a_cum[q] - a_cum[s]) for s <= q. Within one chunk the prefix sums
    # stay small enough for their difference to be accurate in fp32.
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp((a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2)).masked_fill(~causal, float("-inf")))
    y = ((C_c @ B_c.transpose(-1, -2)) * decay) @ x_c  # [b, g, r, c, q, p]

    # State contributed by each chunk at its end: sum_s exp(a_cum[-1] - a_cum[s]) x_s ⊗ B_s.
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, g, r, c, q]
    chunk_states = (x_c * to_end.unsqueeze(-1)).transpose(-1, -2) @ B_c  # [b, g, r, c, p, n]

    # Inter-chunk recurrence on the [p, n] states, one step per chunk. A loop over c chunks is linear in c where the
    # chunk-level segment-sum matrix is quadratic, and it keeps the decayed state accumulating in fp32.
    chunk_decay = torch.exp(a_cum[..., -1])  # [b, g, r, c]
    if initial_state is None:
        state = torch.zeros(b, g, r, p, n, dtype=cdt, device=x.device)
    else:
        state = initial_state.to(cdt).view(b, g, r, p, n)
    entering = []
    for k in range(c):
        entering.append(state)
        state = state * chunk_decay[..., k, None, None] + chunk_states[:, :, :, k]
    prev_states = torch.stack(entering, dim=3)  # [b, g, r, c, p, n]

    # Contribution of the state entering each chunk, decayed to each position.
    y = y + (C_c @ prev_states.transpose(-1, -2)) * torch.exp(a_cum).unsqueeze(-1)
    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * q, h, p)[:, :l]
    return y.to(x.dtype), state.reshape(b, h, p, n)


def ssd_sequential(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference: the SSD recurrence one step at a time. Same arguments and results as `ssd_chunked`."""
    _check(x, dt, A, B, C, initial_state)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    cdt = _compute_dtype(x, dt, A, B, C)
    Bh = B.to(cdt).repeat_interleave(h // g, dim=2)  # [b, l, h, n]
    Ch = C.to(cdt).repeat_interleave(h // g, dim=2)
    state = (
        torch.zeros(b, h, p, n, dtype=cdt, device=x.device) if initial_state is None else initial_state.to(cdt)
    )
    xf, dtf, Af = x.to(cdt), dt.to(cdt), A.to(cdt)
    ys = []
    for t in range(l):
        decay = torch.exp(dtf[:, t] * Af)  # [b, h]
        inp = (dtf[:, t, :, None] * xf[:, t]).unsqueeze(-1) * Bh[:, t, :, None, :]  # [b, h, p, n]
        state = state * decay[..., None, None] + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p, dtype=cdt)
    return y.to(x.dtype), state
