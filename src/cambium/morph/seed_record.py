"""The seed manager's (Kasmina's) bookkeeping for one seed location, and its checkpoint form.

A leaf of `seeds`: it knows the lifecycle and the slot, not the manager. `state_dict()` holds plain values and
tensors only (loadable with `torch.load(weights_only=True)`); the kernel's parameters are not here, they are in the
wrapped model's state dict, and the manager rebuilds the kernel and its optimizer before loading the optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cambium.morph.contracts import SeedState, StateChange, parse
from cambium.morph.lifecycle import Lifecycle
from cambium.morph.slots import SeedSlot

__all__ = ["SeedRecord"]

_PLAIN = ("blueprint_id", "artifact_id", "request_id", "embargo_until", "failures", "health_at_decision",
          "epoch_started", "graft_step", "metric_without", "metric_eval", "history_start")


def _zero() -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64)


@dataclass
class SeedRecord:
    """Everything the manager tracks about one seed besides its slot's forward."""

    location: str
    slot: SeedSlot
    life: Lifecycle
    blueprint_id: str | None = None
    artifact_id: str | None = None
    request_id: str | None = None
    optimizer: torch.optim.Optimizer | None = None
    embargo_until: int = 0
    failures: int = 0
    health_at_decision: float = 1.0
    epoch_started: int = 0
    graft_step: int = 0
    metric_without: float | None = None
    metric_eval: float | None = None
    recon_sse: torch.Tensor = field(default_factory=_zero)
    recon_energy: torch.Tensor = field(default_factory=_zero)
    ft_snapshot: dict[str, Any] | None = None
    history_start: int = 0

    def state_dict(self) -> dict[str, Any]:
        """Lifecycle, history and counters; the seed optimizer's state; the FINE_TUNING rollback snapshot."""
        return {
            "state": self.life.state.value, "state_epoch": self.life.state_epoch,
            "history": [c.model_dump(mode="json") for c in self.life.history],
            **{key: getattr(self, key) for key in _PLAIN},
            "recon_sse": self.recon_sse.clone(), "recon_energy": self.recon_energy.clone(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "ft_snapshot": self.ft_snapshot,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Everything but the kernel and the optimizer (the manager rebuilds those, then loads `state["optimizer"]`)."""
        self.life.state = SeedState(state["state"])
        self.life.state_epoch = int(state["state_epoch"])
        self.life.history = [parse(StateChange, c) for c in state["history"]]
        for key in _PLAIN:
            setattr(self, key, state[key])
        self.recon_sse = state["recon_sse"].clone()
        self.recon_energy = state["recon_energy"].clone()
        self.ft_snapshot = state["ft_snapshot"]
