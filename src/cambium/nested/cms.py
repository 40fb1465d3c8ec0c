"""The Continuous Memory System (NES-5): each block's memory is k frequency levels.

Legend: B lanes, T tokens, D model width, k levels.

A `Conductor` emits one `Pulse` per outer step (the global step, which levels fire, which open a new accumulation
chunk, the phase). Level i fires on the steps s with (s + 1) % periods[i] == 0, so a level of period p fires on
its p-th, 2p-th, ... step and a period of 1 fires every step. What a level's firing gates:

- its context memory: the memory state the level carries across chunks advances only when it fires (on other steps
  the level still reads and writes inside the chunk, in its forward pass, but the next chunk starts again from the
  state committed when it last fired) — `ContextMemory.update(..., active=pulse.active)`;
- its parameters (projections, gates, learned initial memory): `OuterGradients` adds every step's outer gradient
  of a frozen level into an fp32 buffer and withholds it from the optimiser (`grad = None`: AdamW then neither
  moves nor decays the parameter); on a firing step the level's gradient is the buffer plus that step's gradient,
  i.e. the sum of the gradients of the p steps since it last fired.

The levels of a block read the same input and their outputs combine by `cms.combine`: `sum` (m = Σ_i m_i) or
`mix` (m = Σ_i softmax(w)_i m_i, one learned weight per level, initialised equal). With k = 1 and period 1 the
system is the plain memory, bit for bit (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from cambium.core.errors import CheckpointError
from cambium.nn.memory import MemoryConfig, MemoryLayer, MemoryState

__all__ = ["CmsMemory", "Conductor", "LevelStates", "OuterGradients", "Pulse"]

LevelStates = list[MemoryState | None]  # one entry per CMS level (None: the learned initial memory)
Phase = Literal["build", "eval"]


@dataclass(frozen=True)
class Pulse:
    """What happens at one outer step: `active[i]` level i fires (its memory and parameters update), `opens[i]` this
    step starts level i's accumulation chunk (the first step after it fired), `phase` build or eval."""

    step: int
    active: tuple[bool, ...]
    opens: tuple[bool, ...]
    phase: Phase

    @property
    def all_active(self) -> bool:
        return all(self.active)


class Conductor:
    """Emits the `Pulse` of each outer step (observe with `pulse()`, then `advance()`); its step is checkpointed."""

    def __init__(self, periods: Sequence[int], phase: Phase = "build") -> None:
        self.periods, self.phase, self.step = tuple(periods), phase, 0

    def pulse(self) -> Pulse:
        s = self.step
        return Pulse(s, tuple((s + 1) % p == 0 for p in self.periods), tuple(s % p == 0 for p in self.periods),
                     self.phase)

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "periods": list(self.periods)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("periods", [])) != list(self.periods):
            raise CheckpointError(f"conductor of periods {state.get('periods')} does not fit cms.periods="
                                  f"{list(self.periods)}")
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise CheckpointError(f"conductor step {step!r} must be a non-negative integer")
        self.step = step


class CmsMemory(nn.Module):
    """k memory levels over the same input `[B, T, D]` → combined output `[B, T, D]` and the k final states."""

    def __init__(self, dim: int, heads: int, cfg: MemoryConfig, periods: Sequence[int], combine: str = "sum",
                 seed: int = 0) -> None:
        super().__init__()
        self.periods = tuple(periods)
        # Level 0 keeps the plain memory's seed, so that k = 1 is the plain memory bit for bit.
        self.levels = nn.ModuleList(MemoryLayer(dim, heads, cfg, seed=seed + 7919 * i) for i in range(len(periods)))
        self.mix = nn.Parameter(torch.zeros(len(periods))) if combine == "mix" else None

    def _combine(self, outs: list[torch.Tensor]) -> torch.Tensor:
        if self.mix is not None:
            w = torch.softmax(self.mix.float(), dim=0).to(outs[0].dtype)
            outs = [w[i] * o for i, o in enumerate(outs)]
        total = outs[0]
        for o in outs[1:]:
            total = total + o
        return total

    def forward(self, x: torch.Tensor, states: Sequence[MemoryState | None] | None = None
                ) -> tuple[torch.Tensor, LevelStates]:
        """x `[B, T, D]`, one state per level (None: initial memories) → (`[B, T, D]`, final state per level)."""
        states = list(states) if states is not None else [None] * len(self.levels)
        outs, finals = [], []
        for level, state in zip(self.levels, states, strict=True):
            o, final = level(x, state)
            outs.append(o)
            finals.append(final)
        return self._combine(outs), finals

    def read(self, x: torch.Tensor, states: Sequence[MemoryState | None] | None = None) -> torch.Tensor:
        """Read every level with the queries of x `[B, T, D]`, writing nothing → combined `[B, T, D]`."""
        states = list(states) if states is not None else [None] * len(self.levels)
        return self._combine([level.read(x, s) for level, s in zip(self.levels, states, strict=True)
                              if isinstance(level, MemoryLayer)])


class OuterGradients:
    """fp32 buffers of the outer gradients of frozen CMS levels; `gate(pulse)` runs after backward, before the
    optimiser. `levels[i]` are the parameters of level i (across blocks)."""

    def __init__(self, levels: Sequence[Sequence[nn.Parameter]], periods: Sequence[int]) -> None:
        assert len(levels) == len(periods)
        self.periods = tuple(periods)
        self.levels = [list(ps) for ps in levels]
        # A level that fires every step never buffers (and k = 1 stays the plain memory bit for bit).
        self.buffers = [[torch.zeros_like(p, dtype=torch.float32) for p in ps] if period > 1 else []
                        for ps, period in zip(self.levels, self.periods, strict=True)]
        self.pending = [0] * len(self.periods)  # steps buffered since the level last fired

    def gate(self, pulse: Pulse) -> None:
        """Buffer the gradients of the levels that do not fire (their `.grad` becomes None); give a firing level
        the buffered sum plus this step's gradient, and empty its buffer."""
        for i, (params, bufs) in enumerate(zip(self.levels, self.buffers, strict=True)):
            if self.periods[i] == 1:
                continue
            for p, buf in zip(params, bufs, strict=True):
                grad = p.grad
                used = grad is not None
                if grad is not None:
                    buf.add_(grad.float())
                if pulse.active[i] and not used and not buf.any():
                    continue  # unused in the whole window (a carried memory bypasses the initial one): stays None
                if pulse.active[i]:
                    p.grad = buf.to(p.dtype, copy=True)
                    buf.zero_()
                else:
                    p.grad = None
            self.pending[i] = 0 if pulse.active[i] else self.pending[i] + 1

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"periods": list(self.periods), "pending": list(self.pending)}
        for i, bufs in enumerate(self.buffers):
            out.update({f"l{i}.{j}": b.clone() for j, b in enumerate(bufs)})
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("periods", [])) != list(self.periods):
            raise CheckpointError(f"gradient buffers of periods {state.get('periods')} do not fit cms.periods="
                                  f"{list(self.periods)}")
        for i, bufs in enumerate(self.buffers):
            for j, buf in enumerate(bufs):
                saved = state.get(f"l{i}.{j}")
                if not isinstance(saved, torch.Tensor) or saved.shape != buf.shape:
                    raise CheckpointError(f"gradient buffer l{i}.{j} is missing or has the wrong shape")
                buf.copy_(saved)
        self.pending = [int(x) for x in state["pending"]]
