"""Tolaria, the trainer: the epoch loop that hosts morphogenesis around any model, loss and data.

`assemble(host, cfg)` wires the services — the wrapped model (seed slots), Kasmina, Tamiyo's heuristic policy,
Tezzeret's background compiler (or compile workers in other processes), the Urza library and the Oona bus (embedded
unless `bus` / `urza` are given: cambium.morph.backends opens Redis, PostgreSQL, S3) — and `Tolaria` runs epochs:

    step:     loss → Kasmina.observe_loss (anomaly: the epoch ends here) → backward → host optimizer step (unless
              the host is frozen) → Kasmina.after_backward (seed updates, alpha ramp)
    boundary: wait for compiles in flight (if `await_compiles`; with workers, for their outcomes on the bus up to
              `library.worker_wait_s`) → Kasmina.close_epoch (transitions, gates, rollback,
              telemetry on telemetry.seed.health) → Tamiyo decides → commands on control.kasmina.commands (with any
              sent by the API) → Kasmina executes them → system.events.epoch (the seeds as they now are) →
              fossilized parameters join the host optimizer.

This module knows nothing of run directories or metrics files: `cambium.morph.train` adds those for the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cambium.core.errors import ConfigError
from cambium.morph.bus import Bus, InProcessBus
from cambium.morph.cache import KernelCache
from cambium.morph.catalog import Catalog, Choice, Choices
from cambium.morph.compiler import Tezzeret
from cambium.morph.config import MorphConfig
from cambium.morph.contracts import (
    AdaptationSignal,
    CommandKind,
    CompilationRequest,
    CompileSettings,
    EpochEvent,
    HealthSignal,
    KasminaCommand,
    Seed,
)
from cambium.morph.controller import HeuristicPolicy, Policy, gnn_policy
from cambium.morph.field_reports import ReplayRecorder
from cambium.morph.ir import BlueprintError
from cambium.morph.library import ArtifactError, Urza
from cambium.morph.seeds import Kasmina
from cambium.morph.wrap import MorphedModel, wrap

__all__ = ["EpochResult", "Morphogenesis", "Tolaria", "assemble"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Morphogenesis:
    """The wired services of one morphogenetic model."""

    model: MorphedModel
    kasmina: Kasmina
    policy: Policy
    tezzeret: Tezzeret
    urza: Urza
    bus: Bus
    worker_wait_s: float | None = None
    """Set when compile workers in other processes compile (library.compile_in = 'workers')."""

    def close(self) -> None:
        self.tezzeret.close()


def assemble(
    host: nn.Module, cfg: MorphConfig, *, urza_root: str | Path | None = None,
    on_compile_start: Callable[[CompilationRequest], None] | None = None, bus: Bus | None = None,
    urza: Urza | None = None, policy: Policy | None = None,
) -> Morphogenesis:
    """Wire the services; `bus`, `urza` and `policy` default to the embedded ones (cambium.morph.backends opens
    others; `policy` may be a `cambium.morph.services.TamiyoClient`)."""
    bus = bus if bus is not None else InProcessBus()
    remote = cfg.library.compile_in == "workers"
    if remote and isinstance(bus, InProcessBus):
        raise ConfigError("library.compile_in='workers' needs the bus on Redis (set REDIS_URL): compile workers in "
                          "other processes cannot reach the in-process bus")
    model = wrap(host, cfg.seeds)
    if urza is None:
        urza = Urza.local(urza_root if urza_root is not None else cfg.library.root)
    # With remote workers the local Tezzeret is not subscribed: requests stay on the bus for the workers.
    tezzeret = Tezzeret(
        urza, None if remote else bus, benchmark_batch=cfg.library.benchmark_batch,
        benchmark_repeats=cfg.library.benchmark_repeats, on_start=on_compile_start,
    )
    kasmina = Kasmina(
        model, cfg.lifecycle, urza, bus, cache=KernelCache(cfg.library.cache_bytes),
        settings=CompileSettings(backend=cfg.library.backend, init_seed=cfg.train.seed),
    )
    if policy is None and cfg.controller.kind == "gnn":
        policy = gnn_policy(cfg)
    if policy is None:
        policy = HeuristicPolicy(cfg.policy, cfg.lifecycle.max_adaptations_per_epoch,
                                 rank=gradmax_choices(cfg, urza, tezzeret, kasmina))
    return Morphogenesis(model, kasmina, policy, tezzeret, urza, bus,
                         worker_wait_s=cfg.library.worker_wait_s if remote else None)


def gradmax_choices(cfg: MorphConfig, urza: Urza, tezzeret: Tezzeret, kasmina: Kasmina
                    ) -> Callable[[Seed], list[Choice]] | None:
    """Tamiyo's ranked blueprint options (`policy.blueprint_choice = 'gradmax'`; None otherwise): the slots keep the
    GradMax probe (activation and loss gradient of their last sampled step) for it."""
    if cfg.policy.blueprint_choice != "gradmax":
        return None
    for r in kasmina.seeds.values():
        r.slot.keep_probe = True
    catalog = Catalog(urza, tezzeret, cfg.policy, cfg.library, kasmina.settings, seed=cfg.train.seed)
    return Choices(catalog, lambda seed_id: kasmina.seeds[seed_id].slot.probe).rank


@dataclass
class EpochResult:
    mean_loss: float
    steps: int
    anomaly: str | None
    seconds: float
    health: list[HealthSignal] = field(default_factory=list)
    decisions: list[AdaptationSignal] = field(default_factory=list)


class Tolaria:
    """Epoch loop over a Morphogenesis: `train_epoch(batches)` then `end_epoch(epoch, val_fn)`."""

    def __init__(
        self, morph: Morphogenesis, optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, await_compiles: bool = True,
    ) -> None:
        self.m = morph
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.await_compiles = await_compiles
        self.step = 0
        self.recorder: ReplayRecorder | None = None
        """Set (by cambium.morph.train) to record each boundary and FieldReport in Urza's replay buffer."""
        morph.kasmina.register_state("host_optimizer", optimizer)

    def train_epoch(self, batches: Iterable[Batch], on_step: Callable[[int, float], None] | None = None
                    ) -> EpochResult:
        k = self.m.kasmina
        k.begin_epoch()
        frozen = k.host_frozen()
        total, steps, t0 = 0.0, 0, time.perf_counter()
        for x, y in batches:
            loss = self.loss_fn(self.m.model(x), y)
            value = float(loss.detach())
            if k.observe_loss(value):
                break
            self.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:  # not the case with a frozen host whose only seed kernel just failed
                loss.backward()
            if not frozen:
                self.optimizer.step()
            k.after_backward()
            self.step += 1
            steps += 1
            total += value
            if on_step is not None:
                on_step(self.step, value)
        return EpochResult(total / max(steps, 1), steps, k.anomaly, time.perf_counter() - t0)

    def end_epoch(self, epoch: int, result: EpochResult, val_fn: Callable[[], float]) -> EpochResult:
        """The boundary after epoch `epoch` (0-based): transitions, then new decisions."""
        k, bus = self.m.kasmina, self.m.bus
        if self.await_compiles:
            self.m.tezzeret.wait_idle()
            if self.m.worker_wait_s is not None:
                self.m.kasmina.await_kernels(self.m.worker_wait_s)
        with k.boundary(epoch + 1):
            reports_before = len(k.reports)
            result.health = k.close_epoch(val_fn)
            packet = k.packet(self.step, result.mean_loss, result.health)
            result.decisions = self.m.policy.decide(packet)
            shapes = {s.seed_id: s.shape for s in packet.seeds}
            issued = 0
            for signal in result.decisions:
                assert signal.seed_id is not None and signal.blueprint_name is not None
                try:
                    bp = (self.m.urza.blueprint(signal.blueprint_id) if signal.blueprint_id is not None
                          else self.m.urza.template(signal.blueprint_name, shapes[signal.seed_id]))
                except (BlueprintError, ArtifactError):
                    k.skipped["blueprint"] += 1
                    continue
                issued += 1
                # Named by the boundary, not by a counter kept here: Kasmina ignores ids it has seen, and that set is
                # checkpointed, so ids restarting from 1 after a resume would drop the resumed run's commands.
                bus.publish(
                    "control.kasmina.commands",
                    KasminaCommand(
                        command_id=f"cmd-{epoch + 1}-{issued}", kind=CommandKind.GERMINATE, seed_id=signal.seed_id,
                        blueprint_id=bp.blueprint_id, health=_health_of(result.health, signal.seed_id),
                        epoch=epoch + 1,
                    ),
                )
            k.execute_commands()
            if self.recorder is not None:
                self.recorder.record(packet, result.decisions, k.reports[reports_before:])
            # After the commands: the seeds as the next epoch will train them (what the API's seed status shows).
            bus.publish(
                "system.events.epoch",
                EpochEvent(epoch=epoch, step=self.step, train_loss=result.mean_loss, seeds=k.seeds_view()),
            )
        for group in k.take_new_host_params():
            self.optimizer.add_param_group({"params": group})
        return result


def _health_of(health: list[HealthSignal], seed_id: str) -> float:
    return next((h.health_score for h in health if h.seed_id == seed_id), 0.0)
