"""Causal self-attention: MHA/GQA through SDPA (optionally sliding-window) and DeepSeek's multi-head latent attention.

Legend: B batch, T time, D model width, H query heads, G key/value heads (GQA groups), E head width,
R kv_lora_rank (the latent), P the decoupled RoPE head width, V value head width.
Activations enter and leave as `[B, T, D]`; per-head tensors are `[B, T, H, E]` and go to SDPA as `[B, H, T, E]`.

`attention_reference` and `mla_reference` are the slow, explicit-softmax references that tests compare with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cambium.core.errors import ConfigError
from cambium.nn.norm import RMSNorm
from cambium.nn.rope import RotaryEmbedding, apply_rope_reference

__all__ = ["MLA", "Attention", "attention_reference", "causal_mask", "mla_reference"]


def causal_mask(t: int, window: int | None, device: torch.device | None = None) -> torch.Tensor:
    """Boolean `[T, T]`, True where query i may attend key j: j <= i and, with a window, i - j < window."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    return allowed


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float) -> torch.Tensor:
    """q `[B, T, H, E]`, k `[B, T, G, E]`, v `[B, T, G, V]` → `[B, T, H, V]`."""
    dv, dqk = v.shape[-1], q.shape[-1]
    # SDPA's fused CPU kernel needs equal query/key and value widths (MLA has E + P != V); otherwise it falls back
    # to the unfused math path, ~8x slower at moonlet-cpu shapes. Zero padding changes neither the scores (the
    # scale is explicit) nor the kept output columns.
    if dv < dqk:
        v = F.pad(v, (0, dqk - dv))
    elif dv > dqk:
        q, k = F.pad(q, (0, dv - dqk)), F.pad(k, (0, dv - dqk))
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    gqa = k.shape[1] != q.shape[1]
    if window is None or window >= q.shape[2]:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = causal_mask(q.shape[2], window, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)[..., :dv]


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None, scale: float | None = None
) -> torch.Tensor:
    """Explicit softmax(q kᵀ · scale + mask) v with K/V heads repeated for GQA. Shapes as in `_sdpa`."""
    h, g = q.shape[2], k.shape[2]
    k = k.repeat_interleave(h // g, dim=2)
    v = v.repeat_interleave(h // g, dim=2)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("bthe,bshe->bhts", q, k) * scale
    scores = scores.masked_fill(~causal_mask(q.shape[1], window, q.device), float("-inf"))
    return torch.einsum("bhts,bshv->bthv", scores.softmax(dim=-1), v)


class Attention(nn.Module):
    """Multi-head (n_kv_heads == n_heads) or grouped-query attention with RoPE and an optional sliding window.

    `window=w` lets each query see itself and the w-1 keys before it (sliding-window attention).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        window: int | None = None,
        max_seq_len: int = 2048,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if n_heads % n_kv_heads != 0:
            raise ConfigError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        head_dim = head_dim or dim // n_heads
        if window is not None and window < 1:
            raise ConfigError(f"window={window} must be >= 1 (or None for full causal attention)")
        self.n_heads, self.n_kv_heads, self.head_dim, self.window = n_heads, n_kv_heads, head_dim, window
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.rope = RotaryEmbedding(head_dim, max_seq_len, rope_theta)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Roped q `[B, T, H, E]`, roped k and v `[B, T, G, E]`."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k, v = self.wkv(x).view(b, t, 2, self.n_kv_heads, self.head_dim).unbind(2)
        return self.rope(q), self.rope(k), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, D]` → `[B, T, D]`."""
        q, k, v = self.project(x)
        out = _sdpa(q, k, v, self.window, self.head_dim**-0.5)
        return self.wo(out.flatten(2))


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    Keys and values come from a shared latent c = norm(W_kv_a x)[:R] of rank R (the only per-token K/V state a
    cache would keep), expanded per head by W_kv_b into a no-RoPE key part `[E]` and a value `[V]`. Position enters
    through a decoupled RoPE key `[P]` shared by all heads and a RoPE query part `[P]` per head. Queries optionally go
    through their own low-rank bottleneck (`q_lora_rank`). Scores are scaled by (E + P)^-1/2.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        window: int | None = None,
        max_seq_len: int = 2048,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.n_heads, self.kv_lora_rank, self.window = n_heads, kv_lora_rank, window
        self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        self.q_lora_rank = q_lora_rank
        self.wq: nn.Linear | None = None
        self.wq_a: nn.Linear | None = None
        self.q_norm: RMSNorm | None = None
        self.wq_b: nn.Linear | None = None
        if q_lora_rank is None:
            self.wq = nn.Linear(dim, n_heads * qk_dim, bias=False)
        else:
            self.wq_a = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, norm_eps)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, norm_eps)
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_head_dim, dim, bias=False)
        self.rope = RotaryEmbedding(qk_rope_head_dim, max_seq_len, rope_theta)
        self.scale = qk_dim**-0.5

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, D]` → `[B, T, H, E + P]` (before RoPE)."""
        if self.wq is not None:
            q = self.wq(x)
        else:
            assert self.wq_a is not None and self.q_norm is not None and self.wq_b is not None
            q = self.wq_b(self.q_norm(self.wq_a(x)))
        return q.view(*x.shape[:2], self.n_heads, self.nope + self.rope_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, D]` → `[B, T, D]`."""
        b, t, _ = x.shape
        q_nope, q_pe = self.queries(x).split((self.nope, self.rope_dim), dim=-1)
        latent, k_pe = self.wkv_a(x).split((self.kv_lora_rank, self.rope_dim), dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(b, t, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split((self.nope, self.v_dim), dim=-1)
        k_pe = self.rope(k_pe[:, :, None, :]).expand(b, t, self.n_heads, self.rope_dim)
        q = torch.cat((q_nope, self.rope(q_pe)), dim=-1)
        k = torch.cat((k_nope, k_pe), dim=-1)
        out = _sdpa(q, k, v, self.window, self.scale)
        return self.wo(out.flatten(2))


def mla_reference(m: MLA, x: torch.Tensor, theta: float) -> torch.Tensor:
    """MLA written out from `m`'s weights: materialise per-head K/V from the latent, loop over heads, explicit softmax.

    `theta` is the RoPE base `m` was built with (the reference re-derives the rotation instead of reading m's tables).
    """
    b, t, _ = x.shape
    if m.wq is not None:
        q = x @ m.wq.weight.T
    else:
        assert m.wq_a is not None and m.q_norm is not None and m.wq_b is not None
        qa = x @ m.wq_a.weight.T
        qa = qa / torch.sqrt(qa.pow(2).mean(-1, keepdim=True) + m.q_norm.eps) * m.q_norm.weight
        q = qa @ m.wq_b.weight.T
    q = q.view(b, t, m.n_heads, m.nope + m.rope_dim)
    ckv = x @ m.wkv_a.weight.T
    c, k_rope = ckv[..., : m.kv_lora_rank], ckv[..., m.kv_lora_rank :]
    c = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + m.kv_norm.eps) * m.kv_norm.weight
    k_rope = apply_rope_reference(k_rope[:, :, None, :], theta)[:, :, 0]
    q_rope = apply_rope_reference(q[..., m.nope :].contiguous(), theta)
    w_kv_b = m.wkv_b.weight.view(m.n_heads, m.nope + m.v_dim, m.kv_lora_rank)
    mask = causal_mask(t, m.window, x.device)
    heads = []
    for h in range(m.n_heads):
        k_nope_h = c @ w_kv_b[h, : m.nope].T  # [B, T, E]
        v_h = c @ w_kv_b[h, m.nope :].T  # [B, T, V]
        scores = q[:, :, h, : m.nope] @ k_nope_h.transpose(1, 2) + q_rope[:, :, h] @ k_rope.transpose(1, 2)
        scores = (scores / math.sqrt(m.nope + m.rope_dim)).masked_fill(~mask, float("-inf"))
        probs = scores.exp() / scores.exp().sum(-1, keepdim=True)
        heads.append(probs @ v_h)
    return torch.cat(heads, dim=-1) @ m.wo.weight.T
