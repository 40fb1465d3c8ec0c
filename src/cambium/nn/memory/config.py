"""Config of a memory rule: the four MIRAS knobs, the execution path and their legal combinations.

A combination that is mathematically undefined is rejected when the config is loaded (the Python counterpart of a
compile-time error), with a message naming the knobs and their values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cambium.core.config import ConfigModel

__all__ = ["MemoryConfig"]

Structure = Literal["vector", "matrix", "mlp"]
Bias = Literal["l2", "dot_product", "huber", "lp"]
Retention = Literal["l2", "kl", "elastic_net", "sphere"]
Algorithm = Literal["gd", "momentum", "newton_schulz", "ftrl"]
Execution = Literal["recurrent", "chunkwise_exact", "chunkwise_approx"]


class MemoryConfig(ConfigModel):
    """One memory rule. The named rules (Titans LMM, Delta, Hebbian, ...) are presets in `cambium.nn.memory.presets`."""

    rule: Literal["miras", "trellis"] = Field(
        "miras", description="'miras': memory built from the four knobs; 'trellis': two-pass key/value slot memory"
    )
    structure: Structure = Field(
        "matrix", description="memory structure: vector (m ⊙ k), matrix (W k) or 2-layer MLP (W2 silu(W1 k))"
    )
    bias: Bias = Field(
        "l2", description="attentional bias ℓ(M(k), v): l2 ½‖p−v‖², dot_product −⟨p, v⟩, huber, lp (1/p)‖p−v‖_p^p"
    )
    retention: Retention = Field(
        "l2", description="retention: l2 decay, kl (weights on the simplex), elastic_net (l2 + l1), sphere (unit rows)"
    )
    algorithm: Algorithm = Field(
        "gd", description="inner optimiser: gd, momentum (gd + momentum), newton_schulz (orthogonalised momentum), ftrl"
    )
    read: Literal["linear", "softmax"] = Field(
        "linear", description="read-out: linear o = M(q); softmax o = softmax(W q) over the rows (slots) of W"
    )
    hidden_mult: float = Field(2.0, gt=0, description="MLP memory hidden width as a multiple of the key width")
    huber_delta: float = Field(1.0, gt=0, description="Huber bias: errors beyond ±delta are penalised linearly")
    lp_p: float = Field(3.0, ge=1, description="ℓp bias exponent p (>= 1; the gradient is sign(e)|e|^(p-1))")
    l1: float = Field(0.0, ge=0, description="elastic-net L1 strength λ (soft-threshold θ·λ after each step)")
    ns_steps: int = Field(5, ge=1, description="Newton–Schulz iterations used to orthogonalise the momentum")
    slots: int = Field(32, ge=1, description="trellis: number of key/value memory slots")
    omega_window: int = Field(
        1, ge=1, description="Atlas Omega rule: each step's gradient sums the bias over the last this-many tokens "
        "(1 = the online rule)"
    )
    execution: Execution = Field(
        "recurrent",
        description="recurrent: token by token (reference); chunkwise_exact: WY-form delta rule (exact); "
        "chunkwise_approx: gradients taken at the chunk-start state (an approximation, TNT/titans-pytorch style)",
    )
    chunk_size: int = Field(64, ge=1, description="tokens per chunk for the chunkwise paths")

    @model_validator(mode="after")
    def _knobs_compose(self) -> MemoryConfig:
        knobs = (f"structure={self.structure!r}, bias={self.bias!r}, retention={self.retention!r}, "
                 f"algorithm={self.algorithm!r}")
        if self.rule == "trellis":
            if (self.structure, self.bias, self.retention, self.algorithm) != ("matrix", "l2", "l2", "gd"):
                raise ValueError(f"rule='trellis' has its own two-pass update (matrix slots, l2 bias, l2 decay, gd); "
                                 f"got {knobs}")
            if self.execution != "recurrent" or self.omega_window != 1:
                raise ValueError(f"rule='trellis' runs only with execution='recurrent' and omega_window=1, got "
                                 f"execution={self.execution!r}, omega_window={self.omega_window}")
            return self
        if self.omega_window > 1 and self.execution != "recurrent":
            raise ValueError(f"omega_window={self.omega_window} (Atlas Omega rule) runs with execution='recurrent' "
                             f"only, got execution={self.execution!r}")
        if self.algorithm == "newton_schulz" and self.structure == "vector":
            raise ValueError("algorithm='newton_schulz' orthogonalises a matrix; structure='vector' has none "
                             "(use structure='matrix' or 'mlp')")
        if self.retention == "kl" and self.algorithm not in ("gd", "ftrl"):
            raise ValueError(f"retention='kl' keeps weights on the simplex through the exponentiated-gradient closed "
                             f"form, defined for algorithm='gd' or 'ftrl', not algorithm={self.algorithm!r}")
        if self.retention == "sphere" and self.structure == "mlp":
            raise ValueError("retention='sphere' keeps unit-norm slots (rows); structure='mlp' has no slots "
                             "(use structure='matrix' or 'vector')")
        if self.l1 > 0 and self.retention != "elastic_net":
            raise ValueError(f"l1={self.l1} has no effect with retention={self.retention!r}; "
                             "set retention='elastic_net' or l1=0")
        if self.read == "softmax" and self.structure != "matrix":
            raise ValueError(f"read='softmax' attends over the rows of a matrix memory; "
                             f"got structure={self.structure!r}")
        delta_family = (self.structure, self.bias, self.retention, self.algorithm, self.read)
        if self.execution == "chunkwise_exact" and delta_family != ("matrix", "l2", "l2", "gd", "linear"):
            raise ValueError(f"execution='chunkwise_exact' exists for the (gated) delta rule only: "
                             f"structure='matrix', bias='l2', retention='l2', algorithm='gd', read='linear'; "
                             f"got {knobs}, read={self.read!r}")
        linear_sum = self.retention == "l2" and self.algorithm in ("gd", "momentum") and self.read == "linear"
        if self.execution == "chunkwise_approx" and not linear_sum:
            raise ValueError(f"execution='chunkwise_approx' sums a chunk's updates linearly, which needs "
                             f"retention='l2', algorithm 'gd' or 'momentum' and read='linear'; "
                             f"got {knobs}, read={self.read!r}")
        return self
