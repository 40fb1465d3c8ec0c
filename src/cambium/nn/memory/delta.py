"""The (gated) delta rule's token-by-token recurrence: the reference for the chunkwise form in `delta_kernel.py`.

Legend: B batch, H heads, T tokens, Dk key/query width, Dv value width.
Memory `M` is `[B, H, Dv, Dk]` (it maps a key to a value: `M k ≈ v`). Per token t, with retain gate α_t, inner
learning rate θ_t and γ_t = 1 − α_t:

    e_t = M_{t-1} k_t − v_t
    M_t = γ_t M_{t-1} − θ_t e_t k_tᵀ          (one gradient step on ½‖M k_t − v_t‖² plus L2 decay)
    o_t = M_t q_t                              (read after write)

This is the spec's Delta rule. It differs from the gated delta rule of Yang et al. (fla `gated_delta_rule`), where the
error is taken against the already-decayed memory; the two coincide under θ = β·γ, v = v'/γ (tested).

A reference is a leaf (as fla's `naive.py`): this file imports nothing from a fast path, so a bug there cannot leak
into the numbers the fast paths are tested against. `check_qkv` and `_inner` live here because every path shares them.
"""

from __future__ import annotations

import torch

from cambium.core.errors import ConfigError

__all__ = ["check_qkv", "delta_rule_recurrent"]


def _inner(x: torch.Tensor) -> torch.Tensor:
    """The inner loop's dtype: fp32, or fp64 when the input is fp64 (gradcheck); never bf16/fp16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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
