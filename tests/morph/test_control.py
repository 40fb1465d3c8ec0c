"""MOR-6/MOR-7: Tamiyo's heuristic policy (thresholds, embargo, budget, blueprint rotation, latency) and the Oona
bus (typed topics, consumer groups, at-least-once redelivery, malformed frames counted)."""

from __future__ import annotations

import pytest

from cambium.core.errors import ProtocolError
from cambium.morph.bus import TOPICS, InProcessBus
from cambium.morph.config import PolicyConfig
from cambium.morph.contracts import (
    AdaptationKind,
    CommandKind,
    EpochEvent,
    HealthSignal,
    KasminaCommand,
    Seed,
    SeedState,
    SystemStatePacket,
)
from cambium.morph.controller import HeuristicPolicy


def _health(i, score, conf, epoch=4):
    return HealthSignal(
        seed_id=f"s{i}", index=i, epoch=epoch, state=SeedState.DORMANT, activation_mean=0.0, activation_variance=1.0,
        gradient_norm=1.0, dead_unit_ratio=0.0, health_score=score, confidence=conf, samples=10,
    )


def _seed(i, state=SeedState.DORMANT, embargo=0, failures=0, shape=("B", 8, 4, 4)):
    return Seed(seed_id=f"s{i}", index=i, location=f"l{i}", state=state, embargo_until=embargo, failures=failures,
                shape=shape)


def _packet(health, seeds, epoch=4, used=0):
    return SystemStatePacket(epoch=epoch, step=10, train_loss=1.0, health=tuple(health), seeds=tuple(seeds),
                             adaptations_this_epoch=used)


def test_thresholds_are_strict_and_default_to_the_spec():
    cfg = PolicyConfig()
    assert (cfg.health_threshold, cfg.confidence_threshold) == (0.3, 0.7)
    policy = HeuristicPolicy(cfg)
    health = [_health(0, 0.29, 0.71), _health(1, 0.30, 0.9), _health(2, 0.1, 0.70), _health(3, 0.5, 0.99)]
    out = policy.decide(_packet(health, [_seed(i) for i in range(4)]))
    assert [(s.seed_id, s.kind) for s in out] == [("s0", AdaptationKind.GERMINATE)]
    assert out[0].blueprint_name == "conv_bottleneck" and out[0].confidence == pytest.approx(0.71)
    assert len(policy.latencies_ms) == 1 and policy.latencies_ms[0] >= 0


def test_embargo_state_budget_and_ordering():
    policy = HeuristicPolicy(PolicyConfig(), max_adaptations_per_epoch=2)
    health = [_health(i, 0.05 * (i + 1), 0.9) for i in range(5)]
    seeds = [_seed(0, embargo=5), _seed(1, state=SeedState.TRAINING), _seed(2), _seed(3), _seed(4)]
    out = policy.decide(_packet(health, seeds, epoch=4))
    assert [s.seed_id for s in out] == ["s2", "s3"]  # s0 embargoed until 5, s1 busy; least healthy first, 2 max
    assert [s.seed_id for s in policy.decide(_packet(health, seeds, epoch=5))] == ["s0", "s2"]
    assert [s.seed_id for s in policy.decide(_packet(health, seeds, epoch=4, used=1))] == ["s2"]


def test_blueprint_rotates_after_failures_and_by_layout():
    policy = HeuristicPolicy(PolicyConfig())
    names = [policy.blueprint_for(_seed(0, failures=k)) for k in range(4)]
    assert names == ["conv_bottleneck", "squeeze_excitation", "attention", "conv_bottleneck"]
    assert policy.blueprint_for(_seed(0, shape=("B", "T", 8))) == "low_rank_adapter"
    assert policy.blueprint_for(_seed(0, shape=("B", 8))) == "residual_mlp"
    assert policy.blueprint_for(_seed(0, shape=())) is None


def test_bus_topics_are_the_origins_and_typed():
    assert set(TOPICS) == {
        "telemetry.seed.health", "control.kasmina.commands", "compilation.blueprint.submitted",
        "compilation.kernel.ready", "system.events.epoch",
    }
    bus = InProcessBus()
    with pytest.raises(ProtocolError, match="carries KasminaCommand"):
        bus.publish("control.kasmina.commands", _health(0, 0.1, 0.9))
    with pytest.raises(ProtocolError, match="unknown topic"):
        bus.publish("nope", _health(0, 0.1, 0.9))


def test_consumer_groups_ack_and_redelivery():
    bus = InProcessBus()
    got = []
    bus.subscribe("system.events.epoch", got.append)
    for e in range(3):
        bus.publish("system.events.epoch", EpochEvent(epoch=e, step=e, train_loss=1.0))
    assert [m.epoch for m in got] == [0, 1, 2]
    first = bus.read("system.events.epoch", "a", count=2)
    assert [m.epoch for _, m in first] == [0, 1]
    assert [m.epoch for _, m in bus.read("system.events.epoch", "b")] == [0, 1, 2]  # groups are independent
    bus.ack("system.events.epoch", "a", first[0][0])
    assert bus.pending("system.events.epoch", "a") == 1
    # At-least-once: the unacked message comes again on redelivery, then the fresh one.
    again = bus.read("system.events.epoch", "a", redeliver=True)
    assert [m.epoch for _, m in again] == [1, 2]
    assert bus.read("system.events.epoch", "a") == []


def test_malformed_frames_are_counted_not_raised():
    bus = InProcessBus()
    ok = KasminaCommand(command_id="c", kind=CommandKind.GERMINATE, seed_id="s", epoch=1)
    assert bus.publish_raw("control.kasmina.commands", ok.model_dump_json()) is not None
    assert bus.publish_raw("control.kasmina.commands", '{"command_id": "c"}') is None
    assert bus.publish_raw("control.kasmina.commands", "not json") is None
    assert bus.rejected == 2
    assert len(bus.log("control.kasmina.commands")) == 1
