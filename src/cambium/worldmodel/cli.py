"""`cambium worldmodel`: pipeline, pretokenize, demo."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cambium.core import cli_options as options
from cambium.core.config import load
from cambium.core.errors import ConfigError
from cambium.core.progress import ProgressReporter
from cambium.worldmodel.config import CONFIG_MODEL

app = typer.Typer(help="Market world model: FSQ tokenizer, Mamba-2 JEPA, OT-CFM futures, pipeline and evaluation.",
                  no_args_is_help=True)

SET = options.SET
RUNS = options.RUNS_DIR
# The steps `demo` runs: the full tiny pipeline takes longer than a demo should on a shared 2-core machine.
DEMO_OVERRIDES = ["train_tokenizer.steps=300", "train_jepa.steps=150", "train_flow.steps=100",
                  "forecast.n_futures=16", "pipeline.checkpoint_every=50"]


@app.command("pipeline")
def pipeline_command(
    config: Path | None = options.CONFIG,
    set_: list[str] = SET,
    runs_dir: Path = RUNS,
    resume: str | None = options.RESUME,
    device: str | None = options.DEVICE,
    start_phase: int | None = typer.Option(None, min=1, max=9, help="First phase (1 import, 2 Strate I, "
                                           "3 pretokenize, 4 Strate II, 5 Strate III, 6 sample futures, 7 evaluate, "
                                           "8 agents, 9 backtest); > 1 needs --resume."),
    stop_phase: int = typer.Option(9, min=1, max=9, help="Last phase to run."),
) -> None:
    """Run the world-model pipeline (a new run, or --resume one exactly where it stopped)."""
    from cambium.core.loop import load_run_config
    from cambium.worldmodel.pipeline import run_pipeline

    cfg = load_run_config(CONFIG_MODEL, runs_dir, config=config, resume=resume,
                          overrides=set_, device=device, section="pipeline")
    result = run_pipeline(cfg, runs_dir, resume=resume, start_phase=start_phase, stop_phase=stop_phase,
                          reporter=ProgressReporter.from_env(), measure_peak=True)
    _print_result(result)


@app.command("pretokenize")
def pretokenize_command(
    config: Path | None = options.CONFIG,
    set_: list[str] = SET,
    runs_dir: Path = RUNS,
    resume: str | None = options.RESUME,
    device: str | None = options.DEVICE,
) -> None:
    """Write the code sequences of every segment (<run>/codes/): with --config a new run through phases 1-3 (import,
    Strate I, pretokenize); with --resume RUN phase 3 again on that run's trained tokenizer."""
    from cambium.core.loop import load_run_config
    from cambium.worldmodel.pipeline import run_pipeline

    cfg = load_run_config(CONFIG_MODEL, runs_dir, config=config, resume=resume,
                          overrides=set_, device=device, section="pipeline")
    result = run_pipeline(cfg, runs_dir, resume=resume, start_phase=3 if resume else None, stop_phase=3,
                          reporter=ProgressReporter.from_env(), measure_peak=True)
    _print_result(result)
    Console().print(f"codes: {result.run_dir / 'codes'}")


def _print_result(result: object) -> None:
    from cambium.worldmodel.pipeline import PipelineResult

    assert isinstance(result, PipelineResult)
    console = Console()
    s = result.summary
    shown = ["tokenizer/codebook_usage/holdout", "tokenizer/perplexity/holdout", "jepa/loss", "probe/latent/r2",
             "probe/raw/r2", "probe/latent/accuracy", "probe/raw/accuracy", "probe/majority_accuracy",
             "flow/loss", "forecast/h1/cambium/crps", "forecast/h1/garch/crps", "forecast/h24/cambium/crps",
             "forecast/h24/garch/crps", "backtest/ppo/sharpe", "backtest/tdmpc/sharpe", "backtest/buy_and_hold/sharpe",
             "backtest/momentum/sharpe"]
    console.print(f"run {result.run_id}: phases done {result.phases_done}; "
                  + ", ".join(f"{k}={s[k]:.4g}" for k in shown if k in s))
    report = result.run_dir / "report" / "report.md"
    if report.exists():
        console.print(f"report: {report}")


def demo(runs_dir: Path = Path("runs")) -> None:
    """The tiny pipeline on the committed candles with fewer steps (300 Strate I, 150 Strate II, 100 Strate III, 16
    futures per origin; tiny's agents: 1024 PPO and 64 TD-MPC2 steps) through the backtest report; prints where the
    report is."""
    from cambium.worldmodel.pipeline import run_pipeline

    path = Path("configs/worldmodel/tiny.toml")
    if not path.is_file():
        raise ConfigError(f"{path} not found: run the demo from the repository root")
    cfg = load(path, CONFIG_MODEL, DEMO_OVERRIDES)
    _print_result(run_pipeline(cfg, runs_dir))


@app.command("demo")
def demo_command(runs_dir: Path = RUNS) -> None:
    """Run the tiny pipeline end to end on the committed candles (reduced steps) and print where the report is."""
    demo(runs_dir)


if __name__ == "__main__":
    app()
