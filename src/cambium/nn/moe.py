"""Fine-grained mixture-of-experts layer (DeepSeek-V3 style): router, the MoE layer, its per-expert reference.

Legend: N tokens (B·T flattened), D model width, E routed experts, K experts per token, H expert hidden width.

The routed path is three separate steps, in `cambium.nn.moe_experts`: dispatch (sort the N·K rows by expert),
expert compute (grouped SwiGLU — or, after `MoE.shard_experts`, `expert_parallel` with each of W ranks holding E/W
experts) and combine (unsort, weight by the gates). `moe_reference` is the per-expert loop (mask, gather, compute,
index_add) that every backend is tested against.

Router controls: selection uses scores + a per-expert bias that only steers which experts are chosen (aux-loss-free
balancing, updated outside autograd by `MoE.update_bias` after each optimiser step); gate weights use the unbiased
scores, renormalised over the chosen K and multiplied by `route_scale`. Optional losses: DeepSeek's sequence-wise
balance loss α·Σ_i f_i·P_i and the router z-loss mean(logsumexp(logits)²).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cambium.core.errors import ConfigError, DistributedError
from cambium.nn.lowp import LowPrecision
from cambium.nn.mlp import SwiGLU
from cambium.nn.moe_experts import (
    Backend,
    ExpertShard,
    combine,
    dispatch,
    expert_compute,
    expert_parallel,
    plan_dispatch,
    resolve_backend,
    swiglu_halves,
)

__all__ = [
    "MoE",
    "MoEAux",
    "Router",
    "RouterOutput",
    "balance_stats",
    "bias_gamma",
    "moe_reference",
]

ScoreFunc = Literal["sigmoid", "softmax"]


@dataclass(frozen=True)
class RouterOutput:
    """weights `[N, K]` (fp32, renormalised and scaled), indices `[N, K]` int64, scores and logits `[N, E]` fp32."""

    weights: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor


class Router(nn.Module):
    """Top-K router with optional group-limited selection and a selection-only balancing bias `[E]`.

    With `n_groups > 1` the E experts form equal groups; a group's score is the sum of its two best biased scores
    and each token picks among the experts of its `topk_groups` best groups only (DeepSeek-V3 node-limited routing).
    """

    bias: torch.Tensor

    def __init__(
        self,
        dim: int,
        n_experts: int,
        top_k: int,
        *,
        score_func: ScoreFunc = "sigmoid",
        route_scale: float = 1.0,
        n_groups: int = 1,
        topk_groups: int = 1,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ConfigError(f"top_k={top_k} must be in [1, n_routed_experts={n_experts}]")
        if n_experts % n_groups != 0:
            raise ConfigError(f"n_routed_experts={n_experts} must be divisible by n_groups={n_groups}")
        if not 1 <= topk_groups <= n_groups:
            raise ConfigError(f"topk_groups={topk_groups} must be in [1, n_groups={n_groups}]")
        if topk_groups * (n_experts // n_groups) < top_k:
            raise ConfigError(
                f"topk_groups={topk_groups} groups of {n_experts // n_groups} experts cannot hold top_k={top_k}"
            )
        self.n_experts, self.top_k, self.score_func, self.route_scale = n_experts, top_k, score_func, route_scale
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)
        # A buffer, not a parameter: it is checkpointed but never touched by the optimiser or by gradients.
        self.register_buffer("bias", torch.zeros(n_experts))

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x `[N, D]` → RouterOutput. Runs in fp32 even under autocast: top-K on bf16 scores is full of ties."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
            scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
            with torch.no_grad():
                choice = scores + self.bias
                if self.n_groups > 1:
                    grouped = choice.view(-1, self.n_groups, self.n_experts // self.n_groups)
                    group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
                    keep = group_score.topk(self.topk_groups, dim=-1).indices
                    group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
                    choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
                indices = choice.topk(self.top_k, dim=-1).indices
            weights = scores.gather(1, indices)
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * self.route_scale
        return RouterOutput(weights, indices, scores, logits)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, gamma: float, clamp: float) -> None:
        """bias += γ·sign(mean(load) − load_i), then centred (mean 0) and clamped to [−clamp, clamp].

        `load` `[E]` counts the tokens routed to each expert during the step (summed over micro-batches and ranks).
        """
        load = load.to(self.bias.device, torch.float32)
        new = self.bias + gamma * torch.sign(load.mean() - load)
        self.bias.copy_((new - new.mean()).clamp(-clamp, clamp))


def bias_gamma(step: int, total_steps: int, gamma: float, freeze_fraction: float) -> float:
    """The bias update rate γ at `step`: `gamma` until `freeze_fraction` of the run, then 0 (frozen routing)."""
    return gamma if step < freeze_fraction * total_steps else 0.0


def moe_reference(x: torch.Tensor, routing: RouterOutput, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Per-expert loop (the HF DeepseekV3/Mixtral pattern): for each expert, find its (token, slot) pairs, run the
    expert on those tokens and add the weighted result. x `[N, D]` → `[N, D]`."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        token, slot = torch.where(routing.indices == e)
        if token.numel() == 0:
            continue
        y = swiglu_halves(x[token] @ w13[e]) @ w2[e]
        out = out.index_add(0, token, y * routing.weights[token, slot, None].to(y.dtype))
    return out


@dataclass(frozen=True)
class MoEAux:
    """What one MoE forward reports besides its output.

    loss: scalar, the weighted balance + z losses (0 when both coefficients are 0), part of the training loss;
    load: `[E]` int64 rows routed to each expert (for the bias update and statistics);
    entropy: scalar, mean over tokens of the entropy (nats) of the normalised router scores (detached).
    """

    loss: torch.Tensor
    load: torch.Tensor
    entropy: torch.Tensor


class MoE(nn.Module):
    """Shared experts + routed fine-grained SwiGLU experts. `[B, T, D]` → (`[B, T, D]`, MoEAux).

    The shared experts are one SwiGLU of width `n_shared_experts · expert_hidden` that every token passes through.
    """

    def __init__(
        self,
        dim: int,
        n_routed_experts: int,
        top_k: int,
        expert_hidden: int,
        *,
        n_shared_experts: int = 0,
        score_func: ScoreFunc = "sigmoid",
        route_scale: float = 1.0,
        n_groups: int = 1,
        topk_groups: int = 1,
        seq_aux_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        bias_clamp: float = 1.0,
        backend: Backend = "auto",
        lowp: LowPrecision | None = None,
    ) -> None:
        super().__init__()
        self.router = Router(
            dim, n_routed_experts, top_k, score_func=score_func, route_scale=route_scale,
            n_groups=n_groups, topk_groups=topk_groups,
        )
        self.n_experts, self.top_k, self.expert_hidden = n_routed_experts, top_k, expert_hidden
        self.w13 = nn.Parameter(torch.empty(n_routed_experts, dim, 2 * expert_hidden))
        self.w2 = nn.Parameter(torch.empty(n_routed_experts, expert_hidden, dim))
        nn.init.normal_(self.w13, std=dim**-0.5)
        nn.init.normal_(self.w2, std=expert_hidden**-0.5)
        self.shared = SwiGLU(dim, n_shared_experts * expert_hidden) if n_shared_experts > 0 else None
        self.seq_aux_coef, self.z_loss_coef, self.bias_clamp = seq_aux_coef, z_loss_coef, bias_clamp
        self.backend: Backend = backend
        self.lowp = lowp
        self.shard: ExpertShard | None = None

    @torch.no_grad()
    def shard_experts(self, shard: ExpertShard) -> None:
        """Keep only this rank's E/W routed experts (the Parameter objects stay, so an optimiser built before still
        holds them). The router keeps scoring all E experts; `forward` then runs `expert_parallel`."""
        if self.shard is not None:
            raise DistributedError("the experts of this MoE layer are already sharded")
        if self.n_experts % shard.world_size:
            raise ConfigError(f"expert parallel needs n_routed_experts % world_size == 0, got n_routed_experts="
                              f"{self.n_experts} over {shard.world_size} ranks; choose a world size that divides it "
                              "(or turn expert parallelism off)")
        if self.backend == "loop":
            raise ConfigError("moe.backend='loop' is the single-process reference; expert parallel needs "
                              "'auto', 'padded_bmm' or 'grouped_mm'")
        lo, hi = shard.local_range(self.n_experts)
        self.w13.data = self.w13.data[lo:hi].clone()
        self.w2.data = self.w2.data[lo:hi].clone()
        self.shard = shard

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        routing = self.router(flat)
        backend = resolve_backend(self.backend, x.device, x.dtype, (d, self.expert_hidden, 2 * self.expert_hidden))
        plan = plan_dispatch(routing.indices, self.n_experts)
        if backend == "loop":
            routed = moe_reference(flat, routing, self.w13, self.w2)
        else:
            assert backend != "auto"
            x_sorted = dispatch(flat, plan)
            if self.shard is None:
                y_sorted = expert_compute(x_sorted, plan.counts, self.w13, self.w2, backend, self.lowp)
            else:
                y_sorted = expert_parallel(x_sorted, plan.counts, self.w13, self.w2, self.shard, backend, self.lowp)
            routed = combine(y_sorted, routing.weights, plan)
        out = routed.view(b, t, d)
        if self.shared is not None:
            out = out + self.shared(x)
        return out, self._aux(routing, plan.counts, b, t)

    def _aux(self, routing: RouterOutput, load: torch.Tensor, b: int, t: int) -> MoEAux:
        probs = routing.scores / routing.scores.sum(-1, keepdim=True)
        loss = routing.scores.new_zeros(())
        if self.seq_aux_coef > 0:
            # f_i = E/(K·T) · (times expert i is chosen in the sequence), P_i = mean over the sequence of probs_i.
            chosen = torch.zeros(b, self.n_experts, device=load.device)
            chosen.scatter_add_(1, routing.indices.view(b, t * self.top_k), torch.ones(b, t * self.top_k,
                                                                                        device=load.device))
            f = chosen * self.n_experts / (self.top_k * t)
            p = probs.view(b, t, self.n_experts).mean(1)
            loss = loss + self.seq_aux_coef * (f * p).sum(-1).mean()
        if self.z_loss_coef > 0:
            loss = loss + self.z_loss_coef * torch.logsumexp(routing.logits, dim=-1).pow(2).mean()
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
        return MoEAux(loss, load.detach(), entropy)

    def update_bias(self, load: torch.Tensor, gamma: float) -> None:
        """Apply the aux-loss-free balancing step from this step's `load` `[E]` (see Router.update_bias)."""
        self.router.update_bias(load, gamma, self.bias_clamp)


def balance_stats(
    load: torch.Tensor, entropy: torch.Tensor | float | None = None, bias: torch.Tensor | None = None
) -> dict[str, float | list[float]]:
    """Per-layer balance statistics from a load vector `[E]`: the load histogram (fractions), max/mean imbalance,
    the number of dead experts (no tokens), and, when given, the router entropy and the selection biases `[E]`."""
    load = load.detach().double().cpu()
    total = float(load.sum())
    stats: dict[str, float | list[float]] = {
        "load_fraction": (load / total).tolist() if total > 0 else [0.0] * load.numel(),
        "max_over_mean": float(load.max() / load.mean()) if total > 0 else 0.0,
        "dead_experts": float((load == 0).sum()),
    }
    if entropy is not None:
        stats["router_entropy"] = float(entropy)
    if bias is not None:
        stats["bias"] = bias.detach().float().cpu().tolist()
    return stats
