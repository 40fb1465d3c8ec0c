"""Phases 8-9 at a micro size: agent data, PPO and TD-MPC2 trained on the training window, the hold-out backtest and
its report; metrics at their own steps; a resume that changes an agent section redoes exactly phases 8-9."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from tests.worldmodel.test_pipeline import micro_cfg

from cambium.core.errors import DataError
from cambium.core.metrics import read_metrics
from cambium.worldmodel.agents import load_holdout
from cambium.worldmodel.pipeline import phase_steps, phases_done, run_pipeline
from cambium.worldmodel.report import AGENTS_MARKER

AGENTS = ["ppo.steps=128", "ppo.n_steps=64", "ppo.batch_size=32", "ppo.hidden=[16]", "backtest.bootstrap_samples=40",
          "env.decision_bars=16", "agents.tdmpc_steps=24", "tdmpc.seed_steps=12", "tdmpc.batch_size=8",
          "tdmpc.latent_dim=16", "tdmpc.hidden_dim=16", "tdmpc.planner.samples=16", "tdmpc.planner.elites=4",
          "tdmpc.planner.policy_trajectories=2", "tdmpc.planner.iterations=1", "multiverse.copies=2",
          "multiverse.futures=2", "multiverse.ode_steps=1", "multiverse.angle=0.5", "agents.train_bars=600"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("wm_agents")
    cfg = micro_cfg(*AGENTS)
    return root, cfg, run_pipeline(cfg, root, show_progress=False)


def test_agent_phases_write_their_files_metrics_and_report(finished) -> None:
    _root, cfg, result = finished
    assert result.phases_done == list(range(1, 10))
    d = result.run_dir
    for name in ("agents/holdout.npz", "agents/agents.json", "agents/ppo.safetensors", "agents/tdmpc.safetensors",
                 "report/backtest.json", "report/equity_curves.png", "report/positions.png"):
        assert (d / name).is_file(), name
    steps = phase_steps(cfg)
    by_name: dict[str, list[int]] = {}
    for r in read_metrics(d / "metrics.duckdb"):
        by_name.setdefault(r.name, []).append(r.step)
    assert by_name["agents/env_steps"] == [steps[8][0]]
    assert by_name["backtest/ppo/sharpe"] == by_name["backtest/tdmpc_unscaled/sharpe"] == [steps[9][0]]
    figures = json.loads((d / "report" / "backtest.json").read_text())
    assert set(figures["policies"]) == {"ppo", "ppo (no Multiverse scaling)", "tdmpc", "tdmpc (no Multiverse scaling)",
                                        "buy_and_hold", "momentum", "random"}
    for f in figures["policies"].values():
        assert np.isfinite(f["sharpe"]) and 0 <= f["max_drawdown"] <= 1
    report = (d / "report" / "report.md").read_text()
    assert report.count(AGENTS_MARKER.strip()) == 1 and "## Forecast evaluation" in report
    assert "equity_curves.png" in report and "Bias check" in report


def test_holdout_data_lies_after_everything_the_agents_saw(finished) -> None:
    _, _cfg, result = finished
    segs, info = load_holdout(result.run_dir)
    split = json.loads((result.run_dir / "data" / "import.json").read_text())["split"]
    assert segs and all(int(s.open_time_ms[0]) >= split["holdout_ms"] for s in segs)
    assert info["train_bars"] <= 600 * len(segs) + 16 * len(segs)  # agents.train_bars per segment (+ a patch)
    conv = np.concatenate([s.convergence for s in segs])
    assert conv.min() >= 0 and conv.max() <= 1
    assert all(s.features.shape[1] == len(info["feature_names"]) for s in segs)


def test_resume_with_another_agent_section_redoes_phases_8_and_9(finished) -> None:
    root, _cfg, result = finished
    before = json.loads((result.run_dir / "report" / "backtest.json").read_text())
    changed = micro_cfg(*AGENTS, "backtest.bootstrap_samples=41")
    assert phases_done(result.run_dir, changed) == list(range(1, 8))
    again = run_pipeline(changed, root, resume=result.run_id, show_progress=False)
    assert again.phases_done == list(range(1, 10))
    after = json.loads((result.run_dir / "report" / "backtest.json").read_text())
    # the agents retrained from the same seeds act the same: the point figures do not move
    for name, f in before["policies"].items():
        assert after["policies"][name]["sharpe"] == pytest.approx(f["sharpe"], abs=1e-12), name
    assert after["bootstrap"]["samples"] == 41
    report = (result.run_dir / "report" / "report.md").read_text()
    assert report.count(AGENTS_MARKER.strip()) == 1


def test_an_edited_agent_file_is_refused(finished, tmp_path) -> None:
    _, _, result = finished
    record = json.loads((result.run_dir / "phases.json").read_text())
    assert {"agents/holdout.npz", "agents/agents.json", "agents/ppo.safetensors",
            "agents/tdmpc.safetensors"} <= set(record["hashes"])
    copy = tmp_path / result.run_dir.name
    shutil.copytree(result.run_dir, copy)
    info = json.loads((copy / "agents" / "agents.json").read_text())
    info["holdout"] = info["holdout"][::-1]
    (copy / "agents" / "agents.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"agents\.json: sha256 .* --start-phase 8"):
        load_holdout(copy)
