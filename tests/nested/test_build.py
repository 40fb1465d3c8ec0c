"""The build loop on the committed text: it learns, logs boundary events and held-out perplexity, `eval` reproduces
the logged perplexity from the checkpoint, and a SIGKILLed build resumes to bitwise-identical metrics."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from cambium.core.checkpoint import latest_checkpoint, load_checkpoint
from cambium.core.metrics import read_metrics
from cambium.core.testing import check_exact_resume
from cambium.nested.build import build, evaluate_run
from cambium.nested.model import ContextMemory

from .conftest import TINY, tiny_overrides


@pytest.fixture(scope="module")
def built(tiny_mixture: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from .conftest import tiny_config

    runs = tmp_path_factory.mktemp("runs")
    result = build(tiny_config(tiny_mixture, "build.steps=24", "build.eval_every=12"), runs, show_progress=False)
    return runs, result.run_id


def test_tiny_mag_learns_and_logs_perplexity(built: tuple[Path, str]) -> None:
    runs, run_id = built
    rows = read_metrics(runs / run_id / "metrics.duckdb")
    by_name: dict[str, dict[int, float]] = {}
    for r in rows:
        by_name.setdefault(r.name, {})[r.step] = r.value
    loss = [by_name["loss"][s] for s in sorted(by_name["loss"])]
    assert len(loss) == 24 and sum(loss[-4:]) / 4 < sum(loss[:4]) / 4 - 0.5
    assert sorted(by_name["val/ppl"]) == [12, 24]
    assert by_name["val/ppl"][24] < by_name["val/ppl"][12] < 512
    assert by_name["val/ppl"][24] == pytest.approx(math.exp(by_name["val/loss"][24]))
    assert {"grad_norm", "lr", "context/document_ends", "context/wraps", "perf/tokens_per_s"} <= set(by_name)


def test_eval_reproduces_the_logged_perplexity_from_the_checkpoint(built: tuple[Path, str]) -> None:
    runs, run_id = built
    logged = {r.name: r.value for r in read_metrics(runs / run_id / "metrics.duckdb") if r.step == 24}
    values = evaluate_run(runs, run_id, max_chunks=8)  # the tiny config evaluates 8 chunks during the build
    assert values["val/loss"] == logged["val/loss"] and values["step"] == 24
    restarted = evaluate_run(runs, run_id, max_chunks=8, carry_memory=False)
    assert restarted["val/loss"] != values["val/loss"]  # the carried context memory is what the build used
    full = evaluate_run(runs, run_id)
    assert full["val/tokens"] > values["val/tokens"]
    assert (runs / run_id / "eval.json").is_file()


def test_checkpoint_holds_the_context_memory_and_the_stream_cursor(built: tuple[Path, str]) -> None:
    runs, run_id = built
    path = latest_checkpoint(runs / run_id / "checkpoints")
    assert path is not None
    ckpt = load_checkpoint(path)
    stream = ckpt.data_cursor["task"]["stream"]
    assert stream["consumed"] == 24 * 64 and stream["lanes"] == 4
    memory = ContextMemory(2)
    memory.load_state_dict(ckpt.states["context_memory"])
    for block in memory.states:
        assert block is not None and len(block) == 1 and block[0] is not None
        assert block[0].params[0].shape == (4, 4, 16, 16)  # [B, H, Dv, Dk] per lane
        assert torch.isfinite(block[0].params[0]).all()
    assert ckpt.states["conductor"] == {"step": 24, "periods": [1]}


def test_sigkill_and_resume_give_bitwise_identical_metrics(tiny_mixture: Path, tmp_path: Path) -> None:
    """With the attention window carried too, so that both kinds of context state go through the checkpoint."""
    runs = tmp_path / "runs"
    sets = [*tiny_overrides(tiny_mixture), "build.steps=8", "build.warmup_steps=2", "build.checkpoint_every=2",
            "build.eval_every=4", "build.eval_chunks=2", "build.threads=1", "context.carry_attention=true"]
    command = [sys.executable, "-m", "cambium.nested.cli", "build", "--config", str(TINY), "--runs-dir", str(runs),
               "--no-prep", *[arg for s in sets for arg in ("--set", s)]]
    report = check_exact_resume(command, runs_root=runs, n_steps=8, seed=7, timeout_s=240)
    assert report.ok, report.summary()
    assert all(s.resumed_from is not None for s in report.scenarios), report.summary()


def test_carry_memory_off_restarts_every_chunk_from_the_initial_memory(tiny_mixture: Path, tmp_path: Path) -> None:
    from .conftest import tiny_config

    losses = {}
    for carry in (True, False):
        cfg = tiny_config(tiny_mixture, "build.steps=2", "build.warmup_steps=1", "build.threads=1",
                          f"context.carry_memory={str(carry).lower()}")
        result = build(cfg, tmp_path / "runs", show_progress=False)
        losses[carry] = {r.step: r.value for r in read_metrics(result.run_dir / "metrics.duckdb") if r.name == "loss"}
    assert losses[True][1] == losses[False][1]  # the first chunk starts from the initial memory either way
    assert losses[True][2] != losses[False][2]


def test_cli_resume_extends_a_finished_build_and_refuses_a_changed_model(tiny_mixture: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cambium.core.errors import ConfigError
    from cambium.core.runs import get_run, list_runs
    from cambium.nested.cli import app

    runs = tmp_path / "runs"
    base = ["--runs-dir", str(runs), "--no-prep"]
    sets = [x for item in [*tiny_overrides(tiny_mixture), "build.steps=6", "build.warmup_steps=2", "build.threads=1",
                           "build.eval_chunks=2"] for x in ("--set", item)]
    first = CliRunner().invoke(app, ["build", "--config", str(TINY), *base, *sets])
    assert first.exit_code == 0, first.output
    (record,) = list_runs(runs)
    before = [(r.step, r.name, r.value) for r in read_metrics(record.dir / "metrics.duckdb")
              if r.name in ("loss", "lr")]
    refused = CliRunner().invoke(app, ["build", "--resume", record.id, *base, "--set", "model.dim=32"])
    assert isinstance(refused.exception, ConfigError) and "model.dim" in str(refused.exception)
    assert get_run(runs, record.id).status == "finished"
    longer = CliRunner().invoke(app, ["build", "--resume", record.id, *base, "--set", "build.max_steps=9"])
    assert longer.exit_code == 0, longer.output
    rows = [(r.step, r.name, r.value) for r in read_metrics(record.dir / "metrics.duckdb") if r.name in ("loss", "lr")]
    assert [r for r in rows if r[0] <= 6] == before and max(r[0] for r in rows) == 9
    # Past the schedule's end the learning rate stays at its floor (10 % of the peak).
    floor = [v for s, n, v in rows if n == "lr" and s > 7]
    assert len(floor) == 2 and floor == pytest.approx([0.1 * 3e-3] * 2)
    assert get_run(runs, record.id).status == "finished"
