"""Kasmina, the seed manager: drives every seed of a wrapped model through its lifecycle, safely.

The training loop calls, per step, `observe_loss(loss)` before backward (True = anomaly: end the epoch now) and
`after_backward()` after it; per epoch, `begin_epoch()` instead of `model.train()`, then at the end

    with kasmina.boundary(epoch + 1):
        health = kasmina.close_epoch(val_fn)         # transitions, validation gates, rollbacks, telemetry
        for signal in policy.decide(kasmina.packet(...)):
            bus.publish("control.kasmina.commands", KasminaCommand(...))   # Tolaria (loop.py) does this
        kasmina.execute_commands()

`state_dict()` / `load_state_dict()` carry everything a resumed run needs beyond the wrapped model's and the host
optimizer's state dicts, so that it continues exactly as if never stopped.

Safety, all enforced here (not left to the policy):
- gradient isolation: a TRAINING seed sees `x.detach()` and the slot's tap returns ∂L/∂x unchanged;
- frozen base: while a seed is in one of `freeze_host_in` (default TRAINING..EVALUATING) the host's parameters do
  not require grad and its norm layers keep their running statistics (eval mode), so the host does not move;
- validation gates: EVALUATING needs `metric(seed on) - metric(seed off) >= min_delta` on the validation set;
  FINE_TUNING needs `metric >= evaluated metric - fine_tune_tolerance`;
- rollback: a non-finite loss, or a loss above `loss_spike_factor` × the last good epoch's mean while a seed is
  blended, restores the host to the snapshot taken at the last healthy boundary and rolls the blended seeds back;
- embargo: a culled or rolled-back location may not germinate for `embargo_epochs` epochs;
- at most `max_adaptations_per_epoch` germinations per boundary;
- fallback: a kernel that fails to load or raises in forward leaves the identity path in place and is retired.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from cambium.core.errors import CheckpointError
from cambium.morph.bus import Bus
from cambium.morph.cache import KernelCache
from cambium.morph.compiler import load_kernel
from cambium.morph.config import LifecycleConfig
from cambium.morph.contracts import (
    CommandKind,
    CompilationRequest,
    CompiledKernelArtifact,
    CompileSettings,
    FieldReport,
    HealthSignal,
    KasminaCommand,
    KernelReady,
    KernelStatus,
    Seed,
    SeedState,
    SystemStatePacket,
    parse,
)
from cambium.morph.growth import output_parameters
from cambium.morph.library import Urza
from cambium.morph.lifecycle import ACTIVE, EpochClock, Lifecycle, LifecycleError, is_legal
from cambium.morph.seed_record import SeedRecord
from cambium.morph.slots import Mode
from cambium.morph.wrap import MorphedModel

__all__ = ["Kasmina"]

S = SeedState
BLENDED = frozenset({S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING})
_MODE = {S.TRAINING: Mode.SHADOW, **{s: Mode.BLEND for s in (*BLENDED, S.FOSSILIZED)}}
_GROUP = "kasmina"
Outcome = Literal[SeedState.FOSSILIZED, SeedState.CULLED, SeedState.ROLLED_BACK]


class Kasmina:
    def __init__(
        self, model: MorphedModel, cfg: LifecycleConfig, urza: Urza, bus: Bus, *,
        cache: KernelCache | None = None, settings: CompileSettings | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.urza = urza
        self.bus = bus
        self.cache = cache if cache is not None else KernelCache()
        self.settings = settings if settings is not None else CompileSettings()
        self.clock = EpochClock()
        self.seeds: dict[str, SeedRecord] = {
            loc: SeedRecord(loc, slot, Lifecycle(loc, self.clock)) for loc, slot in model.iter_slots()
        }
        self.reports: list[FieldReport] = []
        self.adaptations_this_epoch = 0
        self.skipped: dict[str, int] = {"embargo": 0, "budget": 0, "not_dormant": 0, "blueprint": 0, "unsupported": 0,
                                      "optimizer_restore": 0, "not_active": 0, "unknown_seed": 0}
        self._seen_commands: set[str] = set()
        self.host_rollbacks = 0
        self._next_request = 0
        self._extras: dict[str, Any] = {}
        self._new_host_params: list[list[nn.Parameter]] = []
        self._fossil_order: list[str] = []
        self._ready: dict[str, KernelReady] = {}
        self._good_loss: float | None = None
        self._loss_sum = 0.0
        self._loss_n = 0
        self._anomaly: str | None = None
        self._init_norms: dict[str, float] = {}
        self._snapshot = self._take_snapshot()

    def register_state(self, name: str, obj: Any) -> None:
        """Include `obj` (anything with state_dict/load_state_dict, e.g. the host optimizer) in rollbacks."""
        self._extras[name] = obj
        self._snapshot = self._take_snapshot()

    def begin_epoch(self) -> None:
        """Train mode, except that a frozen host keeps its normalisation statistics."""
        self.model.train()
        for r in self.seeds.values():
            r.slot.clear_probe()
        if self.host_frozen():
            for m in self.model.host.modules():
                if isinstance(m, _BatchNorm | nn.LayerNorm | nn.GroupNorm):
                    m.eval()
        self._loss_sum, self._loss_n, self._anomaly = 0.0, 0, None

    @property
    def anomaly(self) -> str | None:
        """Why the current epoch was cut short, if it was."""
        return self._anomaly

    def host_frozen(self) -> bool:
        return any(r.life.state.value in self.cfg.freeze_host_in for r in self.seeds.values())

    def host_parameters(self) -> list[nn.Parameter]:
        """The host's parameters including fossilized seeds' (what the host optimizer should own)."""
        params = self.model.host_parameters()
        for r in self.seeds.values():
            if r.life.state == S.FOSSILIZED and r.slot.kernel is not None:
                params.extend(r.slot.kernel.parameters())
        return params

    def take_new_host_params(self) -> list[list[nn.Parameter]]:
        """Parameters fossilized since the last call, one group per seed (add each as a host optimizer group)."""
        out, self._new_host_params = self._new_host_params, []
        return out

    def observe_loss(self, loss: float) -> bool:
        """Record a training step's loss; True if it is an anomaly and the epoch must end now (step not applied)."""
        if not math.isfinite(loss):
            self._anomaly = f"non-finite loss {loss}"
        elif (
            self._good_loss is not None
            and any(r.life.state in BLENDED for r in self.seeds.values())
            and loss > self.cfg.loss_spike_factor * self._good_loss
        ):
            self._anomaly = f"loss spike {loss:.4g} > {self.cfg.loss_spike_factor} × {self._good_loss:.4g}"
        else:
            self._loss_sum += loss
            self._loss_n += 1
            return False
        return True

    def after_backward(self) -> None:
        """Seed updates of one training step (their gradients never reach the host optimizer)."""
        for r in self.seeds.values():
            state = r.life.state
            if state == S.TRAINING:
                if self.cfg.seed_objective == "gradmax":
                    self._gradmax_step(r)
                else:
                    self._reconstruction_step(r)
                continue
            if state in BLENDED and r.optimizer is not None:
                r.optimizer.step()
                r.optimizer.zero_grad(set_to_none=True)
            if state == S.GRAFTING:
                r.graft_step += 1
                r.slot.alpha = min(1.0, r.graft_step / self.cfg.graft_steps)

    def _reconstruction_step(self, r: SeedRecord) -> None:
        """One step of the TRAINING task: f(x) ≈ r* = -η·B·∂L/∂x on the captured activation (host untouched)."""
        slot = r.slot
        x, grad = slot.captured_x, slot.captured_grad
        slot.clear_capture()
        if x is None or grad is None or slot.kernel is None:
            return
        target = -self.cfg.reconstruction_step * x.shape[0] * grad
        try:
            pred = slot.kernel(x)
        except Exception as exc:
            slot.failure = f"{type(exc).__name__}: {exc}"
            return
        loss = (pred - target).pow(2).mean()
        if r.optimizer is not None:
            loss.backward()
            r.optimizer.step()
            # A gradient left here would be added to GRAFTING's first task-loss step (and a resumed run, whose
            # checkpoint holds no gradients, would not add it).
            r.optimizer.zero_grad(set_to_none=True)
        r.recon_sse += loss.detach().double()
        r.recon_energy += target.pow(2).mean().double()

    def _gradmax_step(self, r: SeedRecord) -> None:
        """One step of the gradmax TRAINING task: the kernel's output op stays zero (so does its output), and its
        other parameters take an Adam step up the GradMax score s = ‖∇_θout ⟨f(x), B·∂L/∂x⟩‖², then are scaled back
        to their initial joint norm (GradMax's norm constraint; without it s grows with their scale alone)."""
        slot = r.slot
        x, grad = slot.captured_x, slot.captured_grad
        slot.clear_capture()
        kernel = slot.kernel
        if x is None or grad is None or kernel is None or r.optimizer is None:
            return
        out = output_parameters(kernel)
        out_ids = {id(p) for p in out}
        hidden = [p for p in kernel.parameters() if id(p) not in out_ids]
        if not hidden:
            return
        target = x.shape[0] * grad
        try:  # the math attention kernel: the fused CPU ones have no double backward
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                inner = (kernel(x) * target).sum()
                g_out = torch.autograd.grad(inner, out, create_graph=True, allow_unused=True)
                score = sum((g.pow(2).sum() for g in g_out if g is not None), torch.zeros(()))
                steps = torch.autograd.grad(-score, hidden, allow_unused=True) if score.requires_grad else None
        except Exception as exc:
            slot.failure = f"{type(exc).__name__}: {exc}"
            return
        if steps is not None:
            for p, g in zip(hidden, steps, strict=True):
                p.grad = None if g is None else g.detach()
            r.optimizer.step()
            r.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                norm = torch.sqrt(sum((p.double().pow(2).sum() for p in hidden), torch.zeros((), dtype=torch.float64)))
                ref = self._initial_norm(r, hidden)
                if float(norm) > 0 and ref > 0:
                    for p in hidden:
                        p.mul_(ref / float(norm))
        r.recon_sse += score.detach().double()
        r.recon_energy += 1.0

    def _initial_norm(self, r: SeedRecord, hidden: list[nn.Parameter]) -> float:
        """The joint norm of the kernel's non-output parameters as compiled (from the stored artifact, so a resumed
        run finds the same value without keeping it)."""
        assert r.artifact_id is not None
        if r.artifact_id not in self._init_norms:
            record, payload = self.urza.kernel(r.artifact_id)
            fresh = load_kernel(payload, record)
            out_ids = {id(p) for p in output_parameters(fresh)}
            self._init_norms[r.artifact_id] = math.sqrt(sum(float(p.double().pow(2).sum())
                                                            for p in fresh.parameters() if id(p) not in out_ids))
        return self._init_norms[r.artifact_id]

    @contextmanager
    def boundary(self, epoch: int) -> Iterator[None]:
        """The epoch boundary before `epoch`: lifecycle changes happen inside; a healthy one is snapshotted."""
        with self.clock.boundary(epoch):
            self.adaptations_this_epoch = 0
            yield
            for r in self.seeds.values():
                self._apply_mode(r)
            frozen = self.host_frozen()
            for p in self.host_parameters():
                p.requires_grad_(not frozen)
            if self._anomaly is None:
                self._snapshot = self._take_snapshot()

    def close_epoch(self, val_fn: Callable[[], float]) -> list[HealthSignal]:
        """Run every transition due at this boundary; publish and return the epoch's health signals."""
        epoch = self.clock.epoch
        self._collect_ready()
        if self._anomaly is not None:
            self._rollback_blended(self._anomaly, self._snapshot)
        elif self._loss_n:
            self._good_loss = self._loss_sum / self._loss_n
        for r in self.seeds.values():
            self._advance(r, val_fn)
        ids = list(self.seeds)
        health = self.model.telemetry.summarize(epoch, [r.life.state for r in self.seeds.values()], ids)
        self.model.telemetry.reset()
        for h in health:
            self.bus.publish("telemetry.seed.health", h)
        return health

    def _advance(self, r: SeedRecord, val_fn: Callable[[], float]) -> None:
        state, cfg, slot = r.life.state, self.cfg, r.slot
        in_state = r.life.epochs_in_state()
        if state in ACTIVE and slot.failure is not None:
            self._fail(r, f"kernel failed: {slot.failure}")
            return
        if state == S.GERMINATED:
            ready = self._ready.pop(r.request_id or "", None)
            if ready is None:
                if in_state >= cfg.compile_timeout_epochs:
                    self._finish(r, S.CULLED, f"kernel not ready after {in_state} epochs")
                return
            if ready.status != KernelStatus.READY or ready.artifact is None:
                self._finish(r, S.CULLED, f"compilation failed: {ready.error}")
                return
            r.artifact_id = ready.artifact.artifact_id
            r.life.transition(S.LOADING, "kernel compiled")
            state = S.LOADING
        if state == S.LOADING:
            self._load(r)
        elif state == S.TRAINING:
            if not bool(torch.isfinite(r.recon_sse)):
                self._finish(r, S.ROLLED_BACK, "non-finite reconstruction loss")
            elif in_state >= cfg.training_epochs and cfg.seed_objective == "gradmax":
                score = float(r.recon_sse / r.recon_energy.clamp(min=1.0))
                if score > 0:
                    r.life.transition(S.GRAFTING, f"gradmax score {score:.4g} (mean over the epoch)")
                    slot.alpha = 0.0
                    r.graft_step = 0
                    self._new_optimizer(r)
                else:
                    self._finish(r, S.CULLED, f"gradmax score {score:.4g}: the task loss gives its output no gradient")
            elif in_state >= cfg.training_epochs:
                explained = 1.0 - float(r.recon_sse / r.recon_energy.clamp(min=1e-30))
                if explained > cfg.min_explained:
                    r.life.transition(S.GRAFTING, f"explained {explained:.3f} of the target")
                    slot.alpha = 0.0
                    r.graft_step = 0
                    self._new_optimizer(r)
                else:
                    self._finish(r, S.CULLED, f"explained {explained:.3f} <= min_explained {cfg.min_explained}")
            r.recon_sse.zero_()
            r.recon_energy.zero_()
        elif state == S.GRAFTING and r.graft_step >= cfg.graft_steps:
            slot.alpha = 1.0
            r.life.transition(S.STABILIZATION, f"alpha reached 1 after {r.graft_step} steps")
        elif state == S.STABILIZATION and in_state >= cfg.stabilization_epochs:
            self._evaluate(r, val_fn)
        elif state == S.FINE_TUNING and in_state >= cfg.fine_tune_epochs:
            metric = val_fn()
            assert r.metric_eval is not None
            if metric >= r.metric_eval - cfg.fine_tune_tolerance:
                self._finish(r, S.FOSSILIZED, f"val metric {metric:.4f} held (evaluated {r.metric_eval:.4f})",
                             metric_after=metric)
            else:
                assert r.ft_snapshot is not None
                self._restore(r.ft_snapshot)
                self._finish(r, S.ROLLED_BACK, f"val metric fell to {metric:.4f} from {r.metric_eval:.4f}",
                             metric_after=metric)
        elif state in (S.CULLED, S.ROLLED_BACK) and self.clock.epoch >= r.embargo_until:
            r.life.transition(S.DORMANT, "embargo over")

    def _evaluate(self, r: SeedRecord, val_fn: Callable[[], float]) -> None:
        """A/B on the validation set with the host unchanged: the seed's contribution is the only difference."""
        r.life.transition(S.EVALUATING, "stabilized")
        with_seed = val_fn()
        r.slot.mode = Mode.IDENTITY
        try:
            without = val_fn()
        finally:
            r.slot.mode = Mode.BLEND
        r.metric_without, delta = without, with_seed - without
        if delta >= self.cfg.min_delta:
            r.metric_eval = with_seed
            r.life.transition(S.FINE_TUNING, f"val delta {delta:+.4f} >= {self.cfg.min_delta}")
            r.ft_snapshot = self._take_snapshot()
            self._new_optimizer(r)
        else:
            self._finish(r, S.CULLED, f"val delta {delta:+.4f} < {self.cfg.min_delta}", metric_after=with_seed)

    def _load(self, r: SeedRecord) -> None:
        assert r.artifact_id is not None
        try:
            kernel = self.cache.get(r.artifact_id, self._load_artifact)
        except Exception as exc:  # a bad artifact leaves the identity path in place
            self._finish(r, S.CULLED, f"kernel load failed: {exc}")
            return
        r.slot.kernel = kernel
        r.slot.failure = None
        r.life.transition(S.TRAINING, f"kernel {r.artifact_id[:12]} loaded")
        self._new_optimizer(r)

    def _load_artifact(self, artifact_id: str) -> nn.Module:
        record, payload = self.urza.kernel(artifact_id)
        return load_kernel(payload, record)

    def _new_optimizer(self, r: SeedRecord) -> None:
        assert r.slot.kernel is not None
        params = [p for p in r.slot.kernel.parameters()]
        r.optimizer = torch.optim.Adam(params, lr=self.cfg.seed_lr) if params else None

    def _fail(self, r: SeedRecord, reason: str) -> None:
        if is_legal(r.life.state, S.CULLED):
            self._finish(r, S.CULLED, reason)
        else:
            self._restore(self._snapshot)
            self._finish(r, S.ROLLED_BACK, reason)

    def _rollback_blended(self, reason: str, snapshot: dict[str, Any]) -> None:
        self._restore(snapshot)
        self.host_rollbacks += 1
        for r in self.seeds.values():
            if r.life.state in BLENDED:
                self._finish(r, S.ROLLED_BACK, reason)

    def _finish(self, r: SeedRecord, outcome: Outcome, reason: str, metric_after: float | None = None) -> None:
        r.life.transition(outcome, reason)
        if outcome == S.FOSSILIZED:
            assert r.slot.kernel is not None
            self._new_host_params.append(list(r.slot.kernel.parameters()))
            self._fossil_order.append(r.location)
            r.optimizer = None
        else:
            r.slot.kernel = None
            r.slot.alpha = 0.0
            r.optimizer = None
            r.failures += 1
            r.embargo_until = self.clock.epoch + self.cfg.embargo_epochs
        r.slot.clear_capture()
        r.ft_snapshot = None
        self.reports.append(
            FieldReport(
                seed_id=r.location, blueprint_id=r.blueprint_id, artifact_id=r.artifact_id,
                outcome=outcome, health_at_decision=r.health_at_decision, metric_before=r.metric_without,
                metric_after=metric_after, epoch_started=r.epoch_started, epoch_finished=self.clock.epoch,
                timeline=tuple(r.life.history[r.history_start :]),
            )
        )

    def _apply_mode(self, r: SeedRecord) -> None:
        state, slot = r.life.state, r.slot
        slot.mode = _MODE.get(state, Mode.IDENTITY)
        slot.detach_input = state not in (S.FINE_TUNING, S.FOSSILIZED)
        if state in (S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED):
            slot.alpha = 1.0
        if slot.kernel is not None:
            trainable = state != S.EVALUATING
            for p in slot.kernel.parameters():
                p.requires_grad_(trainable)

    def germinate(self, seed_id: str, blueprint_id: str, *, health: float = 0.0,
                  artifact: CompiledKernelArtifact | None = None) -> bool:
        """Start an adaptation at `seed_id` (inside a boundary). False, and counted, if a safety rule forbids it.
        With `artifact` (a compiled kernel of the blueprint) nothing is compiled: it loads at the next boundary."""
        r = self.seeds.get(seed_id)
        if r is None:
            raise LifecycleError(f"no seed {seed_id!r}; seeds: {', '.join(self.seeds)}")
        if r.life.state != S.DORMANT:
            self.skipped["not_dormant"] += 1
            return False
        if self.clock.epoch < r.embargo_until:
            self.skipped["embargo"] += 1
            return False
        if self.adaptations_this_epoch >= self.cfg.max_adaptations_per_epoch:
            self.skipped["budget"] += 1
            return False
        bp = self.urza.blueprint(blueprint_id)
        if tuple(bp.ir.input_shape) != tuple(r.slot.shape):
            self.skipped["blueprint"] += 1
            return False
        r.history_start = len(r.life.history)
        r.life.transition(S.GERMINATED, f"{bp.name} (health {health:.3f})")
        self.adaptations_this_epoch += 1
        r.blueprint_id, r.artifact_id = bp.blueprint_id, None
        r.health_at_decision, r.epoch_started = health, self.clock.epoch
        r.metric_without = r.metric_eval = None
        r.request_id = f"{seed_id}/{self._next_request}"
        self._next_request += 1
        if artifact is not None:
            self._ready[r.request_id] = KernelReady(request_id=r.request_id, blueprint_id=bp.blueprint_id,
                                                    status=KernelStatus.READY, artifact=artifact)
            return True
        self.bus.publish(
            "compilation.blueprint.submitted",
            CompilationRequest(request_id=r.request_id, blueprint_id=bp.blueprint_id, settings=self.settings),
        )
        return True

    def execute_commands(self) -> int:
        """Run the commands waiting on control.kasmina.commands (each command id once); returns how many ran.

        GERMINATE starts an adaptation (compiling the blueprint); LOAD_KERNEL starts one with an already compiled
        kernel (`artifact_id`, it goes GERMINATED → LOADING at the next boundary); CULL ends an adaptation as the
        lifecycle allows (CULLED, or ROLLED_BACK once the seed is blended); ROLLBACK restores the last known-good
        state and rolls the seed back. A command the seed's state forbids is counted in `skipped`, never raised.
        """
        ran = 0
        for message_id, cmd in self.bus.read("control.kasmina.commands", _GROUP, count=1000):
            if cmd.command_id not in self._seen_commands:
                self._seen_commands.add(cmd.command_id)
                ran += self._execute(cmd)
            self.bus.ack("control.kasmina.commands", _GROUP, message_id)
        return ran

    def _execute(self, cmd: KasminaCommand) -> bool:
        r = self.seeds.get(cmd.seed_id)
        if r is None:
            self.skipped["unknown_seed"] += 1
            return False
        if cmd.kind == CommandKind.GERMINATE and cmd.blueprint_id is not None:
            return self.germinate(cmd.seed_id, cmd.blueprint_id, health=cmd.health)
        if cmd.kind == CommandKind.LOAD_KERNEL and cmd.artifact_id is not None:
            record = self.urza.meta.get_artifact(cmd.artifact_id)
            if record is None or record.status != KernelStatus.READY:
                self.skipped["blueprint"] += 1
                return False
            return self.germinate(cmd.seed_id, record.blueprint_id, health=cmd.health, artifact=record)
        if cmd.kind in (CommandKind.CULL, CommandKind.ROLLBACK):
            state = r.life.state
            if state in (S.DORMANT, S.FOSSILIZED, S.CULLED, S.ROLLED_BACK):
                self.skipped["not_active"] += 1
                return False
            if cmd.kind == CommandKind.CULL:
                self._fail(r, f"culled by command {cmd.command_id}")
            else:
                self._restore(self._snapshot)
                self._finish(r, S.ROLLED_BACK, f"rolled back by command {cmd.command_id}")
            return True
        self.skipped["unsupported"] += 1
        return False

    def _collect_ready(self, block_s: float = 0.0) -> None:
        for message_id, ready in self.bus.read("compilation.kernel.ready", _GROUP, count=1000, block_s=block_s):
            self._ready[ready.request_id] = ready
            self.bus.ack("compilation.kernel.ready", _GROUP, message_id)

    def awaiting_kernels(self) -> set[str]:
        """Request ids of GERMINATED seeds whose compilation outcome has not arrived yet."""
        return {r.request_id for r in self.seeds.values()
                if r.life.state == S.GERMINATED and r.request_id is not None and r.request_id not in self._ready}

    def await_kernels(self, timeout_s: float) -> bool:
        """Wait until every requested compilation has an outcome on the bus (compile workers in other processes);
        False if `timeout_s` passed first (the seeds then wait, and are culled after `compile_timeout_epochs`)."""
        deadline = time.monotonic() + timeout_s
        while self.awaiting_kernels():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._collect_ready(block_s=min(left, 1.0))
        return True

    def seeds_view(self) -> tuple[Seed, ...]:
        return tuple(
            Seed(
                seed_id=loc, index=r.slot.index, location=loc, state=r.life.state, blueprint_id=r.blueprint_id,
                artifact_id=r.artifact_id, alpha=min(max(r.slot.alpha, 0.0), 1.0), state_epoch=r.life.state_epoch,
                embargo_until=r.embargo_until, failures=r.failures, shape=r.slot.shape,  # type: ignore[arg-type]
            )
            for loc, r in self.seeds.items()
        )

    def packet(self, step: int, train_loss: float, health: list[HealthSignal], val_metric: float | None = None
               ) -> SystemStatePacket:
        return SystemStatePacket(
            epoch=self.clock.epoch, step=step, train_loss=train_loss, val_metric=val_metric, health=tuple(health),
            seeds=self.seeds_view(), adaptations_this_epoch=self.adaptations_this_epoch,
        )

    def _take_snapshot(self) -> dict[str, Any]:
        host = {k: v.detach().clone() for k, v in self.model.host.state_dict().items()}
        fossils = {
            loc: copy.deepcopy(r.slot.kernel.state_dict())
            for loc, r in self.seeds.items()
            if r.life.state == S.FOSSILIZED and r.slot.kernel is not None
        }
        extras = {name: copy.deepcopy(obj.state_dict()) for name, obj in self._extras.items()}
        return {"host": host, "fossils": fossils, "extras": extras}

    def _restore(self, snapshot: dict[str, Any]) -> None:
        self.model.host.load_state_dict(snapshot["host"])
        for loc, state in snapshot["fossils"].items():
            kernel = self.seeds[loc].slot.kernel
            if kernel is not None:
                kernel.load_state_dict(state)
        for name, state in snapshot["extras"].items():
            obj = self._extras[name]
            if not isinstance(obj, torch.optim.Optimizer) or len(obj.param_groups) == len(state["param_groups"]):
                obj.load_state_dict(copy.deepcopy(state))
            else:  # a seed fossilized since the snapshot added a param group: keep the current optimizer state
                self.skipped["optimizer_restore"] += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume at this boundary besides the wrapped model's and the host optimizer's state
        dicts: plain values and tensors (loadable with `torch.load(weights_only=True)`). The last-known-good snapshot
        is included because it is not the state at the checkpoint: it predates a boundary that saw an anomaly, and
        it predates the host optimizer groups that fossilized seeds added after it was taken."""
        return {
            "epoch": self.clock.epoch, "seeds": {loc: r.state_dict() for loc, r in self.seeds.items()},
            "good_loss": self._good_loss, "reports": [rep.model_dump(mode="json") for rep in self.reports],
            "skipped": dict(self.skipped), "host_rollbacks": self.host_rollbacks,
            "seen_commands": sorted(self._seen_commands), "next_request": self._next_request,
            "fossil_order": list(self._fossil_order),
            "ready": {key: val.model_dump(mode="json") for key, val in self._ready.items()},
            "snapshot": self._snapshot,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put `state_dict()` back on a freshly assembled manager, before the wrapped model's `load_state_dict`.

        Kernels are rebuilt from the library (hash-verified) so the model's state dict has somewhere to load their
        parameters; compilations that were in flight are submitted again. Afterwards add `fossil_param_groups()` to
        the host optimizer, then load its state.
        """
        if set(state["seeds"]) != set(self.seeds):
            raise CheckpointError(f"the checkpoint has seeds {sorted(state['seeds'])} but the model has "
                                  f"{sorted(self.seeds)}; resume with the run's own seeds.locations")
        self.clock.epoch = int(state["epoch"])
        self._good_loss = state["good_loss"]
        self.reports = [parse(FieldReport, rep) for rep in state["reports"]]
        self.skipped.update(state["skipped"])
        self.host_rollbacks = int(state["host_rollbacks"])
        self._seen_commands = set(state["seen_commands"])
        self._next_request = int(state["next_request"])
        self._fossil_order = list(state["fossil_order"])
        self._ready = {key: parse(KernelReady, val) for key, val in state["ready"].items()}
        self._snapshot = state["snapshot"]
        for loc, saved in state["seeds"].items():
            r = self.seeds[loc]
            r.load_state_dict(saved)
            r.slot.kernel, r.optimizer = None, None
            if r.life.state in _MODE and r.artifact_id is not None:
                r.slot.kernel = self.cache.get(r.artifact_id, self._load_artifact)
                if r.life.state != S.FOSSILIZED:
                    self._new_optimizer(r)
                    if r.optimizer is not None and saved["optimizer"] is not None:
                        r.optimizer.load_state_dict(saved["optimizer"])
            self._apply_mode(r)
            if r.life.state == S.GERMINATED and r.request_id not in self._ready:
                assert r.blueprint_id is not None and r.request_id is not None
                self.bus.publish(
                    "compilation.blueprint.submitted",
                    CompilationRequest(request_id=r.request_id, blueprint_id=r.blueprint_id, settings=self.settings),
                )
        frozen = self.host_frozen()
        for p in self.host_parameters():
            p.requires_grad_(not frozen)

    def fossil_param_groups(self) -> list[list[nn.Parameter]]:
        """The fossilized kernels' parameters, one group per seed, in the order they joined the host optimizer."""
        groups = []
        for loc in self._fossil_order:
            kernel = self.seeds[loc].slot.kernel
            assert kernel is not None
            groups.append(list(kernel.parameters()))
        return groups
