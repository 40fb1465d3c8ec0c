"""Learning-rate schedules: warmup-stable-decay (WSD) and cosine, by steps or by tokens, with an absolute floor.

A schedule is a frozen config (`kind = "wsd" | "cosine"`, so a system config can hold `schedule: Schedule`) with a pure
function `lr_at(x)`, where `x` is the position in the schedule's `unit`: optimizer steps done, or tokens seen. With
W = warmup, S = stable, D = decay, lr_max the peak and lr_min the floor (both absolute learning rates):

    warmup   0 <= x < W         lr = lr_init + (lr_max - lr_init) * x / W
    stable   W <= x < W + S     lr = lr_max                                   (WSD only)
    decay    p = (x - W - S)/D  lr = lr_min + (lr_max - lr_min) * shape(p)    (p in [0, 1])
    after    x >= W + S + D     lr = lr_min

with shape(p) = 1 - p (linear), (1 + cos(pi p)) / 2 (cosine), 1 - sqrt(p) (1-sqrt). The cosine schedule is the same
with S = 0, D = total - W and the cosine shape.

`LRScheduler` applies a schedule to every param group of an optimizer: a group whose base lr is `lr_base` gets
`lr_base * lr_at(x) / lr_max`. The schedule is written for a reference peak (usually the main group's lr, which then
follows `lr_at` exactly, floor included); every other group keeps the same proportion to its own base lr.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field, model_validator

from cambium.core.config import ConfigModel
from cambium.core.errors import CheckpointError, ConfigError

__all__ = ["CosineSchedule", "LRScheduler", "Schedule", "WSDSchedule", "decay_shape"]

Unit = Literal["steps", "tokens"]
DecayShape = Literal["linear", "cosine", "1-sqrt"]


def decay_shape(p: float, shape: DecayShape) -> float:
    """Fraction of (lr_max - lr_min) left at decay progress p in [0, 1]: 1 at p=0, 0 at p=1."""
    p = min(max(p, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(p)
    raise ConfigError(f"decay_shape={shape!r} is not one of 'linear', 'cosine', '1-sqrt'")


class _Base(ConfigModel):
    unit: Unit = Field(default="steps", description="What the position x counts: optimizer steps or tokens seen.")
    lr_max: float = Field(gt=0.0, description="Peak learning rate (absolute) reached at the end of warmup.")
    lr_min: float = Field(default=0.0, ge=0.0, description="Absolute floor reached at the end of the decay.")
    lr_init: float = Field(default=0.0, ge=0.0, description="Learning rate at x=0, where warmup starts.")
    warmup: int = Field(default=0, ge=0, description="Warmup length in `unit`.")

    def _check_lrs(self) -> None:
        if self.lr_min > self.lr_max:
            raise ValueError(f"lr_min={self.lr_min} must be <= lr_max={self.lr_max}")
        if self.lr_init > self.lr_max:
            raise ValueError(f"lr_init={self.lr_init} must be <= lr_max={self.lr_max}")

    def _warmup_lr(self, x: float) -> float:
        return self.lr_init + (self.lr_max - self.lr_init) * x / self.warmup

    def lr_at(self, x: float) -> float:
        raise NotImplementedError

    def multiplier_at(self, x: float) -> float:
        """lr_at(x) / lr_max: the factor `LRScheduler` applies to each group's base lr."""
        return self.lr_at(x) / self.lr_max


def _check_position(x: float) -> float:
    if not math.isfinite(x) or x < 0:
        raise ConfigError(f"schedule position x={x!r} must be a finite number >= 0 (steps done or tokens seen)")
    return float(x)


class WSDSchedule(_Base):
    """Warmup-stable-decay: linear warmup, a constant stable phase, a decay to the absolute floor `lr_min`."""

    kind: Literal["wsd"] = Field(default="wsd", description="Schedule kind.")
    stable: int = Field(ge=0, description="Stable (constant lr_max) length in `unit`, after warmup.")
    decay: int = Field(ge=0, description="Decay length in `unit`, after the stable phase.")
    decay_shape: DecayShape = Field(default="linear", description="Decay shape: linear, cosine or 1-sqrt.")

    @model_validator(mode="after")
    def _check(self) -> WSDSchedule:
        self._check_lrs()
        return self

    @property
    def total(self) -> int:
        """Position where the floor is reached: warmup + stable + decay."""
        return self.warmup + self.stable + self.decay

    def lr_at(self, x: float) -> float:
        x = _check_position(x)
        if x < self.warmup:
            return self._warmup_lr(x)
        if x < self.warmup + self.stable:
            return self.lr_max
        if x >= self.total:
            return self.lr_min
        p = (x - self.warmup - self.stable) / self.decay
        return self.lr_min + (self.lr_max - self.lr_min) * decay_shape(p, self.decay_shape)

    @classmethod
    def with_warmup_steps(
        cls, *, warmup_steps: int, tokens_per_step: int, stable_tokens: int, decay_tokens: int, **kwargs: Any
    ) -> WSDSchedule:
        """A token-based WSD whose warmup is given in optimizer steps of a fixed global batch of `tokens_per_step`."""
        if tokens_per_step <= 0:
            raise ConfigError(f"tokens_per_step={tokens_per_step} must be > 0")
        return cls(unit="tokens", warmup=warmup_steps * tokens_per_step, stable=stable_tokens, decay=decay_tokens,
                   **kwargs)


class CosineSchedule(_Base):
    """Linear warmup then a half cosine from lr_max to the absolute floor lr_min at `total`; lr_min afterwards."""

    kind: Literal["cosine"] = Field(default="cosine", description="Schedule kind.")
    total: int = Field(gt=0, description="Position (in `unit`) where the cosine reaches lr_min; includes warmup.")

    @model_validator(mode="after")
    def _check(self) -> CosineSchedule:
        self._check_lrs()
        if self.warmup > self.total:
            raise ValueError(f"warmup={self.warmup} must be <= total={self.total}")
        return self

    def lr_at(self, x: float) -> float:
        x = _check_position(x)
        if x < self.warmup:
            return self._warmup_lr(x)
        if x >= self.total:
            return self.lr_min
        p = (x - self.warmup) / (self.total - self.warmup)
        return self.lr_min + (self.lr_max - self.lr_min) * decay_shape(p, "cosine")


Schedule = Annotated[WSDSchedule | CosineSchedule, Field(discriminator="kind")]


class _HasParamGroups(Protocol):
    param_groups: list[dict[str, Any]]


class LRScheduler:
    """Sets `lr` of every param group to `base_lr * schedule.lr_at(x) / schedule.lr_max`.

    Works with any optimizer exposing `param_groups` (torch optimizers, `MuonWithAdamW`). The base lr of a group is
    its `lr` when the scheduler first sees it (kept in the group as `initial_lr`, as torch's schedulers do), so a group
    added to the optimizer later (parameters grown during training) joins the schedule at the next `step`, provided it
    was added with its base lr. The lr set by `step(x)` is the one the *next* optimizer step uses; call
    `step(steps_done)` or `step(tokens_seen)` after each optimizer step. The constructor applies `lr_at(position)`.
    """

    def __init__(self, optimizer: _HasParamGroups, schedule: WSDSchedule | CosineSchedule, position: float = 0.0):
        self.optimizer = optimizer
        self.schedule = schedule
        self.position = 0.0
        self.step(position)

    @property
    def base_lrs(self) -> list[float]:
        return [float(g.setdefault("initial_lr", g["lr"])) for g in self.optimizer.param_groups]

    def step(self, position: float | None = None) -> None:
        """Move to `position` (steps done or tokens seen); `None` advances one step (unit 'steps' only)."""
        if position is None:
            if self.schedule.unit != "steps":
                raise ConfigError("LRScheduler.step() without a position needs unit='steps'; pass tokens seen")
            position = self.position + 1
        factor = self.schedule.multiplier_at(position)
        for group in self.optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
        self.position = float(position)

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "base_lrs": list(self.base_lrs), "schedule": self.schedule.model_dump()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore position and base lrs and re-apply the lr (the schedule itself comes from the config)."""
        base_lrs = [float(x) for x in state["base_lrs"]]
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise CheckpointError(f"scheduler state has {len(base_lrs)} base lrs but the optimizer has "
                                  f"{len(self.optimizer.param_groups)} param groups; resume with the same groups")
        for group, base in zip(self.optimizer.param_groups, base_lrs, strict=True):
            group["initial_lr"] = base
        self.step(float(state["position"]))
