"""The named memory rules as MIRAS knob presets.

Notation: memory M (parameters φ), key k, value v, query q (k, q L2-normalised), e = M(k) − v, ∇ = ∇_φ ℓ(M(k), v);
gates per token: retain α = σ(·) (memory keeps the fraction 1 − α), momentum η = σ(·), inner learning rate
θ = softplus(·). Every rule reads after it writes: o = read(M_t, q_t). Keyword overrides are passed to the config,
e.g. `delta(execution="chunkwise_exact", chunk_size=32)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cambium.nn.memory.config import MemoryConfig

__all__ = ["PRESETS", "delta", "hebbian", "lattice_osr", "memora", "moneta", "titans_lmm", "trellis", "yaad"]


def titans_lmm(**overrides: Any) -> MemoryConfig:
    """Titans long-term memory: 2-layer MLP, l2 bias, momentum ("surprise"), L2 decay.

        S_t = η_t S_{t-1} − θ_t ∇ℓ(M_{t-1}; k_t, v_t),   M_t = (1 − α_t) M_{t-1} + S_t,   ℓ = ½‖M(k) − v‖²
    """
    return MemoryConfig(**{"structure": "mlp", "bias": "l2", "retention": "l2", "algorithm": "momentum", **overrides})


def delta(**overrides: Any) -> MemoryConfig:
    """Delta rule (gated): matrix memory, l2 bias, L2 decay, plain gd. Exact chunkwise form exists.

        M_t = (1 − α_t) M_{t-1} − θ_t e_t k_tᵀ,   e_t = M_{t-1} k_t − v_t
    """
    return MemoryConfig(**{"structure": "matrix", "bias": "l2", "retention": "l2", "algorithm": "gd", **overrides})


def hebbian(**overrides: Any) -> MemoryConfig:
    """Hebbian (gated linear attention): matrix memory, dot-product bias ℓ = −⟨M k, v⟩, L2 decay, gd.

        M_t = (1 − α_t) M_{t-1} + θ_t v_t k_tᵀ        (θ ≡ 1 gives the spec's M = (1 − α)M + v kᵀ)
    """
    return MemoryConfig(**{"structure": "matrix", "bias": "dot_product", "retention": "l2", "algorithm": "gd",
                           **overrides})


def moneta(**overrides: Any) -> MemoryConfig:
    """MONETA: 2-layer MLP, ℓp attentional bias (p = 3 by default), L2 retention, gd.

        φ_t = (1 − α_t) φ_{t-1} − θ_t ∇_φ (1/p)‖M_φ(k_t) − v_t‖_p^p,   ∂ℓ/∂M(k) = sign(e) ⊙ |e|^(p−1)
    """
    return MemoryConfig(**{"structure": "mlp", "bias": "lp", "lp_p": 3.0, "retention": "l2", "algorithm": "gd",
                           **overrides})


def yaad(**overrides: Any) -> MemoryConfig:
    """YAAD: 2-layer MLP, Huber bias (robust to outlier values), local + global retention, gd.

        φ_t = argmin_φ ⟨∇, φ⟩ + ‖φ − φ_{t-1}‖²/(2θ_t) [local] + α_t‖φ‖²/(2θ_t) [global]
            ≈ (1 − α_t) φ_{t-1} − θ_t ∇_φ Huber_δ(M_φ(k_t) − v_t),   ∂ℓ/∂M(k) = clip(e, −δ, δ)
    """
    return MemoryConfig(**{"structure": "mlp", "bias": "huber", "retention": "l2", "algorithm": "gd", **overrides})


def memora(**overrides: Any) -> MemoryConfig:
    """MEMORA: 2-layer MLP whose weight rows stay on the probability simplex (KL retention), l2 bias, gd.

        W_t = softmax_row((1 − α_t) log W_{t-1} − θ_t ∇_W ℓ)      (exponentiated gradient; the paper's α is 1 − α)
    """
    return MemoryConfig(**{"structure": "mlp", "bias": "l2", "retention": "kl", "algorithm": "gd", **overrides})


def lattice_osr(**overrides: Any) -> MemoryConfig:
    """Lattice (orthogonal state recurrence): the rows of W `[Dv, Dk]` are unit-norm slots; dot-product bias pulls
    slot i toward k weighted by v_i; each slot moves only orthogonally to itself, then is renormalised; softmax read.

        u_i = θ_t v_{t,i} k_t,   u_i⊥ = u_i − (u_i·w_i) w_i,   w_i ← normalise((1 − α_t) w_i + u_i⊥),
        o_t = softmax(W_t q_t)                              (a distribution over the slots)
    """
    return MemoryConfig(**{"structure": "matrix", "bias": "dot_product", "retention": "sphere", "algorithm": "gd",
                           "read": "softmax", **overrides})


def trellis(**overrides: Any) -> MemoryConfig:
    """Trellis: two-pass key/value compression into m slots (see `rules.trellis_recurrent`).

        a = softmax(K k);  K ← (1 − α)K − θ diag(a)(K − 1 kᵀ);  c = softmax(K k);  V ← (1 − α)V − θ (V c − v) cᵀ;
        o = V softmax(K q)
    """
    return MemoryConfig(**{"rule": "trellis", **overrides})


PRESETS: dict[str, Callable[..., MemoryConfig]] = {
    "titans_lmm": titans_lmm,
    "delta": delta,
    "hebbian": hebbian,
    "moneta": moneta,
    "yaad": yaad,
    "memora": memora,
    "lattice_osr": lattice_osr,
    "trellis": trellis,
}
