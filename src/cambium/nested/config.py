"""Config models of the nested-learning system. `CONFIG_MODEL` is the root every configs/nested/*.toml loads with.

Vocabulary of the origin design: a model is *built* (not trained) on a *context* (not a dataset). A model has
`n_blocks` blocks; "levels" are the Continuous Memory System's frequency levels only (`cms.periods`: a block's memory
is k levels, level i updating every `periods[i]` outer steps). The memory rule of every level is a
`cambium.nn.memory.MemoryConfig` (the four MIRAS knobs), validated when the file loads.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cambium.core.config import RESUME_SAFE, ConfigModel
from cambium.core.loop import LoopConfig
from cambium.data.mixture import DatasetSpec, MixtureSpec
from cambium.nn.memory.config import MemoryConfig

MEMORY_COMPOSITIONS = ("mag", "mal", "mac")
WINDOWED_COMPOSITIONS = ("mag", "mal", "swa")

__all__ = ["CONFIG_MODEL", "MEMORY_COMPOSITIONS", "WINDOWED_COMPOSITIONS", "BuildConfig", "CmsConfig",
           "ContextConfig", "ModelConfig", "NestedConfig"]


class ModelConfig(ConfigModel):
    """The model: token embedding, `n_blocks` blocks composing attention with a memory, output head."""

    vocab_size: int = Field(description="tokenizer vocabulary size", ge=2)
    dim: int = Field(description="model width D", ge=2)
    n_blocks: int = Field(description="number of blocks (the CMS's frequency levels are `cms.periods`)", ge=1)
    heads: int = Field(description="attention and memory heads H (dim must divide by it)", ge=1)
    mlp_hidden: int = Field(description="hidden width of each block's SwiGLU", ge=1)
    composition: Literal["mag", "swa", "mal", "mac", "full"] = Field(
        "mag", description="mag: SWA gated by σ(memory); mal: a memory layer feeding SWA; mac: per segment, attend "
        "over [persistent; memory read; segment], then write the segment into memory; swa: sliding-window attention "
        "only; full: full causal attention over the chunk (the two baselines have no memory)"
    )
    window: int | None = Field(None, description="attention window in tokens (mag, mal, swa; full and mac have none)",
                               ge=1)
    segment_len: int | None = Field(None, description="mac: tokens per segment (attention stays inside a segment; "
                                    "the memory carries what came before)", ge=1)
    persistent_tokens: int = Field(0, description="learned persistent tokens every attention also attends to "
                                   "(keys and values only; 0 = none)", ge=0)
    memory: MemoryConfig = Field(default_factory=MemoryConfig,
                                 description="memory rule of every CMS level of every block (mag, mal, mac)")

    @model_validator(mode="after")
    def _composition(self) -> ModelConfig:
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")
        c = self.composition
        if c in WINDOWED_COMPOSITIONS and self.window is None:
            raise ValueError(f"composition={c!r} needs a window (model.window = tokens)")
        if c not in WINDOWED_COMPOSITIONS and self.window is not None:
            raise ValueError(f"composition={c!r} has no attention window; remove window={self.window}"
                             + (" (mac attends within segment_len)" if c == "mac" else ""))
        if (c == "mac") != (self.segment_len is not None):
            raise ValueError("composition='mac' needs segment_len" if c == "mac" else
                             f"segment_len={self.segment_len} is read by composition='mac' only; remove it")
        # The default table is what a resolved config writes back, so only settings that would be ignored are refused.
        if c not in MEMORY_COMPOSITIONS and self.memory != MemoryConfig():
            raise ValueError(f"composition={c!r} has no memory; remove the memory table (its settings would be "
                             "ignored)")
        return self

    @property
    def has_memory(self) -> bool:
        return self.composition in MEMORY_COMPOSITIONS


class CmsConfig(ConfigModel):
    """The Continuous Memory System: each block's memory is k frequency levels. Level i fires every `periods[i]`
    outer steps (on steps s with (s + 1) % period == 0): only then does its context memory advance and do its
    parameters change, by the fp32 sum of the outer gradients buffered since it last fired."""

    periods: tuple[int, ...] = Field((1, 8, 64, 512), description="update period in outer steps of each level, "
                                     "strictly increasing (k = len(periods); [1] is the plain memory)", min_length=1)
    combine: Literal["sum", "mix"] = Field(
        "sum", description="how the levels' outputs combine: sum (m = Σ_i m_i) or mix (m = Σ_i softmax(w)_i m_i, "
        "w learned, one weight per level and block)"
    )

    @field_validator("periods")
    @classmethod
    def _increasing(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(p < 1 for p in value):
            raise ValueError("every period must be >= 1")
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("periods must be strictly increasing")
        return value


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


class BuildConfig(LoopConfig):
    """The outer loop (learning projections and gates): `cambium.core.loop.LoopConfig` (seed, device, dtype — the
    memory's inner loop is fp32 always —, threads, intervals) and the optimiser."""

    steps: int = Field(200, description="outer steps of the learning-rate schedule (max_steps may run longer)", ge=1)
    lr: float = Field(3e-4, description="peak learning rate", gt=0)
    weight_decay: float = Field(0.1, description="AdamW weight decay", ge=0)
    warmup_steps: int = Field(20, description="linear warm-up steps", ge=0)
    grad_clip: float | None = Field(1.0, description="global gradient-norm clip (None = off)", gt=0)
    eval_chunks: int | None = Field(
        None, description="chunks of the val stream per evaluation during a build (None: the whole val split)", ge=1,
        json_schema_extra=RESUME_SAFE,
    )

    @model_validator(mode="after")
    def _warmup(self) -> BuildConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be <= steps={self.steps}")
        return self


class NestedConfig(ConfigModel):
    """Root config of `cambium nested build|eval`."""

    name: str = Field("nested", pattern=r"^[A-Za-z0-9_.-]+$", description="run name (part of the run id)")
    model: ModelConfig = Field(description="model shape and composition")
    cms: CmsConfig = Field(default_factory=CmsConfig, description="the Continuous Memory System's frequency levels "
                           "(models with a memory)")
    context: ContextConfig = Field(default_factory=ContextConfig, description="the token stream")
    build: BuildConfig = Field(default_factory=BuildConfig, description="outer-loop settings")

    @model_validator(mode="after")
    def _fits(self) -> NestedConfig:
        m = self.model
        if not m.has_memory and self.cms != CmsConfig():
            raise ValueError(f"model.composition={m.composition!r} has no memory; remove the cms table")
        if self.context.carry_attention and m.window is None:
            raise ValueError(f"context.carry_attention=true needs a windowed composition; {m.composition!r} has no "
                             "window to carry")
        return self


CONFIG_MODEL = NestedConfig
