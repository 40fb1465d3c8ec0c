"""Config models of the nested-learning system. `CONFIG_MODEL` is the root every configs/nested/*.toml loads with.

Vocabulary of the origin design: a model is *built* (not trained) on a *context* (not a dataset); its blocks are
*levels*. The memory rule of every level is a `cambium.nn.memory.MemoryConfig` (the four MIRAS knobs), validated when
the file loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cambium.core.config import ConfigModel
from cambium.data.mixture import DatasetSpec, MixtureSpec
from cambium.nn.memory.config import MemoryConfig

__all__ = ["CONFIG_MODEL", "BuildConfig", "CMSConfig", "ContextConfig", "ModelConfig", "NestedConfig"]


class CMSConfig(ConfigModel):
    """Continuous Memory System: k frequency levels, level i updating once every `periods[i]` steps."""

    periods: tuple[int, ...] = Field((1, 8, 64, 512), description="chunk period of each level, fastest first")
    combine: Literal["sum", "mean", "gated"] = Field(
        "sum", description="how level outputs are combined: sum, mean, or a learned sigmoid gate per level"
    )

    @model_validator(mode="after")
    def _nested_periods(self) -> CMSConfig:
        if not self.periods:
            raise ValueError("periods must name at least one level")
        if any(p < 1 for p in self.periods):
            raise ValueError(f"periods={list(self.periods)} must all be >= 1")
        for fast, slow in zip(self.periods, self.periods[1:], strict=False):
            if slow <= fast or slow % fast:
                raise ValueError(f"periods={list(self.periods)}: each period must be a larger multiple of the one "
                                 f"before ({slow} after {fast}), so that a slow level fires only at fast boundaries")
        return self


class ModelConfig(ConfigModel):
    """The model: token embedding, `n_levels` blocks composing sliding-window attention with a memory, output head."""

    vocab_size: int = Field(description="tokenizer vocabulary size", ge=2)
    dim: int = Field(description="model width D", ge=2)
    n_levels: int = Field(description="number of blocks", ge=1)
    heads: int = Field(description="attention and memory heads H (dim must divide by it)", ge=1)
    mlp_hidden: int = Field(description="hidden width of each block's SwiGLU", ge=1)
    composition: Literal["mag", "mal", "mac", "swa", "full"] = Field(
        "mag", description="mag: SWA gated by σ(memory); mal: memory feeding SWA; mac: memory as context; "
        "swa: sliding-window attention only; full: full causal attention (baselines)"
    )
    window: int | None = Field(None, description="attention window in tokens (required except for 'full')", ge=1)
    segment_len: int | None = Field(None, description="mac only: tokens per segment", ge=1)
    persistent_tokens: int = Field(0, description="mac/mag/mal: learned persistent memory tokens", ge=0)
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="memory rule of every level")

    @model_validator(mode="after")
    def _composition(self) -> ModelConfig:
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")
        if self.composition == "full":
            if self.window is not None:
                raise ValueError(f"composition='full' attends to every past token; remove window={self.window}")
        elif self.window is None:
            raise ValueError(f"composition={self.composition!r} needs a window (sliding-window attention)")
        if self.composition == "mac":
            if self.segment_len is None:
                raise ValueError("composition='mac' needs segment_len (memory is read and written per segment)")
            chunk = self.memory.chunk_size
            if self.memory.execution != "recurrent" and self.segment_len % chunk:
                raise ValueError(f"segment_len={self.segment_len} must be a multiple of memory.chunk_size={chunk} "
                                 "so that memory chunks do not straddle segments")
        elif self.segment_len is not None:
            raise ValueError(f"segment_len={self.segment_len} applies only to composition='mac', "
                             f"not {self.composition!r}")
        if self.composition in ("swa", "full") and self.persistent_tokens:
            raise ValueError(f"persistent_tokens={self.persistent_tokens} needs a memory composition "
                             f"(mag, mal, mac), not {self.composition!r}")
        return self


def _default_mixture() -> MixtureSpec:
    sample = DatasetSpec(name="tinyshakespeare", path=Path("data/samples/text/tinyshakespeare/input.txt"))
    return MixtureSpec(out_dir=Path("runs/data/nested-tinyshakespeare"), datasets=(sample,))


class ContextConfig(ConfigModel):
    """The context the model is built on: a continuous token stream (no epochs) over a token mixture."""

    mixture: MixtureSpec = Field(
        default_factory=_default_mixture,
        description="corpora and tokenizer (the same spec as `cambium moe prep-mixture`; default: the committed "
        "tinyshakespeare sample)",
    )
    seq_len: int = Field(256, description="tokens per step and stream T", ge=2)
    batch_size: int = Field(4, description="parallel streams per step", ge=1)
    carry_memory: bool = Field(
        True, description="carry each lane's memory state across chunks (context memory); false restarts every chunk "
        "from the learned initial memory (an ablation: the memory then sees only its chunk)"
    )
    carry_attention: bool = Field(
        False, description="carry each level's last window-1 attention inputs across chunks, so that every token "
        "attends to a full window (false: attention sees the current chunk only)"
    )


class BuildConfig(ConfigModel):
    """The outer loop (learning projections and gates)."""

    steps: int = Field(200, description="outer steps", ge=1)
    lr: float = Field(3e-4, description="peak learning rate", gt=0)
    weight_decay: float = Field(0.1, description="AdamW weight decay", ge=0)
    warmup_steps: int = Field(20, description="linear warm-up steps", ge=0)
    grad_clip: float | None = Field(1.0, description="global gradient-norm clip (None = off)", gt=0)
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="outer dtype (autocast); the memory's inner loop is fp32 always"
    )
    seed: int = Field(0, description="seed of parameters and stream order")
    log_every: int = Field(10, description="steps between metric rows", ge=1)
    checkpoint_every: int = Field(100, description="steps between checkpoints", ge=1)
    eval_every: int = Field(100, description="steps between held-out evaluations", ge=1)
    eval_chunks: int | None = Field(
        None, description="chunks of the val stream per evaluation during a build (None: the whole val split)", ge=1
    )
    keep_checkpoints: int = Field(3, description="checkpoints kept (older ones are deleted)", ge=1)
    threads: int = Field(0, description="torch intra-op threads (0: torch's default; 1 for bitwise-reproducible "
                         "runs under any load)", ge=0)

    @model_validator(mode="after")
    def _warmup(self) -> BuildConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be <= steps={self.steps}")
        return self


class NestedConfig(ConfigModel):
    """Root config of `cambium nested build|eval`."""

    name: str = Field("nested", pattern=r"^[A-Za-z0-9_.-]+$", description="run name (part of the run id)")
    model: ModelConfig = Field(description="model shape and composition")
    cms: CMSConfig = Field(default_factory=CMSConfig, description="continuous memory system levels")
    context: ContextConfig = Field(default_factory=ContextConfig, description="the token stream")
    build: BuildConfig = Field(default_factory=BuildConfig, description="outer-loop settings")

    @model_validator(mode="after")
    def _fits(self) -> NestedConfig:
        seq = self.context.seq_len
        if self.model.segment_len is not None and seq % self.model.segment_len:
            raise ValueError(f"context.seq_len={seq} must be a multiple of model.segment_len={self.model.segment_len}")
        return self


CONFIG_MODEL = NestedConfig
