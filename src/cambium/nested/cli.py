"""`cambium nested`: build, eval, demo."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cambium.core import cli_options as options
from cambium.core.config import load
from cambium.core.errors import ConfigError
from cambium.core.progress import ProgressReporter
from cambium.data.mixture import ensure_mixture
from cambium.nested.config import NestedConfig

app = typer.Typer(help="Nested learning: models whose forward pass is optimisation (MAG over sliding-window "
                  "attention, SWA baseline), built on a continuous context stream.", no_args_is_help=True)

SET = options.SET
RUNS = options.RUNS_DIR


@app.command("build")
def build_command(
    config: Path | None = options.CONFIG,
    set_: list[str] = SET,
    runs_dir: Path = RUNS,
    resume: str | None = options.RESUME,
    device: str | None = options.DEVICE,
    prep: bool = typer.Option(True, help="Tokenize the context's mixture first if it is missing or its sources "
                              "changed (a new run)."),
) -> None:
    """Build a model on its context (a new run, or --resume an existing one exactly where it stopped)."""
    from cambium.core.loop import load_run_config
    from cambium.nested.build import build

    cfg = load_run_config(NestedConfig, runs_dir, config=config, resume=resume,
                          overrides=set_, device=device, section="build")
    # A new run rebuilds missing or stale data; a resumed run was trained on the old data and refuses it. --no-prep
    # skips this, and the data loaders still check their sources' hashes.
    if prep:
        ensure_mixture(cfg.context.mixture, rebuild=resume is None,
                       how=f"cambium nested build --config {config or 'CONFIG'} (a new run prepares it)")
    result = build(cfg, runs_dir, resume=resume, reporter=ProgressReporter.from_env(), measure_peak=True)
    Console().print(f"run {result.run_id}: {result.steps} steps, {result.events:,} tokens; "
                    + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.final.items())))


@app.command("eval")
def eval_command(
    run: str = typer.Option(..., help="Run id (or unique prefix) whose latest checkpoint is evaluated."),
    runs_dir: Path = RUNS,
    max_chunks: int | None = typer.Option(None, min=1, help="Evaluate only this many chunks (default: all)."),
    carry: bool | None = typer.Option(None, "--carry/--no-carry", help="Carry context memory across val chunks "
                                      "(default: as the run was built); --no-carry restarts it every chunk."),
) -> None:
    """Held-out perplexity on the val split of the run's mixture (also written to <run>/eval.json)."""
    from cambium.nested.build import evaluate_run

    values = evaluate_run(runs_dir, run, max_chunks=max_chunks, carry_memory=carry)
    Console().print(f"run {run}: step {values['step']:.0f}, {values['parameters']:,.0f} parameters, "
                    f"{values['val/tokens']:,.0f} val tokens: val/loss {values['val/loss']:.4f}, "
                    f"val/ppl {values['val/ppl']:.3f}")


def demo(runs_dir: Path = Path("runs")) -> None:
    """Build the `tiny` MAG model on the committed text (under a minute on 2 cores), then evaluate it."""
    from cambium.nested.build import build, evaluate_run

    path = Path("configs/nested/tiny.toml")
    if not path.is_file():
        raise ConfigError(f"{path} not found: run the demo from the repository root")
    cfg = load(path, NestedConfig, ["build.steps=120", "build.eval_every=60", "build.checkpoint_every=60"])
    ensure_mixture(cfg.context.mixture, rebuild=True)
    result = build(cfg, runs_dir)
    values = evaluate_run(runs_dir, result.run_id)
    Console().print(f"nested tiny ({cfg.model.composition}): run {result.run_id}, {result.steps} steps, "
                    f"{result.events:,} tokens; final loss {result.final['loss']:.3f}; held-out "
                    f"val/loss {values['val/loss']:.3f}, val/ppl {values['val/ppl']:.2f} over "
                    f"{values['val/tokens']:,.0f} tokens")


@app.command("demo")
def demo_command(runs_dir: Path = RUNS) -> None:
    """A short build and evaluation on the committed text (about a minute)."""
    demo(runs_dir)


if __name__ == "__main__":
    app()
