"""MOR-3: the transition table, exhaustively: every legal edge works, every other pair raises."""

from __future__ import annotations

import itertools

import pytest

from cambium.morph.contracts import SeedState
from cambium.morph.lifecycle import TRANSITIONS, EpochClock, Lifecycle, LifecycleError

S = SeedState
ALL_PAIRS = list(itertools.product(SeedState, SeedState))

# The table written out independently of the implementation, so a silent edit of TRANSITIONS fails here.
EXPECTED = {
    (S.DORMANT, S.GERMINATED), (S.GERMINATED, S.LOADING), (S.GERMINATED, S.CULLED), (S.LOADING, S.TRAINING),
    (S.LOADING, S.CULLED), (S.TRAINING, S.GRAFTING), (S.TRAINING, S.CULLED), (S.TRAINING, S.ROLLED_BACK),
    (S.GRAFTING, S.STABILIZATION), (S.GRAFTING, S.ROLLED_BACK), (S.STABILIZATION, S.EVALUATING),
    (S.STABILIZATION, S.ROLLED_BACK), (S.EVALUATING, S.FINE_TUNING), (S.EVALUATING, S.CULLED),
    (S.EVALUATING, S.ROLLED_BACK), (S.FINE_TUNING, S.FOSSILIZED), (S.FINE_TUNING, S.ROLLED_BACK),
    (S.CULLED, S.DORMANT), (S.ROLLED_BACK, S.DORMANT),
}


def _at(state: SeedState) -> Lifecycle:
    """A lifecycle forced into `state` (test setup only)."""
    life = Lifecycle("s", EpochClock())
    life.state = state
    return life


def test_table_is_the_documented_one():
    assert len(SeedState) == 11
    assert {(a, b) for a, ts in TRANSITIONS.items() for b in ts} == EXPECTED


@pytest.mark.parametrize(("source", "target"), ALL_PAIRS, ids=lambda s: s.value)
def test_every_pair(source, target):
    life = _at(source)
    with life.clock.boundary(5):
        if (source, target) in EXPECTED:
            change = life.transition(target, reason="test")
            assert life.state == target and change.source == source and change.epoch == 5
            assert life.history == [change]
        else:
            with pytest.raises(LifecycleError, match=f"illegal transition {source.value} -> {target.value}"):
                life.transition(target)
            assert life.state == source and life.history == []


def test_mid_epoch_transition_raises():
    life = Lifecycle("s", EpochClock())
    with pytest.raises(LifecycleError, match="mid-epoch"):
        life.transition(S.GERMINATED)
    assert life.state == S.DORMANT


def test_happy_path_and_epochs_in_state():
    clock = EpochClock()
    life = Lifecycle("s", clock)
    path = [S.GERMINATED, S.LOADING, S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING,
            S.FOSSILIZED]
    for epoch, state in enumerate(path, start=1):
        with clock.boundary(epoch):
            life.transition(state)
    assert [c.target for c in life.history] == path
    clock.epoch = 12
    assert life.epochs_in_state() == 12 - len(path)
    with clock.boundary(13), pytest.raises(LifecycleError, match="none \\(terminal\\)"):
        life.transition(S.DORMANT)
