"""DeepSeek-shaped decoder-only MoE language model built from `cambium.nn` blocks.

Legend: B batch, T time, D model width, V vocabulary, E routed experts.
Block i: x += attn(norm(x)); x += ffn(norm(x)), where ffn is a dense SwiGLU for i < n_dense_layers and the MoE
layer after. The MoE layers' auxiliary losses and expert loads come back with the logits in `ModelOutput`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cambium.core.errors import ConfigError, DataError
from cambium.moe.config import ModelConfig
from cambium.nn.attention import MLA, Attention
from cambium.nn.mlp import SwiGLU
from cambium.nn.moe import MoE, MoEAux
from cambium.nn.norm import RMSNorm

__all__ = ["Block", "MoETransformer", "ModelOutput", "ParamKind", "flops_per_token", "lm_loss"]

ParamKind = Literal["embedding", "dense", "router", "expert"]


@dataclass(frozen=True)
class ModelOutput:
    """logits `[B, T, V]`; aux_loss: scalar sum of the MoE layers' auxiliary losses (part of the training loss);
    moe: one MoEAux per MoE layer, in depth order (loads `[E]` for bias updates and statistics)."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    moe: list[MoEAux]


class Block(nn.Module):
    """Pre-norm transformer block. `[B, T, D]` → (`[B, T, D]`, MoEAux or None for a dense block)."""

    def __init__(self, cfg: ModelConfig, dense: bool) -> None:
        super().__init__()
        a = cfg.attention
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn: MLA | Attention
        if a.kind == "mla":
            self.attn = MLA(
                cfg.dim, a.n_heads, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
                qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, q_lora_rank=a.q_lora_rank,
                window=a.window, max_seq_len=cfg.max_seq_len, rope_theta=a.rope_theta, norm_eps=cfg.norm_eps,
            )
        else:
            self.attn = Attention(
                cfg.dim, a.n_heads, a.n_kv_heads, a.head_dim, window=a.window, max_seq_len=cfg.max_seq_len,
                rope_theta=a.rope_theta,
            )
        self.ffn: SwiGLU | MoE
        if dense:
            self.ffn = SwiGLU(cfg.dim, cfg.dense_hidden)
        else:
            m = cfg.moe
            assert m is not None  # the config requires it when a layer is MoE
            self.ffn = MoE(
                cfg.dim, m.n_routed_experts, m.top_k, m.expert_hidden, n_shared_experts=m.n_shared_experts,
                score_func=m.score_func, route_scale=m.route_scale, n_groups=m.n_groups, topk_groups=m.topk_groups,
                seq_aux_coef=m.seq_aux_coef, z_loss_coef=m.z_loss_coef, bias_clamp=m.bias_clamp,
                backend=m.backend, lowp=None if m.lowp == "none" else m.lowp,
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux | None]:
        x = x + self.attn(self.attn_norm(x))
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(self.ffn_norm(x))
            return x + y, aux
        return x + self.ffn(self.ffn_norm(x)), None


class MoETransformer(nn.Module):
    """tokens `[B, T]` int64 → ModelOutput with logits `[B, T, V]`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, dense=i < cfg.n_dense_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix; the projections that write into the residual stream (attention
        output, SwiGLU/expert down) get init_std/√(2·n_layers) so the residual variance stays O(1) with depth."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim < 2:
                continue  # norm weights stay 1
            leaf = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name.rsplit(".", 2)[-2]
            nn.init.normal_(p, std=out_std if leaf in ("wo", "w2") else std)

    def forward(self, tokens: torch.Tensor) -> ModelOutput:
        if tokens.ndim != 2:
            raise DataError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ConfigError(f"sequence length {tokens.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens)
        auxes: list[MoEAux] = []
        for block in self.blocks:
            x, aux = block(x)
            if aux is not None:
                auxes.append(aux)
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        aux_loss = sum((a.loss for a in auxes), start=x.new_zeros((), dtype=torch.float32))
        return ModelOutput(logits, aux_loss, auxes)

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    @torch.no_grad()
    def update_router_biases(self, loads: Sequence[torch.Tensor], gamma: float) -> None:
        """Aux-loss-free balancing step, called by the trainer after each optimiser step with the step's loads
        (one `[E]` per MoE layer, summed over micro-batches and ranks)."""
        layers = self.moe_layers()
        if len(loads) != len(layers):
            raise ConfigError(f"got {len(loads)} load vectors for {len(layers)} MoE layers")
        for layer, load in zip(layers, loads, strict=True):
            layer.update_bias(load, gamma)

    def param_kind(self, name: str) -> ParamKind:
        """Which optimiser group a parameter belongs to: embedding (and untied output head), router, routed expert
        weights, or dense (attention, norms, dense and shared-expert SwiGLUs)."""
        if name.startswith(("embed.", "lm_head.")):
            return "embedding"
        if ".router." in name:
            return "router"
        if name.endswith((".ffn.w13", ".ffn.w2")):
            return "expert"
        return "dense"

    def num_params(self, active: bool = False, embeddings: bool = True) -> int:
        """Parameter count; with `active`, routed experts count only top_k of n_routed_experts (per token);
        without `embeddings`, the input embedding and output head are left out (as model cards usually count)."""
        total = 0
        for name, p in self.named_parameters():
            if not embeddings and self.param_kind(name) == "embedding":
                continue
            n = p.numel()
            if active and self.param_kind(name) == "expert":
                n = _active_share(self.cfg, n)
            total += n
        return total


def _active_share(cfg: ModelConfig, n: int) -> int:
    """Of `n` routed-expert parameters, those a token passes through: top_k of n_routed_experts."""
    assert cfg.moe is not None  # expert parameters exist only in MoE layers
    return n * cfg.moe.top_k // cfg.moe.n_routed_experts


def flops_per_token(model: MoETransformer, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`, for MFU.

    6 × (matmul weights a token passes through: routed experts count K of E, the output head counts, the embedding
    lookup does not) + 6 × n_layers × n_heads × (query-key width + value width) × seq_len for the attention scores
    and the weighted sum (full T×T, as SDPA computes it; the causal half is not subtracted).
    """
    cfg = model.cfg
    matmul = 0
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.startswith(("embed.", "lm_head.")):
            continue
        n = p.numel()
        if model.param_kind(name) == "expert":
            n = _active_share(cfg, n)
        matmul += n
    matmul += cfg.vocab_size * cfg.dim
    a = cfg.attention
    if a.kind == "mla":
        qk, v = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
    else:
        qk = v = a.head_dim or cfg.dim // a.n_heads
    return 6.0 * matmul + 6.0 * cfg.n_layers * a.n_heads * (qk + v) * seq_len


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32. logits `[B, T, V]`, targets `[B, T]` (already shifted)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
