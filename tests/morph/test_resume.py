"""Exact resume: the tiny morph config stopped after any epoch and resumed ends bit-identical to a run never stopped
(accuracies, parameter counts, every seed's lifecycle timeline, field reports, safety counters); the seed manager's
state dict round trip continues exactly; no seed gradient outlives its step (checkpoints hold no gradients)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

from cambium.core.config import load
from cambium.morph.config import CONFIG_MODEL, MorphConfig
from cambium.morph.contracts import SeedState
from cambium.morph.train import train

from ._harness import Harness, assert_same_state

TINY = "configs/morph/tiny.toml"
EPOCHS = 6
NOT_COMPARED = {"run_id", "tamiyo_latency_ms_median"}
"""The run's id and the policy's wall-clock decision latency; every other report field must match exactly.
(Timelines hold no wall-clock field: a StateChange is epoch, source, target and reason.)"""


def _cfg(root: Path) -> MorphConfig:
    cfg = load(TINY, CONFIG_MODEL, [f"library.root={root}/urza"])
    assert cfg.train.epochs == EPOCHS, "the stop points below assume the tiny config's 6 epochs"
    return cfg


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in NOT_COMPARED}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the autouse one-thread fixture is function-scoped and starts after this one
    try:
        root = tmp_path_factory.mktemp("uninterrupted")
        report = train(_cfg(root), name="full", runs_root=root / "runs")
    finally:
        torch.set_num_threads(before)
    assert report["epochs_done"] == EPOCHS
    # The comparison means something only if seeds moved through their lifecycle, more than once somewhere.
    timelines = [s["timeline"] for s in report["seeds"].values()]
    assert all(timelines) and max(sum(c["target"] == "GERMINATED" for c in t) for t in timelines) >= 2
    return report


@pytest.mark.parametrize(
    "stops", [(1,), (2,), (3,), (4,), (5,), (1, 1, 1, 1, 1)],
    ids=["after-1", "after-2", "after-3", "after-4", "after-5", "after-every-epoch-in-turn"],
)
def test_stopped_and_resumed_run_equals_the_uninterrupted_one(
    reference: dict[str, Any], tmp_path: Path, stops: tuple[int, ...]
) -> None:
    cfg = _cfg(tmp_path)
    report = train(cfg, name="part", runs_root=tmp_path / "runs", stop_after=stops[0])
    run_id, done = report["run_id"], stops[0]
    assert report["epochs_done"] == done
    for stop in (*stops[1:], None):
        report = train(cfg, name="part", runs_root=tmp_path / "runs", resume=run_id, stop_after=stop)
        done = EPOCHS if stop is None else done + stop
        assert report["epochs_done"] == done
    got, want = _comparable(report), _comparable(reference)
    for loc in want["seeds"]:
        assert got["seeds"][loc]["timeline"] == want["seeds"][loc]["timeline"], loc
    for key in ("val_acc", "test_acc", "params", "host_params", "steps"):
        assert got[key] == want[key], key
    assert got == want


def _through_disk(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _fossilize(h: Harness) -> None:
    for _ in range(2):  # the slot learns its activation shape from the first sampled forwards
        h.run_epoch()
    assert h.germinate(h.m.urza.template("residual_mlp", ("B", 8)).blueprint_id)
    for _ in range(12):
        h.run_epoch()
        if h.state() == SeedState.FOSSILIZED:
            return
    raise AssertionError(f"the seed ended {h.state()}, not FOSSILIZED")


def test_seed_manager_restored_from_its_state_dict_continues_exactly(tmp_path: Path) -> None:
    # At a fossilization boundary the last-known-good snapshot predates the host optimizer's new group, so it is not
    # the state at the checkpoint: the state dict must carry it.
    a, b = Harness(tmp_path), Harness(tmp_path)  # one library: the restored side reloads the kernel from it
    try:
        _fossilize(a)
        saved = _through_disk({"seeds": a.m.kasmina.state_dict(), "model": a.m.model.state_dict(),
                               "optimizer": a.opt.state_dict()})
        b.m.kasmina.load_state_dict(saved["seeds"])
        for group in b.m.kasmina.fossil_param_groups():
            b.opt.add_param_group({"params": group})
        b.m.model.load_state_dict(saved["model"])
        b.opt.load_state_dict(saved["optimizer"])
        b.t.step, b.epoch = a.t.step, a.epoch
        assert_same_state(b.m.kasmina.state_dict(), a.m.kasmina.state_dict(), "seeds")
        for _ in range(2):
            a.run_epoch()
            b.run_epoch()
        for name, x, y in (("model", a.m.model, b.m.model), ("seeds", a.m.kasmina, b.m.kasmina),
                           ("optimizer", a.opt, b.opt)):
            assert_same_state(y.state_dict(), x.state_dict(), name)
    finally:
        a.close()
        b.close()


def test_no_seed_gradient_outlives_its_step(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        for _ in range(2):
            h.run_epoch()
        assert h.germinate(h.m.urza.template("residual_mlp", ("B", 8)).blueprint_id)
        seen = set()
        for _ in range(12):
            h.run_epoch()
            kernel = h.m.kasmina.seeds["1"].slot.kernel
            if h.state() == SeedState.FOSSILIZED or kernel is None:
                break
            seen.add(h.state())
            assert all(p.grad is None for p in kernel.parameters()), h.state()
        assert {SeedState.TRAINING, SeedState.GRAFTING} <= seen
    finally:
        h.close()
