"""Simic's replay buffer in Urza: what Tamiyo saw and did at each epoch boundary, and how each adaptation ended.

The trainer records, at every boundary of a run (`ReplayRecorder.record`, called by Tolaria):
- one `BoundaryRecord` in Urza's `decisions` table: the SystemStatePacket the policy saw (the observation: every
  seed's telemetry, state, shape, embargo and failures; the graph is rebuilt from it, cambium.morph.gnn), the
  AdaptationSignals it returned (the action) and the adaptation budget;
- each FieldReport that finished at that boundary in the `field_reports` table (the outcome).
Dedupe keys: `<run id>/<epoch>` for a boundary, `<run id>/<seed>/<epoch started>/<epoch finished>` for a report. A
resumed run repeats the boundaries after its last checkpoint (and, after a SIGKILL, some already recorded): those
keys are stored already, so nothing is recorded twice.

`load_experience(urza)` joins the two: per boundary, per seed, the action taken and — for a germination — its
outcome, found as the FieldReport of the same run and seed whose `epoch_started` is the boundary's epoch.

Reward of an action (one step: an adaptation's outcome is credited to the decision that started it):
    WAIT 0;  GERMINATE → FOSSILIZED +1, CULLED -0.5, ROLLED_BACK -1, plus clip(10 · (metric_after - metric_before),
    ±1) when both validation metrics are known (the measured gain of the seed); a germination whose adaptation had
    not finished when the run ended has no reward (it is cloned, not weighted).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from cambium.morph.contracts import AdaptationSignal, Contract, FieldReport, SeedState, SystemStatePacket, parse
from cambium.morph.library import Urza

__all__ = ["BoundaryRecord", "Experience", "ReplayRecorder", "load_experience", "reward_of"]

_BASE = {SeedState.FOSSILIZED: 1.0, SeedState.CULLED: -0.5, SeedState.ROLLED_BACK: -1.0}


class BoundaryRecord(Contract):
    """One epoch boundary of a run as Simic sees it."""

    run_id: str = Field(min_length=1)
    policy: str = Field(description="kind of policy that decided ('heuristic', 'gnn', 'remote')")
    budget: int = Field(ge=0, description="max_adaptations_per_epoch of the run")
    packet: SystemStatePacket = Field(description="what the policy saw")
    signals: tuple[AdaptationSignal, ...] = Field(description="what it decided")


def reward_of(report: FieldReport) -> float:
    r = _BASE[report.outcome]
    if report.metric_before is not None and report.metric_after is not None:
        r += max(-1.0, min(1.0, 10.0 * (report.metric_after - report.metric_before)))
    return r


class ReplayRecorder:
    """Writes a run's boundaries and FieldReports into Urza with dedupe keys."""

    def __init__(self, urza: Urza, run_id: str, *, policy: str, budget: int) -> None:
        self.urza, self.run_id, self.policy, self.budget = urza, run_id, policy, budget

    def record(self, packet: SystemStatePacket, signals: list[AdaptationSignal], finished: list[FieldReport]) -> None:
        rec = BoundaryRecord(run_id=self.run_id, policy=self.policy, budget=self.budget, packet=packet,
                             signals=tuple(signals))
        for rep in finished:
            key = f"{self.run_id}/{rep.seed_id}/{rep.epoch_started}/{rep.epoch_finished}"
            self.urza.meta.add_field_report(rep, key=key, run_id=self.run_id)
        self.urza.meta.add_decision(self.run_id, packet.epoch, f"{self.run_id}/{packet.epoch}", rec.model_dump_json())


@dataclass
class Experience:
    """One boundary with the outcome of each germination it started (seed_id → FieldReport; missing = unfinished)."""

    record: BoundaryRecord
    outcomes: dict[str, FieldReport]


def load_experience(urza: Urza) -> list[Experience]:
    """Every recorded boundary of every run, oldest first, joined with its germinations' FieldReports."""
    reports: dict[tuple[str, str, int], FieldReport] = {}
    for run, rep in urza.meta.keyed_field_reports():
        if run is not None:
            reports[(run, rep.seed_id, rep.epoch_started)] = rep
    out = []
    for run, raw in urza.meta.decisions():
        rec = parse(BoundaryRecord, raw)
        outcomes = {}
        for s in rec.signals:
            if s.seed_id is not None and (run, s.seed_id, rec.packet.epoch) in reports:
                outcomes[s.seed_id] = reports[(run, s.seed_id, rec.packet.epoch)]
        out.append(Experience(rec, outcomes))
    return out
