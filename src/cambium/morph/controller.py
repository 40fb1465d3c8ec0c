"""Tamiyo, the controller: decides at each epoch boundary which seeds germinate, and with which blueprint.

The heuristic policy: a seed is a candidate if it is DORMANT, its location is not embargoed
(`epoch >= embargo_until`), and its epoch telemetry has `health_score < health_threshold` (0.3) with
`confidence > confidence_threshold` (0.7). Candidates are taken least healthy first, at most
`max_adaptations_per_epoch - adaptations_this_epoch` of them. The blueprint (`policy.blueprint_choice`):
- 'cycle': the next untried one of the list for the location's layout (conv `[B, C, H, W]`, tokens `[B, T, D]`,
  flat `[B, D]`): after k failures, the k-th (cyclically);
- 'gradmax': the best of the library's options for the location (`cambium.morph.catalog.Choices`: the list's
  templates and Karn's mutants, compiled, within `library.max_params`, no avoided Urabrask tag; preferred tags first,
  then the largest GradMax score).
With `policy.placement = 'gradmax'` the health threshold is not applied: every DORMANT, unembargoed location with
enough confidence is a candidate, the one whose best blueprint has the largest GradMax score first (a GradMax-style
growth baseline). Every call's wall time is kept (`latencies_ms`), the decision latency of the policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from cambium.core.errors import ConfigError
from cambium.morph.config import MorphConfig, PolicyConfig
from cambium.morph.contracts import AdaptationKind, AdaptationSignal, HealthSignal, Seed, SeedState, SystemStatePacket

if TYPE_CHECKING:
    from cambium.morph.catalog import Choice

__all__ = ["HeuristicPolicy", "Policy", "gnn_policy"]


class Policy(Protocol):
    """What Tolaria needs from a controller; a learned (GNN) policy implements the same call."""

    latencies_ms: list[float]

    def decide(self, packet: SystemStatePacket) -> list[AdaptationSignal]: ...


class HeuristicPolicy:
    def __init__(self, cfg: PolicyConfig, max_adaptations_per_epoch: int = 2, *,
                 rank: Callable[[Seed], list[Choice]] | None = None) -> None:
        """`rank` (`cambium.morph.catalog.Choices.rank`) is required by `blueprint_choice = 'gradmax'`."""
        if cfg.blueprint_choice == "gradmax" and rank is None:
            raise ConfigError("policy.blueprint_choice='gradmax' needs the trainer's seed slots (their GradMax probe) "
                              "and library: only the embedded Tamiyo of a training run has them; use 'cycle' here")
        self.cfg = cfg
        self.max_adaptations = max_adaptations_per_epoch
        self.rank = rank if cfg.blueprint_choice == "gradmax" else None
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
            elif self.cfg.placement == "health" and not h.health_score < self.cfg.health_threshold:
                why = f"health {h.health_score:.3f} >= {self.cfg.health_threshold}"
            elif not h.confidence > self.cfg.confidence_threshold:
                why = f"confidence {h.confidence:.2f} <= {self.cfg.confidence_threshold}"
            elif self.rank is None and self.blueprint_for(seed) is None:
                why = f"no blueprint for a location of shape {list(seed.shape)}"
            else:
                why = "candidate"
            out[h.seed_id] = why
        return out

    def decide(self, packet: SystemStatePacket) -> list[AdaptationSignal]:
        t0 = time.perf_counter()
        seeds = {s.seed_id: s for s in packet.seeds}
        budget = self.max_adaptations - packet.adaptations_this_epoch
        by_health = self.cfg.placement == "health"
        candidates: list[tuple[HealthSignal, Seed]] = []
        for h in packet.health:
            seed = seeds.get(h.seed_id)
            if (
                seed is not None
                and seed.state == SeedState.DORMANT
                and packet.epoch >= seed.embargo_until
                and (not by_health or h.health_score < self.cfg.health_threshold)
                and h.confidence > self.cfg.confidence_threshold
            ):
                candidates.append((h, seed))
        ranked: dict[str, list[Choice]] = {}
        if self.rank is not None and budget > 0:
            ranked = {seed.seed_id: self.rank(seed) for _, seed in candidates}
            candidates = [(h, seed) for h, seed in candidates if ranked[seed.seed_id]]
        if by_health:
            candidates.sort(key=lambda hs: (hs[0].health_score, hs[1].index))
        else:
            candidates.sort(key=lambda hs: (-ranked[hs[1].seed_id][0].score, hs[1].index))
        out = []
        for h, seed in candidates[: max(budget, 0)]:
            why = (f"health {h.health_score:.3f} < {self.cfg.health_threshold}" if by_health
                   else f"health {h.health_score:.3f}") + f" (confidence {h.confidence:.2f})"
            bp_id: str | None = None
            if self.rank is not None:
                best = ranked[seed.seed_id][0]
                name, bp_id = best.name, best.blueprint_id
                why += f"; gradmax {best.score:.3g}, {best.param_count} params, tags {', '.join(best.tags)}"
            else:
                cycled = self.blueprint_for(seed)
                if cycled is None:
                    continue
                name = cycled
            out.append(
                AdaptationSignal(
                    kind=AdaptationKind.GERMINATE, seed_id=seed.seed_id, blueprint_name=name, blueprint_id=bp_id,
                    confidence=h.confidence, reason=why, epoch=packet.epoch,
                )
            )
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        return out


def gnn_policy(cfg: MorphConfig) -> Policy:
    """`controller.kind = 'gnn'`: the GNN policy in the file `controller.policy` (written by Simic)."""
    if cfg.controller.policy is None:
        raise ConfigError("controller.kind='gnn' needs controller.policy, the file `cambium morph simic` wrote")
    from cambium.morph.gnn import GnnPolicy, PolicyFileError  # torch_geometric only when a GNN decides

    try:
        return GnnPolicy.from_file(cfg.controller.policy, cfg.policy, cfg.lifecycle.max_adaptations_per_epoch)
    except PolicyFileError as exc:
        raise ConfigError(f"controller.policy: {exc}") from None
