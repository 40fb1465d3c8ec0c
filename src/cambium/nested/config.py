"""Config models of the nested-learning system. `CONFIG_MODEL` is the root every configs/nested/*.toml loads with.

Vocabulary of the origin design: a model is *built* (not trained) on a *context* (not a dataset); its blocks are
*levels*. The memory rule of every level is a `cambium.nn.memory.MemoryConfig` (the four MIRAS knobs), validated when
the file loads. What issue 20 will build (the Continuous Memory System's `cms` levels, MAL, MAC with its `segment_len`,
persistent tokens, full attention) is refused with "not built yet" rather than accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from cambium.core.config import RESUME_SAFE, ConfigModel
from cambium.core.loop import LoopConfig
from cambium.data.mixture import DatasetSpec, MixtureSpec
from cambium.nn.memory.config import MemoryConfig

BUILT_COMPOSITIONS = ("mag", "swa")

__all__ = ["BUILT_COMPOSITIONS", "CONFIG_MODEL", "BuildConfig", "ContextConfig", "ModelConfig", "NestedConfig"]


class ModelConfig(ConfigModel):
    """The model: token embedding, `n_levels` blocks composing sliding-window attention with a memory, output head."""

    unbuilt: ClassVar[Mapping[str, str]] = {
        "segment_len": "MAC's segments, issue 20", "persistent_tokens": "persistent memory tokens, issue 20"}

    vocab_size: int = Field(description="tokenizer vocabulary size", ge=2)
    dim: int = Field(description="model width D", ge=2)
    n_levels: int = Field(description="number of blocks", ge=1)
    heads: int = Field(description="attention and memory heads H (dim must divide by it)", ge=1)
    mlp_hidden: int = Field(description="hidden width of each block's SwiGLU", ge=1)
    composition: Literal["mag", "swa", "mal", "mac", "full"] = Field(
        "mag", description="mag: SWA gated by σ(memory); swa: sliding-window attention only (the baseline); mal "
        "(memory feeding SWA), mac (memory as context) and full (full causal attention) are not built yet (issue 20)"
    )
    window: int = Field(description="attention window in tokens", ge=1)
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="memory rule of every level (mag only)")

    @field_validator("composition")
    @classmethod
    def _built(cls, value: str) -> str:
        if value not in BUILT_COMPOSITIONS:
            raise ValueError(f"not built yet (issue 20); use one of {', '.join(map(repr, BUILT_COMPOSITIONS))}")
        return value

    @model_validator(mode="after")
    def _composition(self) -> ModelConfig:
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")
        # The default table is what a resolved config writes back, so only settings that would be ignored are refused.
        if self.composition == "swa" and self.memory != MemoryConfig():
            raise ValueError("composition='swa' has no memory; remove the memory table (its settings would be ignored)")
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

    unbuilt: ClassVar[Mapping[str, str]] = {"cms": "the Continuous Memory System's frequency levels, issue 20"}

    name: str = Field("nested", pattern=r"^[A-Za-z0-9_.-]+$", description="run name (part of the run id)")
    model: ModelConfig = Field(description="model shape and composition")
    context: ContextConfig = Field(default_factory=ContextConfig, description="the token stream")
    build: BuildConfig = Field(default_factory=BuildConfig, description="outer-loop settings")


CONFIG_MODEL = NestedConfig
