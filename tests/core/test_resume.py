"""Exact resume, end to end: a real char-level transformer (tests/core/resume_trainer.py) killed with SIGKILL at a
random step and while writing a checkpoint, resumed, and compared row by row (value bits included) with a run that
was never stopped. Set CAMBIUM_RESUME_SEED to replay a particular kill step."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cambium.core.checkpoint import checkpoint_path, latest_checkpoint
from cambium.core.cli import runs_app
from cambium.core.progress import ENV_PROGRESS, ProgressReporter
from cambium.core.runs import get_run, list_runs
from cambium.core.testing import (
    PERF_PREFIX,
    ResumeReport,
    ResumeTestError,
    ScenarioReport,
    check_exact_resume,
    compare_rows,
    metric_key_rows,
)

REPO = Path(__file__).resolve().parents[2]
TRAINER = Path(__file__).with_name("resume_trainer.py")
N_STEPS = 30
CHECKPOINT_EVERY = 5
Resumed = tuple[Path, list[str], dict[str, str], ResumeReport]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Resumed:
    root = tmp_path_factory.mktemp("runs")
    seed = int(os.environ.get("CAMBIUM_RESUME_SEED", random.SystemRandom().randrange(1_000_000)))
    command = [sys.executable, str(TRAINER), "--runs-dir", str(root), "--set", f"train.steps={N_STEPS}",
               "--set", f"train.checkpoint_every={CHECKPOINT_EVERY}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    report = check_exact_resume(command, runs_root=root, n_steps=N_STEPS, seed=seed, env=env, cwd=REPO)
    return root, command, env, report


def _scenario(report: ResumeReport, name: str) -> ScenarioReport:
    return next(s for s in report.scenarios if s.name == name)


def test_sigkill_at_a_random_step_resumes_bitwise(resumed: Resumed) -> None:
    _, _, _, report = resumed
    s = _scenario(report, "kill-at-step")
    context = f"seed={report.seed}\n{report.summary()}"
    assert report.reference.rows == 5 * N_STEPS + N_STEPS // 10, context
    assert s.identical, context
    assert s.rows == report.reference.rows
    assert s.kill_step is not None and 1 <= s.kill_step < N_STEPS
    # The trainer holds right after reporting step k, before that step's own checkpoint.
    assert s.resumed_from == (s.kill_step - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY, context


def test_sigkill_while_writing_a_checkpoint(resumed: Resumed) -> None:
    root, _, _, report = resumed
    s = _scenario(report, "kill-in-checkpoint")
    context = f"seed={report.seed}\n{report.summary()}"
    assert s.identical, context
    assert s.killed_checkpoint_step == N_STEPS // 2 and s.killed_in_temp_dir, context
    assert s.resumed_from == N_STEPS // 2 - CHECKPOINT_EVERY, context
    # Rows of the interrupted steps were on disk at the kill, so truncate_after had real work to do.
    assert s.max_step_on_disk_at_kill == N_STEPS // 2, context
    ckpt_dir = root / s.run_id / "checkpoints"
    assert not [p.name for p in ckpt_dir.iterdir() if p.name.startswith(".")]
    latest = latest_checkpoint(ckpt_dir)
    assert latest is not None and latest.name == f"step_{N_STEPS:08d}"


def test_registry_and_cli_list_the_runs(resumed: Resumed) -> None:
    root, _, _, report = resumed
    ids = [report.reference.run_id, *(s.run_id for s in report.scenarios)]
    assert {r.id: r.status for r in list_runs(root)} == dict.fromkeys(ids, "finished")
    for s in report.scenarios:
        prov = json.loads((get_run(root, s.run_id).dir / "provenance.json").read_text())
        assert len(prov["resumes"]) == 1
    result = CliRunner().invoke(runs_app, ["ls", "--runs-dir", str(root)])
    assert result.exit_code == 0, result.output
    for run_id in ids:
        line = next(line for line in result.output.splitlines() if run_id in line)
        assert "finished" in line and f" {N_STEPS} " in line


def test_the_comparison_catches_an_inexact_resume(resumed: Resumed) -> None:
    root, command, env, report = resumed
    ref = report.reference.run_id
    metrics = root / ref / "metrics.duckdb"
    expected = metric_key_rows(metrics, ref)
    for step in (N_STEPS - CHECKPOINT_EVERY, N_STEPS):
        shutil.rmtree(checkpoint_path(root / ref / "checkpoints", step))
    resumed_from = N_STEPS - 2 * CHECKPOINT_EVERY
    subprocess.run([*command, "--resume", ref, "--skip-rng-restore"], env=env, cwd=REPO, check=True,
                   capture_output=True)
    same, difference = compare_rows(expected, metric_key_rows(metrics, ref))
    assert not same and difference is not None and f"step={resumed_from + 1}," in difference, difference


def test_rows_compare_by_value_bits(tmp_path: Path) -> None:
    from cambium.core.metrics import MetricsWriter

    path = tmp_path / "m.duckdb"
    with MetricsWriter(path, "r") as w:
        w.log(1, 10, {"nan": float("nan"), "zero": 0.0, f"{PERF_PREFIX}tokens_per_s": 123.4})
    rows = metric_key_rows(path, "r")
    assert [r[2] for r in rows] == ["nan", "zero"]  # wall-clock figures are never compared
    assert compare_rows(rows, metric_key_rows(path, "r")) == (True, None)  # NaN equals the same NaN
    negative_zero = [(s, t, n, struct.pack("<d", -0.0)) if n == "zero" else (s, t, n, v) for s, t, n, v in rows]
    same, difference = compare_rows(rows, negative_zero)
    assert not same and difference is not None and "zero=-0.0" in difference
    assert compare_rows(rows, rows[:1]) == (False, "expected 2 rows, got 1")


def test_progress_reporter_protocol(tmp_path: Path) -> None:
    ProgressReporter(None).step_done(1)  # no progress file: nothing happens
    progress = tmp_path / "p"
    reporter = ProgressReporter.from_env({ENV_PROGRESS: str(progress)})
    reporter.run_started("abc")
    reporter.resumed(5)
    reporter.step_done(6)
    reporter.checkpoint_file_callback(10)(tmp_path / ".tmp-step_00000010-1" / "model.pt")
    reporter.checkpoint_saved(10)
    assert progress.read_text().splitlines() == [
        "run abc", "resumed 5", "step 6", f"ckpt-file 10 {tmp_path / '.tmp-step_00000010-1' / 'model.pt'}",
        "ckpt-saved 10"]
    with pytest.raises(ResumeTestError, match="kill_step=9"):
        check_exact_resume(["true"], runs_root=tmp_path, n_steps=9, kill_step=9)
