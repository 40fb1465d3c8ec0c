"""Config models of the MoE language-model system. `CONFIG_MODEL` is the root that every configs/moe/*.toml loads with.

Shapes follow DeepSeek-V3's naming where there is one (kv_lora_rank, qk_rope_head_dim, route_scale, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cambium.core.config import RESUME_SAFE, ConfigModel
from cambium.core.loop import LoopConfig
from cambium.core.schedule import Schedule
from cambium.data.mixture import MixtureSpec

__all__ = [
    "CONFIG_MODEL", "AttentionConfig", "DataConfig", "MoEConfig", "MoELayerConfig", "ModelConfig", "OptimConfig",
    "TrainConfig",
]


class AttentionConfig(ConfigModel):
    """Self-attention of every block: MLA (DeepSeek-V3 default) or standard MHA/GQA."""

    kind: Literal["mla", "gqa"] = Field("mla", description="'mla' (multi-head latent attention) or 'gqa' (MHA/GQA)")
    n_heads: int = Field(description="number of query heads", ge=1)
    n_kv_heads: int | None = Field(None, description="gqa only: key/value heads (None = n_heads, i.e. MHA)", ge=1)
    head_dim: int | None = Field(None, description="gqa only: head width (None = dim // n_heads)", ge=2)
    q_lora_rank: int | None = Field(None, description="mla only: rank of the query bottleneck (None = full-rank)", ge=1)
    kv_lora_rank: int = Field(512, description="mla only: rank R of the shared key/value latent", ge=1)
    qk_nope_head_dim: int = Field(128, description="mla only: per-head query/key width without RoPE", ge=1)
    qk_rope_head_dim: int = Field(64, description="mla only: decoupled RoPE query/key width (even)", ge=2)
    v_head_dim: int = Field(128, description="mla only: per-head value width", ge=1)
    window: int | None = Field(None, description="sliding-window size in tokens (None = full causal)", ge=1)
    rope_theta: float = Field(10000.0, description="RoPE base θ", gt=0)

    @model_validator(mode="after")
    def _check(self) -> AttentionConfig:
        if self.kind == "gqa" and self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        return self


class MoELayerConfig(ConfigModel):
    """The mixture-of-experts feed-forward used by every layer after the first `n_dense_layers`."""

    n_routed_experts: int = Field(description="number of routed (fine-grained) experts E", ge=1)
    n_shared_experts: int = Field(0, description="always-on experts (one SwiGLU of n_shared·expert_hidden)", ge=0)
    top_k: int = Field(description="routed experts per token K", ge=1)
    expert_hidden: int = Field(description="hidden width H of each expert", ge=1)
    score_func: Literal["sigmoid", "softmax"] = Field("sigmoid", description="router score function")
    route_scale: float = Field(1.0, description="gate weights are multiplied by this after renormalisation", gt=0)
    n_groups: int = Field(1, description="expert groups for group-limited routing (1 = off)", ge=1)
    topk_groups: int = Field(1, description="groups each token may route into", ge=1)
    bias_update_rate: float = Field(1e-3, description="γ of aux-loss-free balancing: bias += γ·sign(mean−load)", ge=0)
    bias_freeze_fraction: float = Field(
        1.0, description="fraction of the run after which γ becomes 0 (1.0 = never frozen)", ge=0, le=1
    )
    bias_clamp: float = Field(1.0, description="routing biases are clamped to [−clamp, clamp]", gt=0)
    seq_aux_coef: float = Field(0.0, description="α of the sequence-wise balance loss α·Σ f_i·P_i (0 = off)", ge=0)
    z_loss_coef: float = Field(0.0, description="router z-loss coefficient (0 = off)", ge=0)
    backend: Literal["auto", "grouped_mm", "padded_bmm", "segmented", "loop"] = Field(
        "auto", description="expert compute: auto, grouped_mm, padded_bmm, segmented (one matmul per expert's row "
        "segment), or the per-expert loop reference"
    )
    lowp: Literal["none", "mxfp8", "nvfp4"] = Field(
        "none", description="quantise-dequantise emulation of expert matmul operands (none, mxfp8, nvfp4)"
    )

    @model_validator(mode="after")
    def _check(self) -> MoELayerConfig:
        e = self.n_routed_experts
        if self.top_k > e:
            raise ValueError(f"top_k={self.top_k} must be <= n_routed_experts={e}")
        if e % self.n_groups:
            raise ValueError(f"n_routed_experts={e} must be divisible by n_groups={self.n_groups}")
        if self.topk_groups > self.n_groups:
            raise ValueError(f"topk_groups={self.topk_groups} must be <= n_groups={self.n_groups}")
        if self.topk_groups * (e // self.n_groups) < self.top_k:
            raise ValueError(
                f"topk_groups={self.topk_groups} groups of {e // self.n_groups} experts cannot hold top_k={self.top_k}"
            )
        block = {"none": 1, "mxfp8": 32, "nvfp4": 16}[self.lowp]
        if self.expert_hidden % block:
            raise ValueError(f"expert_hidden={self.expert_hidden} must be a multiple of {block} for lowp={self.lowp}")
        return self


class ModelConfig(ConfigModel):
    """Decoder-only transformer: embeddings, n_layers blocks (attention + dense or MoE feed-forward), final norm."""

    vocab_size: int = Field(description="tokenizer vocabulary size", ge=2)
    dim: int = Field(description="model width D", ge=2)
    n_layers: int = Field(description="number of transformer blocks", ge=1)
    n_dense_layers: int = Field(1, description="the first this many blocks use a dense SwiGLU instead of MoE", ge=0)
    dense_hidden: int = Field(description="hidden width of the dense SwiGLU blocks", ge=1)
    max_seq_len: int = Field(description="longest sequence (RoPE tables are built for it)", ge=1)
    tie_embeddings: bool = Field(False, description="share the input embedding with the output projection")
    norm_eps: float = Field(1e-6, description="RMSNorm epsilon", gt=0)
    init_std: float = Field(0.02, description="std of the normal initialisation of weight matrices", gt=0)
    attention: AttentionConfig = Field(description="attention settings")
    moe: MoELayerConfig | None = Field(
        None, description="mixture-of-experts settings (required when a layer is MoE, refused when all are dense)")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers={self.n_dense_layers} must be <= n_layers={self.n_layers}")
        # An all-dense model has no MoE layer: a moe table would be accepted and ignored.
        if self.n_dense_layers < self.n_layers and self.moe is None:
            raise ValueError(f"layers {self.n_dense_layers}..{self.n_layers - 1} are MoE (n_dense_layers="
                             f"{self.n_dense_layers} < n_layers={self.n_layers}): add the moe table")
        if self.n_dense_layers == self.n_layers and self.moe is not None:
            raise ValueError(f"every layer is dense (n_dense_layers = n_layers = {self.n_layers}), so nothing would "
                             "read the moe table: remove it")
        a = self.attention
        if a.kind == "gqa" and a.head_dim is None and self.dim % a.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by attention.n_heads={a.n_heads} (or set head_dim)")
        if self.moe is not None and self.dim % (block := {"none": 1, "mxfp8": 32, "nvfp4": 16}[self.moe.lowp]):
            raise ValueError(f"dim={self.dim} must be a multiple of {block} for moe.lowp={self.moe.lowp}")
        return self


class DataConfig(ConfigModel):
    """What the trainer reads: a prepared mixture (see `cambium moe prep-mixture`) and the batch shape."""

    mixture: MixtureSpec = Field(description="datasets, tokenizer and sampling temperature of the mixture")
    seq_len: int = Field(description="tokens per training sequence T", ge=8)
    batch_size: int = Field(description="sequences per optimiser step (global batch)", ge=1)
    grad_accum: int = Field(1, description="micro-batches per optimiser step (batch_size must divide by it)", ge=1)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")
        return self


class OptimConfig(ConfigModel):
    """Separate learning rates and weight decay for dense, router, expert and embedding parameters (MOE-6).

    With `muon`, the 2-D dense matrices (attention projections, dense and shared-expert SwiGLUs) use Muon with the
    Moonlight update scale (so `dense_lr` works for both); norms and other 1-D dense parameters use AdamW.
    """

    muon: bool = Field(True, description="Muon for the 2-D dense matrices (AdamW for everything else)")
    muon_experts: bool = Field(False, description="with muon: also Muon for the routed experts, each expert's "
                               "matrix orthogonalised on its own (else AdamW)")
    dense_lr: float = Field(3e-3, description="peak lr of attention, dense SwiGLU, shared experts and norms", gt=0)
    expert_lr: float = Field(3e-3, description="peak lr of the routed experts (AdamW)", gt=0)
    router_lr: float = Field(1e-3, description="peak lr of the router weights (AdamW)", gt=0)
    embedding_lr: float = Field(3e-3, description="peak lr of the embedding and output head (AdamW)", gt=0)
    dense_weight_decay: float = Field(0.1, description="decoupled weight decay of the 2-D dense matrices (norms and "
                                      "other 1-D dense parameters get none)", ge=0)
    expert_weight_decay: float = Field(0.1, description="decoupled weight decay of the routed experts", ge=0)
    router_weight_decay: float = Field(0.0, description="decoupled weight decay of the router weights", ge=0)
    embedding_weight_decay: float = Field(0.0, description="decoupled weight decay of the embedding and output head",
                                          ge=0)
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float | None = Field(1.0, description="clip the global gradient norm to this (None = no clipping)", gt=0)


class TrainConfig(LoopConfig):
    """The training loop (`cambium.core.loop.LoopConfig`: seed, device, dtype, threads, length, intervals) and the
    MoE diagnostics."""

    expert_stats_every: int = Field(10, description="write per-expert loads and biases every this many steps", ge=1,
                                    json_schema_extra=RESUME_SAFE)
    eval_windows: int = Field(16, description="validation windows per dataset at each evaluation", ge=1)
    init_from_hf: Path | None = Field(None, description="a new run starts from the weights of this Hugging Face "
                                      "DeepseekV3ForCausalLM directory (its architecture must be the model table's: "
                                      "`cambium moe import-hf` writes such a config); None: random initialisation")
    expert_parallel: bool = Field(True, description="under torchrun with several ranks: shard the routed experts "
                                  "across them (n_routed_experts % world_size == 0) and exchange tokens all-to-all; "
                                  "false: every rank holds every expert (data parallel only)",
                                  json_schema_extra=RESUME_SAFE)


class MoEConfig(ConfigModel):
    """Root config of `cambium moe`: model, data mixture, optimiser, schedule and training loop."""

    name: str = Field("moe", description="run name (part of the run id)", pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelConfig = Field(description="model architecture")
    data: DataConfig = Field(description="training data")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimiser")
    schedule: Schedule = Field(description="learning-rate schedule (wsd or cosine; unit steps or tokens)")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training loop")

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} must be <= model.max_seq_len={self.model.max_seq_len}")
        if self.optim.dense_lr != self.schedule.lr_max:
            raise ValueError(f"schedule.lr_max={self.schedule.lr_max} must equal optim.dense_lr={self.optim.dense_lr} "
                             "(the schedule is written for the dense group; other groups keep their proportion)")
        return self


CONFIG_MODEL = MoEConfig
