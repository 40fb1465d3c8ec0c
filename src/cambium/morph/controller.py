"""Tamiyo, the controller: decides at each epoch boundary which seeds germinate, and with which blueprint.

The heuristic policy: a seed is a candidate if it is DORMANT, its location is not embargoed
(`epoch >= embargo_until`), and its epoch telemetry has `health_score < health_threshold` (0.3) with
`confidence > confidence_threshold` (0.7). Candidates are taken least healthy first, at most
`max_adaptations_per_epoch - adaptations_this_epoch` of them. The blueprint is the next untried one of the list for
the location's layout (conv `[B, C, H, W]`, tokens `[B, T, D]`, flat `[B, D]`): after k failures, the k-th
(cyclically). Every call's wall time is kept (`latencies_ms`), the decision latency of the policy.
"""

from __future__ import annotations

import time
from typing import Protocol

from cambium.morph.config import PolicyConfig
from cambium.morph.contracts import AdaptationKind, AdaptationSignal, HealthSignal, Seed, SeedState, SystemStatePacket

__all__ = ["HeuristicPolicy", "Policy"]


class Policy(Protocol):
    """What Tolaria needs from a controller; a learned (GNN) policy implements the same call."""

    latencies_ms: list[float]

    def decide(self, packet: SystemStatePacket) -> list[AdaptationSignal]: ...


class HeuristicPolicy:
    def __init__(self, cfg: PolicyConfig, max_adaptations_per_epoch: int = 2) -> None:
        self.cfg = cfg
        self.max_adaptations = max_adaptations_per_epoch
        self.latencies_ms: list[float] = []

    def blueprint_for(self, seed: Seed) -> str | None:
        options = {2: self.cfg.blueprints_flat, 3: self.cfg.blueprints_tokens, 4: self.cfg.blueprints_conv}.get(
            len(seed.shape), ()
        )
        return options[seed.failures % len(options)] if options else None

    def explain(self, packet: SystemStatePacket) -> dict[str, str]:
        """Why each seed with telemetry in `packet` is a candidate or not: seed_id → 'candidate' or the reason."""
        seeds = {s.seed_id: s for s in packet.seeds}
        out = {}
        for h in packet.health:
            seed = seeds.get(h.seed_id)
            if seed is None:
                why = "no seed with this id in the packet"
            elif seed.state != SeedState.DORMANT:
                why = f"state {seed.state.value}, not DORMANT"
            elif packet.epoch < seed.embargo_until:
                why = f"embargoed until epoch {seed.embargo_until}"
            elif not h.health_score < self.cfg.health_threshold:
                why = f"health {h.health_score:.3f} >= {self.cfg.health_threshold}"
            elif not h.confidence > self.cfg.confidence_threshold:
                why = f"confidence {h.confidence:.2f} <= {self.cfg.confidence_threshold}"
            elif self.blueprint_for(seed) is None:
                why = f"no blueprint for a location of shape {list(seed.shape)}"
            else:
                why = "candidate"
            out[h.seed_id] = why
        return out

    def decide(self, packet: SystemStatePacket) -> list[AdaptationSignal]:
        t0 = time.perf_counter()
        seeds = {s.seed_id: s for s in packet.seeds}
        budget = self.max_adaptations - packet.adaptations_this_epoch
        candidates: list[tuple[HealthSignal, Seed]] = []
        for h in packet.health:
            seed = seeds.get(h.seed_id)
            if (
                seed is not None
                and seed.state == SeedState.DORMANT
                and packet.epoch >= seed.embargo_until
                and h.health_score < self.cfg.health_threshold
                and h.confidence > self.cfg.confidence_threshold
            ):
                candidates.append((h, seed))
        candidates.sort(key=lambda hs: (hs[0].health_score, hs[1].index))
        out = []
        for h, seed in candidates[: max(budget, 0)]:
            name = self.blueprint_for(seed)
            if name is None:
                continue
            out.append(
                AdaptationSignal(
                    kind=AdaptationKind.GERMINATE, seed_id=seed.seed_id, blueprint_name=name, confidence=h.confidence,
                    reason=f"health {h.health_score:.3f} < {self.cfg.health_threshold} (confidence {h.confidence:.2f})",
                    epoch=packet.epoch,
                )
            )
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        return out
