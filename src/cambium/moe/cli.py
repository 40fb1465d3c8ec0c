"""`cambium moe`: prep-mixture, train, sample, demo."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cambium.core import cli_options as options
from cambium.core.config import load
from cambium.core.errors import ConfigError
from cambium.core.metrics import latest_values
from cambium.core.progress import ProgressReporter
from cambium.core.runs import get_run
from cambium.data.mixture import ensure_mixture, prepare_mixture
from cambium.moe.config import MoEConfig

app = typer.Typer(help="DeepSeek-shaped mixture-of-experts language models: data, training, sampling.",
                  no_args_is_help=True)

CONFIG = typer.Option(..., "--config", "-c", help="TOML config, e.g. configs/moe/tiny.toml.")
SET = options.SET
RUNS = options.RUNS_DIR


@app.command("prep-mixture")
def prep_mixture(config: Path = CONFIG, set_: list[str] = SET) -> None:
    """Tokenize the datasets of the config's data.mixture into shards (deterministic; same inputs, same hashes)."""
    cfg = load(config, MoEConfig, set_)
    mixture = prepare_mixture(cfg.data.mixture)
    console = Console()
    for d in mixture["datasets"]:
        console.print(f"{d['name']}: p={d['probability']:.3f} train {d['train']['tokens']:,} tokens, "
                      f"val {d['val']['tokens']:,} tokens")
    console.print(f"tokenizer {mixture['tokenizer']['name']} (vocab {mixture['tokenizer']['vocab_size']:,}) "
                  f"→ {cfg.data.mixture.out_dir}")


@app.command("train")
def train_command(
    config: Path | None = options.CONFIG,
    set_: list[str] = SET,
    runs_dir: Path = RUNS,
    resume: str | None = options.RESUME,
    device: str | None = options.DEVICE,
    prep: bool = typer.Option(True, help="Prepare the data mixture first if it is missing or its sources changed "
                              "(a resumed run refuses changed sources instead)."),
) -> None:
    """Train a model (a new run, or --resume an existing one exactly where its last checkpoint left it)."""
    from cambium.core.loop import load_run_config
    from cambium.moe.train import train

    cfg = load_run_config(MoEConfig, runs_dir, config=config, resume=resume,
                          overrides=set_, device=device, section="train")
    # A new run rebuilds missing or stale data; a resumed run was trained on the old data and refuses it. --no-prep
    # skips this, and the data loaders still check their sources' hashes.
    if prep:
        ensure_mixture(cfg.data.mixture, rebuild=resume is None,
                       how=f"cambium moe prep-mixture --config {config or 'CONFIG'}")
    result = train(cfg, runs_dir, resume=resume, reporter=ProgressReporter.from_env())
    Console().print(f"run {result.run_id}: {result.steps} steps, {result.events:,} tokens; "
                    + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.final.items())))


@app.command("sample")
def sample_command(
    run: str = typer.Option(..., help="Run id (or unique prefix) to sample from."),
    prompt: str = typer.Option("", help="Text to continue."),
    max_new_tokens: int = typer.Option(200, min=1, help="Tokens to generate."),
    temperature: float = typer.Option(0.8, min=0.0, help="Softmax temperature (0 = greedy)."),
    top_k: int = typer.Option(50, min=0, help="Sample among the k most likely tokens (0 = all)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    runs_dir: Path = RUNS,
) -> None:
    """Continue PROMPT with the latest checkpoint of RUN."""
    from cambium.moe.sample import sample_text

    text = sample_text(runs_dir, run, prompt, max_new_tokens, temperature=temperature, top_k=top_k or None, seed=seed)
    Console().print(prompt + text, markup=False, highlight=False)


def demo(runs_dir: Path = Path("runs")) -> None:
    """Prepare the committed text, train `tiny` (about a minute on 2 cores), report validation, sample."""
    from cambium.moe.sample import sample_text
    from cambium.moe.train import train

    path = Path("configs/moe/tiny.toml")
    if not path.is_file():
        raise ConfigError(f"{path} not found: run the demo from the repository root")
    cfg = load(path, MoEConfig)
    prepare_mixture(cfg.data.mixture)
    result = train(cfg, runs_dir)
    values = latest_values(get_run(runs_dir, result.run_id).dir / "metrics.duckdb")
    console = Console()
    console.print(f"moe tiny: run {result.run_id}, {result.steps} steps; loss {values['loss'][1]:.3f}, "
                  f"val/loss {values['val/loss'][1]:.3f}, val/bpb {values['val/bpb'][1]:.3f}")
    console.print("sample: " + sample_text(runs_dir, result.run_id, "ROMEO:", 60, seed=0), markup=False)


@app.command("demo")
def demo_command(runs_dir: Path = RUNS) -> None:
    """Prepare the committed text, train `tiny` (about a minute on 2 cores), report validation, sample."""
    demo(runs_dir)
