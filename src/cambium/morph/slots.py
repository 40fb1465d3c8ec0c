"""A seed slot: what runs after a host module, in the three forward modes the lifecycle needs.

- IDENTITY (DORMANT, GERMINATED, LOADING, CULLED, ROLLED_BACK): `y = x`, the very same tensor. On every
  `telemetry_every`-th training forward the slot records activation statistics and taps the gradient of x.
- SHADOW (TRAINING): `y = x` through an identity autograd tap that copies ∂L/∂x aside and passes it on unchanged, so
  the host's gradients are exactly those without the seed (gradient isolation). The seed never sees the host graph:
  it trains later, in `Kasmina.after_backward`, on `x.detach()`.
- BLEND (GRAFTING .. FOSSILIZED): `y = x + α f(x)`. If the kernel raises, the slot falls back to `y = x`, keeps the
  error and Kasmina retires the seed at the next epoch boundary.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
from torch import nn

from cambium.morph.telemetry import SeedTelemetry

__all__ = ["Mode", "SeedSlot"]


class Mode(enum.IntEnum):
    IDENTITY = 0
    SHADOW = 1
    BLEND = 2


class _Tap(torch.autograd.Function):
    """Identity in forward; in backward hands ∂L/∂x to the slot and returns it unchanged."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, slot: SeedSlot) -> torch.Tensor:
        ctx.slot = slot
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.slot._on_grad(grad)
        return grad, None


def _symbolic(x: torch.Tensor) -> tuple[int | str, ...]:
    """The activation shape with the batch as "B" (and the sequence as "T" for `[B, T, D]`)."""
    if x.dim() == 3:
        return ("B", "T", int(x.shape[2]))
    return ("B", *(int(d) for d in x.shape[1:]))


class SeedSlot(nn.Module):
    """One seed location. `kernel` is the compiled blueprint (None until LOADING succeeds)."""

    def __init__(self, index: int, telemetry: SeedTelemetry, telemetry_every: int) -> None:
        super().__init__()
        self.index = index
        self.telemetry = telemetry
        self.telemetry_every = telemetry_every
        self.mode = Mode.IDENTITY
        self.alpha = 0.0
        self.detach_input = True
        self.kernel: nn.Module | None = None
        self.failure: str | None = None
        self.shape: tuple[int | str, ...] = ()
        self._calls = 0
        self._capture = False
        self.captured_x: torch.Tensor | None = None
        self.captured_grad: torch.Tensor | None = None
        # The GradMax probe (policy.blueprint_choice = 'gradmax'): the activation and its loss gradient of the last
        # sampled training step in IDENTITY mode; cleared at the start of every epoch (Kasmina.begin_epoch).
        self.keep_probe = False
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self._probe_x: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.mode
        sample = False
        if self.training:
            self._calls += 1
            sample = self._calls % self.telemetry_every == 0
        if mode == Mode.IDENTITY:
            if sample:
                if not self.shape:
                    self.shape = _symbolic(x)
                self.telemetry.record_forward(self.index, x)
                if x.requires_grad:
                    if self.keep_probe:
                        self._probe_x = x.detach()
                    return _Tap.apply(x, self)
            return x
        if mode == Mode.SHADOW:
            return self._shadow(x, sample)
        return self._blend(x, sample)

    def _shadow(self, x: torch.Tensor, sample: bool) -> torch.Tensor:
        if sample:
            self.telemetry.record_forward(self.index, x)
        if not self.training:
            return x
        self.captured_x = x.detach()
        self.captured_grad = None
        self._capture = True
        if not x.requires_grad:
            # Frozen host: make x a leaf so the downstream graph still yields ∂L/∂x for the seed.
            x = x.detach().requires_grad_(True)
        return _Tap.apply(x, self)

    def _blend(self, x: torch.Tensor, sample: bool) -> torch.Tensor:
        if sample:
            self.telemetry.record_forward(self.index, x)
        kernel = self.kernel
        if kernel is None or self.failure is not None:
            return x
        try:
            r = kernel(x.detach() if self.detach_input else x)
        except Exception as exc:  # a failing kernel must never take the host down
            self.failure = f"{type(exc).__name__}: {exc}"
            return x
        y = x + self.alpha * r if self.alpha != 1.0 else x + r
        if sample and y.requires_grad:
            return _Tap.apply(y, self)
        return y

    def _on_grad(self, grad: torch.Tensor) -> None:
        if self._probe_x is not None:
            self.probe = (self._probe_x, grad.detach())
            self._probe_x = None
        if self._capture:
            self.captured_grad = grad.detach()
            self._capture = False
        if self._calls % self.telemetry_every == 0:
            self.telemetry.record_backward(self.index, grad)

    def get_extra_state(self) -> dict[str, Any]:
        """The slot's state outside its kernel, so `MorphedModel.state_dict()` carries it: blend weight, activation
        shape, and the training-forward count that decides which steps take telemetry (a resumed run must sample the
        same steps as one never stopped)."""
        return {"calls": self._calls, "alpha": self.alpha, "shape": list(self.shape)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._calls = int(state["calls"])
        self.alpha = float(state["alpha"])
        self.shape = tuple(state["shape"])

    def clear_capture(self) -> None:
        self.captured_x = None
        self.captured_grad = None
        self._capture = False

    def clear_probe(self) -> None:
        self.probe = None
        self._probe_x = None

    def extra_repr(self) -> str:
        return f"index={self.index}, mode={self.mode.name}, alpha={self.alpha:.3f}"
