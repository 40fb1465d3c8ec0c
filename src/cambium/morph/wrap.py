"""`wrap(model, cfg)`: seed slots after chosen modules of any nn.Module (the origin's `esper.wrap()`).

Slots are attached with forward hooks, so the host's code and module tree are untouched: whatever calls the chosen
module (an nn.Sequential, a custom forward, a block loop in a transformer) gets the slot's output instead. The chosen
module must return a Tensor. The host's own parameters are remembered at wrap time; everything else that appears
later (seed kernels) is not host until it is fossilized.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cambium.core.errors import ConfigError
from cambium.morph.config import SeedsConfig
from cambium.morph.slots import SeedSlot
from cambium.morph.telemetry import HealthParams, SeedTelemetry

__all__ = ["MorphedModel", "suggest_locations", "wrap"]


def _hook(slot: SeedSlot, module: nn.Module, args: Any, out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"seed location after {type(module).__name__} returns {type(out).__name__}, not a Tensor; choose a "
            "module whose output is one tensor (e.g. the whole block rather than an inner layer returning a tuple)"
        )
    # slot.forward, not slot(): the nn.Module call machinery would double the per-forward Python cost.
    return slot.forward(out)


class MorphedModel(nn.Module):
    """The host plus its seed slots. `forward` is the host's; slots run from hooks."""

    def __init__(self, host: nn.Module, locations: tuple[str, ...], cfg: SeedsConfig) -> None:
        super().__init__()
        modules = dict(host.named_modules())
        missing = [loc for loc in locations if loc not in modules or loc == ""]
        if missing:
            names = [n for n in modules if n]
            raise ConfigError(
                f"seed locations {missing} are not modules of {type(host).__name__}; known: {names[:40]}"
                + (" ..." if len(names) > 40 else "")
            )
        if not locations:
            raise ConfigError("seeds.locations is empty; name at least one module (see suggest_locations)")
        self.host = host
        self.locations = tuple(locations)
        self._host_param_ids = {id(p) for p in host.parameters()}
        self.telemetry = SeedTelemetry(
            len(locations),
            HealthParams(cfg.dead_threshold, cfg.var_floor, cfg.pressure_ref, cfg.confidence_half_samples),
        )
        self.slots = nn.ModuleDict(
            {_key(loc): SeedSlot(i, self.telemetry, cfg.telemetry_every) for i, loc in enumerate(locations)}
        )
        self._targets = [(modules[loc], self.slot(loc)) for loc in locations]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.attach()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.host(*args, **kwargs)

    def slot(self, location: str) -> SeedSlot:
        s = self.slots[_key(location)]
        assert isinstance(s, SeedSlot)
        return s

    def iter_slots(self) -> Iterator[tuple[str, SeedSlot]]:
        for loc in self.locations:
            yield loc, self.slot(loc)

    def host_parameters(self) -> list[nn.Parameter]:
        """Parameters of the host as wrapped (fossilized kernels are added by Kasmina.host_parameters)."""
        return [p for p in self.host.parameters() if id(p) in self._host_param_ids]

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        """Put the slots in the host's path (done by the constructor)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(functools.partial(_hook, s)) for m, s in self._targets]

    def detach(self) -> None:
        """Take every slot out of the host's path (the host runs as if never wrapped, fossilized seeds included)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def unwrap(self) -> nn.Module:
        """Detach and return the host (fossilized seeds are lost; use only on unadapted models)."""
        self.detach()
        return self.host


def _key(location: str) -> str:
    return location.replace(".", "__") or "root"


def wrap(model: nn.Module, cfg: SeedsConfig, locations: tuple[str, ...] | None = None) -> MorphedModel:
    """Inject a DORMANT seed slot after each module named in `locations` (default `cfg.locations`)."""
    return MorphedModel(model, tuple(locations if locations is not None else cfg.locations), cfg)


def suggest_locations(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> tuple[str, ...]:
    """Dotted names of the modules of type `kinds` (e.g. each block of a stack), in definition order."""
    return tuple(name for name, m in model.named_modules() if name and isinstance(m, kinds))
