"""The CIFAR-10 run end to end on the committed samples: registry, metrics, checkpoints, report, exact resume."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

from cambium.core.checkpoint import latest_checkpoint, load_checkpoint
from cambium.core.config import load
from cambium.core.metrics import read_metrics
from cambium.core.runs import get_run, list_runs
from cambium.core.testing import check_exact_resume
from cambium.morph.config import CONFIG_MODEL
from cambium.morph.train import host_schedule, train

from ._harness import assert_same_state

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *extra):
    return load("configs/morph/tiny.toml", CONFIG_MODEL,
                [f"library.root={tmp_path}/urza", "train.epochs=3", "data.limit=256", *extra])


def test_tiny_run_registers_logs_and_reports(tmp_path):
    rep = train(_cfg(tmp_path), name="tiny", runs_root=tmp_path / "runs")
    record = get_run(tmp_path / "runs", rep["run_id"])
    assert record.status == "finished" and record.system == "morph"
    rows = read_metrics(record.dir / "metrics.duckdb", ["val_acc"])
    assert len(rows) == 3
    saved = json.loads((record.dir / "report.json").read_text())
    assert saved["epochs_done"] == 3 and 0.0 <= saved["test_acc"] <= 1.0
    # The permissive tiny policy germinates at the first boundary; every seed's timeline is in the report.
    assert any(s["timeline"] for s in saved["seeds"].values())


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_gives_the_numbers_of_an_uninterrupted_run(tmp_path, schedule):
    sets = (f"train.lr_schedule={schedule}", "train.lr_floor=0.1")
    full = train(_cfg(tmp_path / "a", *sets), name="full", runs_root=tmp_path / "a" / "runs")
    part = train(_cfg(tmp_path / "b", *sets), name="part", runs_root=tmp_path / "b" / "runs", stop_after=2)
    assert part["epochs_done"] == 2
    resumed = train(_cfg(tmp_path / "b", *sets), name="part", runs_root=tmp_path / "b" / "runs",
                    resume=part["run_id"])
    assert resumed["epochs_done"] == 3
    for key in ("val_acc", "test_acc", "params", "steps"):
        assert resumed[key] == full[key], key
    assert resumed["seeds"] == full["seeds"]
    # Bit-identical weights (host, seed kernels) and optimizer moments at the last checkpoint.
    ck = {}
    for side in ("a", "b"):
        run_dir = get_run(tmp_path / side / "runs", full["run_id"] if side == "a" else part["run_id"]).dir
        ck[side] = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    assert ck["a"].step == ck["b"].step
    assert_same_state(ck["a"].states["model"], ck["b"].states["model"], "model")  # slots' extra state included
    assert_same_state(ck["a"].states["seeds"], ck["b"].states["seeds"], "seeds")  # the seed manager, snapshot included
    oa, ob = ck["a"].states["optimizer"], ck["b"].states["optimizer"]
    assert [g["lr"] for g in oa["param_groups"]] == [g["lr"] for g in ob["param_groups"]]


def test_host_schedule_is_constant_or_a_cosine_to_the_floor():
    cfg = _cfg("/tmp/unused", "train.lr_schedule=cosine", "train.lr_floor=0.1").train
    schedule = host_schedule(cfg, 100)
    assert schedule is not None
    got = [schedule.multiplier_at(s) for s in range(101)]
    assert got[0] == 1.0 and got[100] == pytest.approx(0.1) and got[50] == pytest.approx(0.55)
    assert all(a > b for a, b in itertools.pairwise(got))
    flat = _cfg("/tmp/unused").train
    assert flat.lr_schedule == "constant" and host_schedule(flat, 100) is None


@pytest.mark.parametrize("morphogenetic", [True, False])
def test_cosine_schedule_ends_every_host_group_at_the_floor(tmp_path, morphogenetic):
    cfg = _cfg(tmp_path, "train.lr_schedule=cosine", "train.lr_floor=0.1",
               f"train.morphogenetic={str(morphogenetic).lower()}")
    rep = train(cfg, name="cos", runs_root=tmp_path / "runs")
    ck = load_checkpoint(latest_checkpoint(get_run(tmp_path / "runs", rep["run_id"]).dir / "checkpoints"))
    groups = ck.states["optimizer"]["param_groups"]
    assert rep["steps"] == ck.data_cursor["task"]["step"] > 0 and ck.step == cfg.train.epochs
    for g in groups:  # the lr the next step would use: 0.1 × the group's base lr, fossilized seeds' groups included
        assert g["lr"] == pytest.approx(0.1 * g["initial_lr"]) and g["initial_lr"] == cfg.train.lr


def test_cli_train_static_baseline_and_report(tmp_path):
    from typer.testing import CliRunner

    from cambium.morph.cli import app

    runner = CliRunner()
    args = ["train", "--config", "configs/morph/tiny.toml", "--runs-dir", str(tmp_path / "runs"), "--no-morphogenetic",
            "--set", "train.epochs=1", "--set", "data.limit=128", "--set", f"library.root={tmp_path}/urza"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (record,) = list_runs(tmp_path / "runs", "morph")
    assert record.name == "tiny-static"
    saved = json.loads((record.dir / "report.json").read_text())
    assert saved["morphogenetic"] is False and "seeds" not in saved
    shown = runner.invoke(app, ["report", record.id, "--runs-dir", str(tmp_path / "runs")])
    assert shown.exit_code == 0 and f"run {record.id}" in shown.output
    # A finished run is extended by --resume with a longer max_steps (its stored config, one key changed) ...
    longer = runner.invoke(app, ["train", "--resume", record.id, "--runs-dir", str(tmp_path / "runs"),
                                 "--set", "train.max_steps=2"])
    assert longer.exit_code == 0, longer.output
    assert json.loads((record.dir / "report.json").read_text())["epochs_done"] == 2
    assert get_run(tmp_path / "runs", record.id).status == "finished"
    # ... and a changed model is refused with the key named, leaving the run as it was.
    wider = runner.invoke(app, ["train", "--resume", record.id, "--runs-dir", str(tmp_path / "runs"),
                                "--set", "model.widths=[8, 8, 8]"])
    assert wider.exit_code != 0 and "model.widths" in str(wider.exception)
    assert get_run(tmp_path / "runs", record.id).status == "finished"


def test_sigkill_at_an_epoch_and_in_a_checkpoint_resume_bitwise(tmp_path):
    """The core loop's SIGKILL harness on the tiny config: killed after a random epoch and while writing a checkpoint,
    resumed from the CLI, every metric row (accuracies, losses, parameters, seed states) equals the uninterrupted
    run's bit for bit."""
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "cambium.cli", "morph", "train", "--config", str(REPO / "configs/morph/tiny.toml"),
               "--runs-dir", str(runs), "--set", f"library.root={tmp_path}/urza", "--set", "train.threads=1"]
    report = check_exact_resume(command, runs_root=runs, n_steps=6, seed=11, cwd=REPO, timeout_s=300)
    assert report.ok, report.summary()
    assert report.reference.rows > 6 * 5
