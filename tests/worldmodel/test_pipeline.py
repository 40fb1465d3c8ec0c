"""The pipeline end to end at a micro size: phases, files, metrics, report numbers, phase selection, exact resume."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cambium.core.config import load
from cambium.core.errors import ConfigError, RunError
from cambium.core.metrics import read_metrics
from cambium.core.runs import get_run
from cambium.core.testing import check_exact_resume
from cambium.worldmodel.artifacts import RunArtifacts
from cambium.worldmodel.config import CONFIG_MODEL
from cambium.worldmodel.pipeline import phase_steps, run_pipeline
from cambium.worldmodel.report import format_forecast_table, format_probe_table

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "worldmodel" / "tiny.toml"
MICRO = [
    'data.symbols=["BTCUSDT","ETHUSDT"]', "tokenizer.hidden_channels=16", "jepa.seq_len=8",
    "jepa.encoder.d_model=16", "jepa.encoder.n_layers=1", "jepa.encoder.n_heads=2", "jepa.encoder.chunk_size=8",
    "jepa.predictor.hidden_dim=32", "train_tokenizer.steps=4", "train_tokenizer.batch_size=8",
    "train_jepa.steps=8", "train_jepa.batch_size=4", "pipeline.checkpoint_every=2", "pipeline.threads=1",
    "evaluation.report_examples=2", "train_flow.steps=6", "train_flow.batch_size=16", "flow.hidden_dim=32",
    "flow.head_hidden=32", "forecast.n_futures=8", "forecast.batch_origins=64",
    f"data.klines_glob={REPO}/data/samples/market/klines_1h_futures/*.csv.gz",
]


def micro_cfg(*extra: str):
    return load(TINY, CONFIG_MODEL, [*MICRO, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("wm_runs")
    cfg = micro_cfg()
    return root, cfg, run_pipeline(cfg, root, stop_phase=7, show_progress=False)  # 8-9: test_agents_pipeline


def test_every_phase_writes_its_files_and_metrics(finished) -> None:
    root, cfg, result = finished
    assert result.phases_done == [1, 2, 3, 4, 5, 6, 7]
    record = get_run(root, result.run_id)
    assert record.system == "worldmodel" and record.status == "finished"
    d = result.run_dir
    for name in ("tokenizer.safetensors", "jepa.safetensors", "flow.safetensors", "data/import.json",
                 "codes/index.json", "futures/paths.npy", "futures/origins.json", "report/report.md",
                 "report/probe.json", "report/forecast.json", "report/reconstructions.png",
                 "report/codebook_usage.png", "report/training_curves.png", "report/fan_charts.png", "report/pit.png"):
        assert (d / name).is_file(), name
    assert (d / "report" / "codebook_usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = json.loads((d / "codes" / "index.json").read_text())
    assert [e["name"] for e in index["segments"]] == ["BTCUSDT", "ETHUSDT"]
    for e in index["segments"]:
        codes = np.load(d / "codes" / e["file"])
        assert codes.shape == (e["patches"],) and codes.min() >= 0 and codes.max() < 1000
    # The store written by phase 1 is the market candle store (hive partitions, validated on read).
    assert (d / "store" / "market=futures" / "interval=1h" / "symbol=BTCUSDT" / "candles.parquet").is_file()
    rows = read_metrics(d / "metrics.duckdb")
    steps = phase_steps(cfg)
    by_name: dict[str, list[int]] = {}
    for r in rows:
        by_name.setdefault(r.name, []).append(r.step)
    assert by_name["import/rows"] == [steps[1][0]]
    assert by_name["tokenizer/loss"] == list(range(steps[2][0], steps[2][1] + 1))
    assert by_name["tokenizer/codebook_usage/train"] == [steps[3][0]]
    assert by_name["jepa/loss"] == list(range(steps[4][0], steps[4][1] + 1))
    assert by_name["flow/loss"] == list(range(steps[5][0], steps[5][1] + 1))
    assert by_name["futures/origins"] == [steps[6][0]]
    assert by_name["probe/latent/r2"] == by_name["forecast/h24/garch/crps"] == [steps[7][0]]
    assert "perf/jepa/step_ms" in by_name and "perf/evaluate/seconds" in by_name and "perf/flow/step_ms" in by_name
    # One store row per bar kept: the files' rows minus the still-forming last bar.
    assert next(r.value for r in rows if r.name == "import/rows") == 2 * (4500 - 1)


def test_report_numbers_equal_a_direct_recomputation(finished) -> None:
    _, cfg, result = finished
    probe = json.loads((result.run_dir / "report" / "probe.json").read_text())
    # From the run's files (store, codes, weights) alone, in a fresh model.
    again = RunArtifacts(result.run_dir, cfg).probes()
    assert json.loads(json.dumps(again)) == probe
    report = (result.run_dir / "report" / "report.md").read_text()
    assert format_probe_table(again) in report
    metrics = {r.name: r.value for r in read_metrics(result.run_dir / "metrics.duckdb")}
    for r in again["results"]:
        assert metrics[f"probe/{r['features']}/r2"] == r["r2"]
        assert metrics[f"probe/{r['features']}/accuracy"] == r["accuracy"]
    # Hold-out anchors lie after the embargo, training targets before the split.
    assert again["n_train"] > 10 and again["n_holdout"] > 10
    forecast = json.loads((result.run_dir / "report" / "forecast.json").read_text())
    assert json.loads(json.dumps(RunArtifacts(result.run_dir, cfg).forecast_scores())) == forecast
    assert format_forecast_table(forecast) in report
    paths = np.load(result.run_dir / "futures" / "paths.npy")
    assert paths.shape == (forecast["n_origins"], 8, 24) and np.isfinite(paths).all()
    for h, block in forecast["horizons"].items():
        assert set(block["methods"]) == {"cambium", "random_walk", "gbm", "bootstrap", "garch"}
        assert set(block["dm"]) == {"random_walk", "gbm", "bootstrap", "garch"}
        assert metrics[f"forecast/h{h}/cambium/crps"] == block["methods"]["cambium"]["crps"]
        assert all(0 <= m["coverage50"] <= m["coverage90"] <= 1 for m in block["methods"].values())


def test_phase_selection(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = micro_cfg("train_jepa.steps=2")
    with pytest.raises(ConfigError, match="--start-phase 3 needs --resume"):
        run_pipeline(cfg, tmp_path, start_phase=3, show_progress=False)
    first = run_pipeline(cfg, tmp_path, stop_phase=2, show_progress=False)
    assert first.phases_done == [1, 2]
    assert (first.run_dir / "tokenizer.safetensors").is_file() and not (first.run_dir / "codes").exists()
    with pytest.raises(RunError, match="has not done phases \\[3\\]"):
        run_pipeline(cfg, tmp_path, resume=first.run_id, start_phase=4, show_progress=False)
    second = run_pipeline(cfg, tmp_path, resume=first.run_id, stop_phase=3, show_progress=False)
    assert second.run_id == first.run_id and second.phases_done == [1, 2, 3]
    tokenizer_rows = [r for r in read_metrics(first.run_dir / "metrics.duckdb") if r.name == "tokenizer/loss"]
    # Re-running phase 2 from scratch replaces its rows and forgets later phases.
    third = run_pipeline(cfg, tmp_path, resume=first.run_id, start_phase=2, stop_phase=2, show_progress=False)
    assert third.phases_done == [1, 2]
    rows = read_metrics(first.run_dir / "metrics.duckdb")
    assert [r for r in rows if r.name == "tokenizer/loss"] != [] and not any(
        r.name.startswith("pretokenize/") for r in rows)
    assert [(r.step, r.value) for r in rows if r.name == "tokenizer/loss"] == [
        (r.step, r.value) for r in tokenizer_rows]


def test_pretokenize_command_writes_codes_and_redoes_them_on_a_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cambium.worldmodel.cli import app

    args = ["pretokenize", "--config", str(TINY), "--runs-dir", str(tmp_path)]
    for item in MICRO:
        args += ["--set", item]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((run_dir / "phases.json").read_text())["done"] == [1, 2, 3]
    index = (run_dir / "codes" / "index.json").read_text()
    again = CliRunner().invoke(app, ["pretokenize", "--resume", run_dir.name, "--runs-dir", str(tmp_path)])
    assert again.exit_code == 0, again.output
    assert (run_dir / "codes" / "index.json").read_text() == index
    assert not (run_dir / "jepa.safetensors").exists()


def test_sigkill_during_strate2_resumes_bitwise(tmp_path: Path) -> None:
    cfg = micro_cfg()
    steps = phase_steps(cfg)
    first4, last4 = steps[4]
    command = [sys.executable, "-m", "cambium.worldmodel.cli", "pipeline", "--config", str(TINY),
               "--runs-dir", str(tmp_path), "--stop-phase", "4"]
    for item in MICRO:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    report = check_exact_resume(command, runs_root=tmp_path, n_steps=last4, kill_step=first4 + 2,
                                checkpoint_kill_step=first4 + 4, env=env, cwd=REPO, timeout_s=240)
    assert report.ok, report.summary()
    assert report.reference.rows > 0
    at_step = next(s for s in report.scenarios if s.name == "kill-at-step")
    in_ckpt = next(s for s in report.scenarios if s.name == "kill-in-checkpoint")
    assert at_step.kill_step == first4 + 2 and at_step.resumed_from == first4 + 1, report.summary()
    assert in_ckpt.killed_checkpoint_step == first4 + 5 and in_ckpt.killed_in_temp_dir, report.summary()
    assert in_ckpt.resumed_from == first4 + 3, report.summary()


def test_sigkill_during_strate3_resumes_bitwise(tmp_path: Path) -> None:
    cfg = micro_cfg("train_flow.steps=8")
    first5, last5 = phase_steps(cfg)[5]
    command = [sys.executable, "-m", "cambium.worldmodel.cli", "pipeline", "--config", str(TINY),
               "--runs-dir", str(tmp_path), "--stop-phase", "5"]
    for item in [*MICRO, "train_flow.steps=8"]:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    report = check_exact_resume(command, runs_root=tmp_path, n_steps=last5, kill_step=first5 + 2,
                                checkpoint_kill_step=first5 + 4, env=env, cwd=REPO, timeout_s=240)
    assert report.ok, report.summary()
    at_step = next(s for s in report.scenarios if s.name == "kill-at-step")
    in_ckpt = next(s for s in report.scenarios if s.name == "kill-in-checkpoint")
    assert at_step.kill_step == first5 + 2 and at_step.resumed_from == first5 + 1, report.summary()
    assert in_ckpt.killed_in_temp_dir and in_ckpt.resumed_from == first5 + 3, report.summary()


def test_bad_config_values_name_the_dotted_path() -> None:
    with pytest.raises(ConfigError, match=r"evaluation\.holdout_fraction"):
        micro_cfg("evaluation.holdout_fraction=1.5")
    with pytest.raises(ConfigError, match=r"pipeline\.checkpoint_every"):
        micro_cfg("pipeline.checkpoint_every=0")
    with pytest.raises(ConfigError, match="ridge_alphas"):
        micro_cfg("evaluation.ridge_alphas=[-1.0]")
    with pytest.raises(ConfigError, match=r"data\.interval"):
        micro_cfg('data.interval="7h"')
    with pytest.raises(ConfigError, match=r"forecast=.*horizons=\[24, 1\] must be increasing"):
        micro_cfg("forecast.horizons=[24, 1]")
    with pytest.raises(ConfigError, match=r"forecast\.sampler"):
        micro_cfg('forecast.sampler="heun"')


def test_resume_raises_strate2_steps_of_a_finished_run_and_refuses_a_changed_model(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run_dir = tmp_path / "runs"
    # Checkpoints rotate across phases: enough are kept for Strate III's not to push out Strate II's last one.
    keep = "pipeline.keep_checkpoints=10"
    result = run_pipeline(micro_cfg(keep), run_dir, stop_phase=7, show_progress=False)
    with pytest.raises(ConfigError, match=r"jepa\.encoder\.d_model"):
        run_pipeline(micro_cfg("jepa.encoder.d_model=32"), run_dir, resume=result.run_id, show_progress=False)
    assert get_run(run_dir, result.run_id).status == "finished"
    before = [(r.step, r.name, r.value) for r in read_metrics(run_dir / result.run_id / "metrics.duckdb")]
    longer = micro_cfg("train_jepa.steps=10", keep)
    again = run_pipeline(longer, run_dir, resume=result.run_id, stop_phase=7, show_progress=False)
    assert again.phases_done == [1, 2, 3, 4, 5, 6, 7]
    rows = read_metrics(run_dir / result.run_id / "metrics.duckdb")
    steps = phase_steps(longer)
    assert [r.step for r in rows if r.name == "jepa/loss"] == list(range(steps[4][0], steps[4][1] + 1))
    assert [r.step for r in rows if r.name == "flow/loss"] == list(range(steps[5][0], steps[5][1] + 1))
    assert [r.step for r in rows if r.name == "probe/latent/r2"] == [steps[7][0]]
    # Phases 1-3 were not redone, and the first 8 Strate II steps are the finished run's own rows.
    kept = [(s, n, v) for s, n, v in before if s < steps[4][0] + 8 and not n.startswith(("perf/", "jepa/holdout"))]
    assert [(r.step, r.name, r.value) for r in rows if r.step < steps[4][0] + 8
            and not r.name.startswith(("perf/", "jepa/holdout"))] == kept
    assert get_run(run_dir, result.run_id).status == "finished"


def test_intermediates_edited_between_phases_are_refused_naming_the_file(tmp_path: Path) -> None:
    from cambium.core.errors import DataError

    torch.set_num_threads(1)
    cfg = micro_cfg("train_jepa.steps=2")
    first = run_pipeline(cfg, tmp_path, stop_phase=3, show_progress=False)
    phases = json.loads((first.run_dir / "phases.json").read_text())
    assert set(phases["hashes"]) == {"data/import.json", "tokenizer.safetensors", "codes/index.json"}
    index = json.loads((first.run_dir / "codes" / "index.json").read_text())
    code_file = first.run_dir / "codes" / index["segments"][0]["file"]
    original = code_file.read_bytes()
    codes = np.load(code_file)
    codes[0] = (codes[0] + 1) % 7  # a valid file with one code changed
    np.save(code_file, codes)
    with pytest.raises(DataError, match=rf"{code_file.name}: does not match its sha256.*--start-phase 3"):
        run_pipeline(cfg, tmp_path, resume=first.run_id, show_progress=False)
    code_file.write_bytes(original)
    index_path = first.run_dir / "codes" / "index.json"
    for entry in index["segments"]:
        entry.pop("sha256")  # hiding the edit from the index is caught by phases.json
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"index\.json: sha256 \w+ differs from \w+ in phases\.json.*--start-phase 3"):
        run_pipeline(cfg, tmp_path, resume=first.run_id, show_progress=False)
    state = load_file(first.run_dir / "tokenizer.safetensors")
    key = next(iter(state))
    state[key] = state[key] + 1
    save_file(state, first.run_dir / "tokenizer.safetensors")
    with pytest.raises(DataError, match=r"tokenizer\.safetensors: sha256 .*--start-phase 2"):
        run_pipeline(cfg, tmp_path, resume=first.run_id, start_phase=3, show_progress=False)
    redone = run_pipeline(cfg, tmp_path, resume=first.run_id, start_phase=2, stop_phase=7, show_progress=False)
    assert redone.phases_done == [1, 2, 3, 4, 5, 6, 7]
    paths = redone.run_dir / "futures" / "paths.npy"
    arr = np.load(paths)
    arr[0, 0, 0] += 1.0
    np.save(paths, arr)
    with pytest.raises(DataError, match=r"paths\.npy: sha256 .*--start-phase 6"):
        run_pipeline(cfg, tmp_path, resume=first.run_id, start_phase=7, show_progress=False)
