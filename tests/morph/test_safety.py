"""MOR-3/MOR-4 end to end on a task only a grafted nonlinearity can solve: a good blueprint is fossilized, a bad one
culled, a non-finite loss rolls back to the last known-good state, embargoed locations are skipped, the adaptation
budget holds, and a failing kernel falls back to the identity path."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from cambium.morph.blueprints import make_blueprint
from cambium.morph.contracts import BlueprintIR, IRNode, OpKind, SeedState
from cambium.morph.slots import Mode

from ._harness import Harness

S = SeedState


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def _warm(h: Harness, epochs: int = 2) -> None:
    for _ in range(epochs):
        h.run_epoch()


def _good(h: Harness) -> str:
    return h.m.urza.template("residual_mlp", ("B", 8)).blueprint_id


def _negate(h: Harness) -> str:
    ir = BlueprintIR(input_shape=("B", 8), nodes=(IRNode(id="neg", op=OpKind.SCALE, inputs=("x",),
                                                          attrs={"factor": -1.0}, shape=("B", 8)),), output="neg")
    return h.m.urza.add_blueprint("negate", "negate", ir).blueprint_id


def _run_until(h: Harness, states: set[SeedState], limit: int = 12) -> list[SeedState]:
    seen = [h.state()]
    for _ in range(limit):
        if h.state() in states:
            break
        h.run_epoch()
        seen.extend(c.target for c in h.m.kasmina.seeds["1"].life.history[len(seen) - 1 :])
    return [c.target for c in h.m.kasmina.seeds["1"].life.history]


def test_good_blueprint_is_fossilized_and_improves_accuracy(h):
    _warm(h)
    base = h.accuracy()
    assert base < 0.7  # a linear host cannot solve sign(x0·x1)
    assert h.germinate(_good(h))
    at_freeze = None
    for _ in range(12):
        h.run_epoch()
        if h.state() == S.TRAINING and at_freeze is None:
            at_freeze = (h.accuracy(), copy.deepcopy(h.m.model.host.state_dict()))
        if h.state() == S.GRAFTING:
            # Frozen base: TRAINING changed no host weight.
            assert at_freeze is not None
            for k, v in h.m.model.host.state_dict().items():
                assert torch.equal(v, at_freeze[1][k]), k
        if h.state() in (S.FOSSILIZED, S.CULLED, S.ROLLED_BACK):
            break
    path = [c.target for c in h.m.kasmina.seeds["1"].life.history]
    assert path == [S.GERMINATED, S.LOADING, S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING,
                    S.FINE_TUNING, S.FOSSILIZED]
    report = h.m.kasmina.reports[-1]
    assert report.outcome == S.FOSSILIZED and report.metric_before is not None and at_freeze is not None
    changes = {c.target: c for c in report.timeline}
    assert "val delta +" in changes[S.FINE_TUNING].reason
    # The host stayed frozen from TRAINING to EVALUATING, so the A/B baseline (seed off) is the host's accuracy
    # when it froze: the measured gain is the seed's alone.
    assert report.metric_before == pytest.approx(at_freeze[0], abs=1e-6)
    for _ in range(2):
        h.run_epoch()
    assert h.accuracy() > base + 0.15
    slot = h.m.model.slot("1")
    assert slot.mode == Mode.BLEND and slot.alpha == 1.0 and slot.kernel is not None
    # Fossilized parameters are host parameters now and belong to the host optimizer.
    kernel_ids = {id(p) for p in slot.kernel.parameters()}
    opt_ids = {id(p) for g in h.opt.param_groups for p in g["params"]}
    assert kernel_ids <= opt_ids
    assert kernel_ids <= {id(p) for p in h.m.kasmina.host_parameters()}


def test_bad_blueprint_is_culled(h):
    _warm(h)
    assert h.germinate(_negate(h))
    path = _run_until(h, {S.CULLED, S.FOSSILIZED, S.ROLLED_BACK})
    assert path[-1] == S.CULLED and path[:3] == [S.GERMINATED, S.LOADING, S.TRAINING]
    assert "min_explained" in h.m.kasmina.seeds["1"].life.history[-1].reason
    slot = h.m.model.slot("1")
    assert slot.mode == Mode.IDENTITY and slot.kernel is None
    assert torch.equal(h.m.model(h.vx), h.m.model.host(h.vx))  # identity path, seed gone
    assert h.m.kasmina.reports[-1].outcome == S.CULLED


def test_evaluation_gate_culls_a_seed_that_does_not_pay(tmp_path):
    h = Harness(tmp_path, min_delta=0.9)  # an accuracy gain of 0.9 is impossible: the gate must refuse
    try:
        _warm(h)
        assert h.germinate(_good(h))
        path = _run_until(h, {S.CULLED, S.FOSSILIZED, S.ROLLED_BACK})
        assert path[-2:] == [S.EVALUATING, S.CULLED]
        rep = h.m.kasmina.reports[-1]
        assert rep.metric_after is not None and rep.metric_before is not None
        assert rep.metric_after - rep.metric_before < 0.9
        assert h.m.model.slot("1").mode == Mode.IDENTITY
    finally:
        h.close()


def test_non_finite_loss_rolls_back_to_last_known_good(h):
    _warm(h)
    assert h.germinate(_good(h))
    _run_until(h, {S.FINE_TUNING})
    assert h.state() == S.FINE_TUNING  # host unfrozen: it changes during this epoch
    good_host = copy.deepcopy(h.m.model.host.state_dict())
    good_opt = copy.deepcopy(h.opt.state_dict())
    slot = h.m.model.slot("1")

    def poison(step: int, loss: float) -> None:
        if step == h.t.step and steps_seen.append(step) is None and len(steps_seen) == 3:
            with torch.no_grad():
                next(iter(slot.kernel.parameters())).fill_(float("nan"))

    steps_seen: list[int] = []
    res = h.run_epoch(on_step=poison)
    assert res.anomaly is not None and "non-finite" in res.anomaly and res.steps == 3
    assert h.state() in (S.ROLLED_BACK, S.DORMANT)
    assert S.ROLLED_BACK in [c.target for c in h.m.kasmina.seeds["1"].life.history]
    # The host moved during the 3 fine-tuning steps; after rollback it is bit-identical to the last boundary.
    for k, v in h.m.model.host.state_dict().items():
        assert torch.equal(v, good_host[k]), k
    assert slot.mode == Mode.IDENTITY and slot.kernel is None
    restored = h.opt.state_dict()["state"]
    for pid, st in good_opt["state"].items():
        assert torch.equal(restored[pid]["exp_avg"], st["exp_avg"])
    assert h.m.kasmina.reports[-1].outcome == S.ROLLED_BACK
    res = h.run_epoch()
    assert res.anomaly is None and res.mean_loss == res.mean_loss


def test_embargo_after_cull(tmp_path):
    h = Harness(tmp_path, embargo_epochs=3)
    try:
        _warm(h, 1)
        assert h.germinate(_negate(h))
        _run_until(h, {S.CULLED})
        rec = h.m.kasmina.seeds["1"]
        culled_at = rec.life.state_epoch
        assert rec.embargo_until == culled_at + 3
        # Now let Tamiyo try every epoch (always-adapt thresholds): she must skip the location while embargoed,
        # and Kasmina refuses a direct germination too.
        h.m.policy.cfg = h.m.policy.cfg.model_copy(update={"health_threshold": 1.0})
        assert not h.germinate(_good(h))
        assert h.m.kasmina.skipped["not_dormant"] == 1  # the location stays CULLED for the whole embargo
        while h.epoch + 1 < rec.embargo_until:
            res = h.run_epoch()
            assert res.decisions == [] and h.state() == S.CULLED
        res = h.run_epoch()  # the boundary at embargo_until: back to DORMANT, and eligible again
        assert [d.seed_id for d in res.decisions] == ["1"] and h.state() == S.GERMINATED
        assert [c.target for c in rec.life.history][-2:] == [S.DORMANT, S.GERMINATED]
    finally:
        h.close()


def test_at_most_max_adaptations_per_epoch(tmp_path):
    host = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    h = Harness(tmp_path, host)
    try:
        from cambium.morph.config import SeedsConfig
        from cambium.morph.loop import assemble

        h.close()
        cfg = h.cfg.model_copy(update={"seeds": SeedsConfig(locations=("0", "2", "4"), telemetry_every=1)})
        h.cfg = cfg
        h.m = assemble(host, cfg)
        h.opt = torch.optim.AdamW(h.m.kasmina.host_parameters(), lr=1e-2)
        from cambium.morph.loop import Tolaria

        h.t = Tolaria(h.m, h.opt, nn.functional.cross_entropy)
        res = h.run_epoch()
        assert len(res.decisions) == 2  # three candidates, budget of two
        states = [h.state(s) for s in ("0", "2", "4")]
        assert states.count(S.GERMINATED) == 2 and states.count(S.DORMANT) == 1
        dormant = ("0", "2", "4")[states.index(S.DORMANT)]
        bp = h.m.urza.template("residual_mlp", h.m.model.slot(dormant).shape).blueprint_id
        k = h.m.kasmina
        with k.boundary(h.epoch):
            k.adaptations_this_epoch = 2
            assert not k.germinate(dormant, bp)
        assert k.skipped["budget"] == 1
    finally:
        h.close()


class _Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        raise RuntimeError("kernel fault")


def test_failing_kernel_falls_back_to_identity(h):
    _warm(h)
    assert h.germinate(_good(h))
    _run_until(h, {S.GRAFTING})
    ref = copy.deepcopy(h.m.model.host)
    slot = h.m.model.slot("1")
    slot.kernel = _Exploding()
    out = h.m.model(h.vx)
    assert torch.equal(out, ref(h.vx))  # the fallback is exactly the identity path
    assert slot.failure is not None and "kernel fault" in slot.failure
    h.run_epoch()
    assert h.state() in (S.ROLLED_BACK, S.DORMANT)
    assert slot.kernel is None and slot.mode == Mode.IDENTITY


def test_tampered_artifact_is_rejected_and_seed_culled(h):
    _warm(h, 1)
    bp = make_blueprint("low_rank_adapter", ("B", 8))
    bp_id = h.m.urza.add_blueprint("lora", "low_rank_adapter", bp).blueprint_id
    art = h.m.tezzeret.compile(bp_id, h.m.kasmina.settings)
    path = h.m.urza.objects.root / "objects" / art.artifact_id[:2] / art.artifact_id
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    assert h.germinate(bp_id)
    h.run_epoch()
    assert h.state() == S.CULLED
    assert "hashes to" in h.m.kasmina.seeds["1"].life.history[-1].reason
    assert h.m.model.slot("1").mode == Mode.IDENTITY


def test_loss_spike_while_blended_rolls_back(h):
    _warm(h)
    assert h.germinate(_good(h))
    _run_until(h, {S.GRAFTING})
    good_loss = h.m.kasmina._good_loss
    assert good_loss is not None
    slot = h.m.model.slot("1")

    def spike(step: int, loss: float) -> None:
        with torch.no_grad():  # a finite but huge residual: the loss jumps far above the last good epoch's mean
            for p in slot.kernel.parameters():
                p.mul_(1e3)

    res = h.run_epoch(on_step=spike)
    assert res.anomaly is not None and "loss spike" in res.anomaly and res.steps == 1
    assert S.ROLLED_BACK in [c.target for c in h.m.kasmina.seeds["1"].life.history]
    assert slot.kernel is None and h.m.kasmina.host_rollbacks == 1


def test_commands_are_idempotent(h):
    from cambium.morph.contracts import CommandKind, KasminaCommand

    _warm(h, 1)
    bp = _good(h)
    cmd = KasminaCommand(command_id="once", kind=CommandKind.GERMINATE, seed_id="1", blueprint_id=bp, epoch=1)
    k = h.m.kasmina
    with k.boundary(h.epoch):
        h.m.bus.publish("control.kasmina.commands", cmd)
        h.m.bus.publish("control.kasmina.commands", cmd)  # at-least-once delivery may repeat a command
        assert k.execute_commands() == 1
    assert h.state() == S.GERMINATED and k.skipped["not_dormant"] == 0


def test_grafting_ramps_alpha_linearly_over_graft_steps(h):
    _warm(h, 1)
    assert h.germinate(_good(h))
    _run_until(h, {S.GRAFTING})
    slot = h.m.model.slot("1")
    assert slot.alpha == 0.0 and slot.mode == Mode.BLEND
    alphas: list[float] = []
    h.run_epoch(on_step=lambda step, loss: alphas.append(slot.alpha))
    steps = h.cfg.lifecycle.graft_steps
    assert alphas == [min(1.0, (i + 1) / steps) for i in range(len(alphas))]
    assert len(alphas) >= steps and h.state() == S.STABILIZATION and slot.alpha == 1.0


def test_fine_tuning_gate_failure_restores_the_host_from_fine_tuning_start(h):
    _warm(h)
    assert h.germinate(_good(h))
    _run_until(h, {S.FINE_TUNING})
    assert h.state() == S.FINE_TUNING
    at_start = copy.deepcopy(h.m.model.host.state_dict())
    head = h.m.model.host[2]

    calls: list[int] = []
    steps_per_epoch = len(list(h.batches()))

    def damage(step: int, loss: float) -> None:
        calls.append(step)
        if len(calls) == steps_per_epoch:  # after the last step: no training loss sees it, only the gate does
            with torch.no_grad():  # wreck the head: validation accuracy collapses below the evaluated metric
                head.weight.zero_()
                head.bias.copy_(torch.tensor([5.0, -5.0]))

    h.run_epoch(on_step=damage)
    last = h.m.kasmina.seeds["1"].life.history[-1]
    assert last.target in (S.ROLLED_BACK, S.DORMANT)
    assert any(c.target == S.ROLLED_BACK and "val metric fell" in c.reason
               for c in h.m.kasmina.seeds["1"].life.history)
    for k, v in h.m.model.host.state_dict().items():
        assert torch.equal(v, at_start[k]), k


def test_freeze_host_in_chooses_the_frozen_states(tmp_path):
    """With freeze_host_in = [TRAINING] the host is still during TRAINING and trains again from GRAFTING on."""
    h = Harness(tmp_path, freeze_host_in=("TRAINING",))
    try:
        _warm(h)
        assert h.germinate(_good(h))
        snapshots: dict[SeedState, dict[str, torch.Tensor]] = {}
        for _ in range(8):
            before = copy.deepcopy(h.m.model.host.state_dict())
            state = h.state()
            h.run_epoch()
            if state in (S.TRAINING, S.GRAFTING):
                snapshots[state] = before
            if h.state() == S.STABILIZATION:
                break
        assert set(snapshots) == {S.TRAINING, S.GRAFTING}
        # The epoch spent in TRAINING left the host untouched; the one in GRAFTING moved it.
        host = dict(h.m.model.host.named_parameters())
        grafting_start = snapshots[S.GRAFTING]
        assert any(not torch.equal(host[k], grafting_start[k]) for k in host)
        training_start = snapshots[S.TRAINING]
        assert all(torch.equal(grafting_start[k], training_start[k]) for k in training_start)
    finally:
        h.close()


def test_freeze_host_in_lists_training_or_nothing():
    from cambium.core.config import load
    from cambium.core.errors import ConfigError
    from cambium.morph.config import CONFIG_MODEL

    with pytest.raises(ConfigError, match="list TRAINING too, or nothing"):
        load("configs/morph/tiny.toml", CONFIG_MODEL, ['lifecycle.freeze_host_in=["GRAFTING"]'])
    with pytest.raises(ConfigError, match="lists a state twice"):
        load("configs/morph/tiny.toml", CONFIG_MODEL, ['lifecycle.freeze_host_in=["TRAINING", "TRAINING"]'])
    assert load("configs/morph/tiny.toml", CONFIG_MODEL, ["lifecycle.freeze_host_in=[]"]).lifecycle.freeze_host_in == ()


def test_a_compile_still_in_flight_after_the_timeout_is_culled(tmp_path):
    """With `await_compiles = false` a boundary does not wait for the compiler; a kernel still not ready
    `compile_timeout_epochs` epochs after germination culls the seed, and training went on meanwhile."""
    release = threading.Event()
    h = Harness(tmp_path, on_compile_start=lambda request: release.wait(60), await_compiles=False,
                compile_timeout_epochs=2)
    try:
        _warm(h, 1)
        assert h.germinate(_good(h))
        h.run_epoch()
        assert h.state() == S.GERMINATED  # one epoch in: still waiting, not yet timed out
        h.run_epoch()
        assert h.state() == S.CULLED
        assert "kernel not ready after 2 epochs" in h.m.kasmina.seeds["1"].life.history[-1].reason
    finally:
        release.set()
        h.close()
