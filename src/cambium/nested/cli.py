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

app = typer.Typer(help="Nested learning: models whose forward pass is optimisation (MAG, MAL, MAC over "
                  "attention with CMS memory levels; SWA-only and full-attention baselines), built on a continuous "
                  "context stream.", no_args_is_help=True)

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
    retrieval: bool = typer.Option(True, "--retrieval/--no-retrieval", help="Also measure passkey and MQAR "
                                   "accuracy by distance (needles in val text; see docs/nested.md)."),
    distances: str | None = typer.Option(None, help="Comma-separated needle distances in tokens (default: "
                                         "seq_len/8, seq_len/2, seq_len, 2·seq_len, 4·seq_len)."),
    samples: int = typer.Option(32, min=1, max=4096, help="Probe sequences per kind and distance."),
    seed: int = typer.Option(0, min=0, help="Seed of the probes' needles."),
) -> None:
    """Held-out perplexity on the val split of the run's mixture, and retrieval accuracy by distance (also written
    to <run>/eval.json)."""
    from cambium.nested.build import evaluate_run

    values = evaluate_run(runs_dir, run, max_chunks=max_chunks, carry_memory=carry, retrieval=retrieval,
                          distances=parse_distances(distances), samples=samples, seed=seed)
    console = Console()
    console.print(f"run {run}: step {values['step']:.0f}, {values['parameters']:,.0f} parameters, "
                  f"{values['val/tokens']:,.0f} val tokens: val/loss {values['val/loss']:.4f}, "
                  f"val/ppl {values['val/ppl']:.3f}")
    for kind in ("passkey", "mqar"):
        row = {k.rsplit("/d", 1)[1]: v for k, v in values.items() if k.startswith(f"retrieval/{kind}/d")}
        if row:
            console.print(f"  {kind} accuracy by distance: " + ", ".join(f"{d}: {v:.3f}" for d, v in row.items()))


def parse_distances(text: str | None) -> tuple[int, ...] | None:
    """'16,64,256' → (16, 64, 256); a clear error for anything else."""
    if text is None:
        return None
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--distances={text!r} must be comma-separated positive integers, e.g. 16,64,256") from None
    if not values or any(v < 1 or v > 1_000_000 for v in values):
        raise ConfigError(f"--distances={text!r}: every distance must be between 1 and 1,000,000 tokens")
    return values


def demo(runs_dir: Path = Path("runs")) -> None:
    """Build the `tiny` MAG model on the committed text (under a minute on 2 cores), then evaluate it (perplexity and
    the passkey probe; a model this small and short-built does not copy yet, see docs/nested.md)."""
    from cambium.nested.build import build, evaluate_run

    path = Path("configs/nested/tiny.toml")
    if not path.is_file():
        raise ConfigError(f"{path} not found: run the demo from the repository root")
    cfg = load(path, NestedConfig, ["build.steps=120", "build.eval_every=60", "build.checkpoint_every=60"])
    ensure_mixture(cfg.context.mixture, rebuild=True)
    result = build(cfg, runs_dir)
    values = evaluate_run(runs_dir, result.run_id, retrieval=True, samples=16)
    Console().print(f"nested tiny ({cfg.model.composition}): run {result.run_id}, {result.steps} steps, "
                    f"{result.events:,} tokens; final loss {result.final['loss']:.3f}; held-out "
                    f"val/loss {values['val/loss']:.3f}, val/ppl {values['val/ppl']:.2f} over "
                    f"{values['val/tokens']:,.0f} tokens; passkey accuracy by distance "
                    + ", ".join(f"{k.rsplit('/d', 1)[1]}: {v:.2f}" for k, v in values.items()
                                if k.startswith("retrieval/passkey/")))


@app.command("demo")
def demo_command(runs_dir: Path = RUNS) -> None:
    """A short build and evaluation on the committed text (about a minute)."""
    demo(runs_dir)


if __name__ == "__main__":
    app()
