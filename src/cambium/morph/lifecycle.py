"""The seed lifecycle: 11 states, one explicit table of legal transitions, changes only at epoch boundaries.

What each state means — forward y(x) of the slot; what trains; when it leaves (always at an epoch boundary):

- DORMANT: y = x; nothing trains, telemetry only; Tamiyo picks it → GERMINATED.
- GERMINATED: y = x; a compile is requested; kernel ready → LOADING, compile failed or timed out → CULLED.
- LOADING: y = x; the kernel is fetched through the cache; loaded → TRAINING, load failed → CULLED.
- TRAINING: y = x exactly (host frozen, unless `freeze_host_in` is empty); the seed alone learns the reconstruction
  target* (or, with `seed_objective = "gradmax"`, keeps its output op at zero and climbs the GradMax score, see
  cambium.morph.growth); after `training_epochs` → GRAFTING if it explains part of the target (gradmax: a positive
  score), else CULLED; non-finite → ROLLED_BACK.
- GRAFTING: y = x + α f(x), α ramped 0 → 1 over `graft_steps` steps; the seed trains on the task loss, host
  frozen by default (`lifecycle.freeze_host_in`); α reached 1 → STABILIZATION; loss spike / non-finite → ROLLED_BACK.
- STABILIZATION: y = x + f(x); seed trains, host frozen by default; after `stabilization_epochs` → EVALUATING; spike →
  ROLLED_BACK.
- EVALUATING: y = x + f(x); the validation metric is measured with the seed on and off, same host (A/B), inside
  the boundary; delta >= `min_delta` → FINE_TUNING, else CULLED.
- FINE_TUNING: y = x + f(x); host and seed train jointly; after `fine_tune_epochs` the metric must hold within
  `fine_tune_tolerance` → FOSSILIZED, else (or on a spike) → ROLLED_BACK to the state at FINE_TUNING's start.
- FOSSILIZED: y = x + f(x) for good; the kernel's parameters are host parameters now (terminal).
- CULLED: y = x; the location is embargoed for `embargo_epochs`; embargo over → DORMANT.
- ROLLED_BACK: y = x; the host was restored to the last known-good snapshot; embargoed likewise → DORMANT.

*Reconstruction target (TRAINING): with the host frozen and the seed's output not yet used, the seed learns the
residual one gradient step would add to the activation at its location: f(x) ≈ r* = -η · B · ∂L/∂x, where ∂L/∂x is
the gradient of the (batch-mean) task loss w.r.t. the activation x [B, ...] and B the batch size (so r* is the
per-example gradient, independent of B). The seed's loss is mean((f(x.detach()) - r*)²). Grafting x + f(x) then moves
the activation the way the task loss wants, which is what makes a grafted seed useful from its first step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cambium.core.errors import ProtocolError
from cambium.morph.contracts import SeedState, StateChange

__all__ = ["ACTIVE", "TERMINAL", "TRANSITIONS", "EpochClock", "Lifecycle", "LifecycleError", "is_legal"]

S = SeedState

TRANSITIONS: dict[SeedState, frozenset[SeedState]] = {
    S.DORMANT: frozenset({S.GERMINATED}),
    S.GERMINATED: frozenset({S.LOADING, S.CULLED}),
    S.LOADING: frozenset({S.TRAINING, S.CULLED}),
    S.TRAINING: frozenset({S.GRAFTING, S.CULLED, S.ROLLED_BACK}),
    S.GRAFTING: frozenset({S.STABILIZATION, S.ROLLED_BACK}),
    S.STABILIZATION: frozenset({S.EVALUATING, S.ROLLED_BACK}),
    S.EVALUATING: frozenset({S.FINE_TUNING, S.CULLED, S.ROLLED_BACK}),
    S.FINE_TUNING: frozenset({S.FOSSILIZED, S.ROLLED_BACK}),
    S.FOSSILIZED: frozenset(),
    S.CULLED: frozenset({S.DORMANT}),
    S.ROLLED_BACK: frozenset({S.DORMANT}),
}
"""Legal edges. Every pair not listed raises LifecycleError."""

TERMINAL = frozenset({S.FOSSILIZED})
ACTIVE = frozenset({S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING})
"""States in which a seed holds a kernel that may run."""

assert set(TRANSITIONS) == set(SeedState), "the table must list every state"


class LifecycleError(ProtocolError):
    """An illegal lifecycle transition, or a transition attempted in the middle of an epoch."""


def is_legal(source: SeedState, target: SeedState) -> bool:
    return target in TRANSITIONS[source]


class EpochClock:
    """Shared by every lifecycle of a model: transitions are allowed only inside `boundary()`."""

    def __init__(self) -> None:
        self.epoch = 0
        self._open = False

    @property
    def at_boundary(self) -> bool:
        return self._open

    @contextmanager
    def boundary(self, epoch: int) -> Iterator[None]:
        """The boundary after epoch `epoch` - 1 and before `epoch`; lifecycles may change state inside."""
        if self._open:
            raise LifecycleError("epoch boundaries cannot nest")
        self.epoch = epoch
        self._open = True
        try:
            yield
        finally:
            self._open = False


class Lifecycle:
    """The state of one seed and the history of its edges."""

    def __init__(self, seed_id: str, clock: EpochClock) -> None:
        self.seed_id = seed_id
        self.clock = clock
        self.state = SeedState.DORMANT
        self.state_epoch = clock.epoch
        self.history: list[StateChange] = []

    def transition(self, target: SeedState, reason: str = "") -> StateChange:
        """Move to `target`; raise LifecycleError if the edge is not in TRANSITIONS or the clock is mid-epoch."""
        if not self.clock.at_boundary:
            raise LifecycleError(
                f"seed {self.seed_id!r}: {self.state.value} -> {target.value} attempted mid-epoch "
                f"(epoch {self.clock.epoch}); transitions happen only inside EpochClock.boundary()"
            )
        if not is_legal(self.state, target):
            legal = ", ".join(sorted(s.value for s in TRANSITIONS[self.state])) or "none (terminal)"
            raise LifecycleError(
                f"seed {self.seed_id!r}: illegal transition {self.state.value} -> {target.value}; "
                f"legal from {self.state.value}: {legal}"
            )
        change = StateChange(epoch=self.clock.epoch, source=self.state, target=target, reason=reason)
        self.history.append(change)
        self.state = target
        self.state_epoch = self.clock.epoch
        return change

    def epochs_in_state(self) -> int:
        return self.clock.epoch - self.state_epoch
