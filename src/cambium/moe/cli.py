"""`cambium moe`: prep-mixture, train (one process, or data/expert parallel with --nproc or torchrun), sample,
export-hf, import-hf, demo. `python -m cambium.moe …` runs the same commands (what torchrun launches)."""

from __future__ import annotations

import os
import subprocess
import sys
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
    nproc: int = typer.Option(1, "--nproc", min=1, help="Launch this many local processes with torchrun (data "
                              "parallel, experts sharded across them with train.expert_parallel); the same as "
                              "`torchrun --nproc-per-node N -m cambium.moe train …`."),
) -> None:
    """Train a model (a new run, or --resume an existing one exactly where its last checkpoint left it)."""
    from cambium.core.loop import load_run_config
    from cambium.moe.train import train

    cfg = load_run_config(MoEConfig, runs_dir, config=config, resume=resume,
                          overrides=set_, device=device, section="train")
    # A new run rebuilds missing or stale data; a resumed run was trained on the old data and refuses it. --no-prep
    # skips this, and the data loaders still check their sources' hashes. Under torchrun every rank would do it at
    # once: only a launcher (or a single process) prepares.
    if prep and "RANK" not in os.environ:
        ensure_mixture(cfg.data.mixture, rebuild=resume is None,
                       how=f"cambium moe prep-mixture --config {config or 'CONFIG'}")
    if nproc > 1:
        if "RANK" in os.environ:
            raise ConfigError("--nproc launches torchrun itself; under torchrun leave it out")
        m = cfg.model.moe
        if cfg.train.expert_parallel and m is not None and m.n_routed_experts % nproc:
            raise ConfigError(f"expert parallel needs model.moe.n_routed_experts % world_size == 0, got "
                              f"{m.n_routed_experts} experts over --nproc {nproc}; choose --nproc dividing "
                              f"{m.n_routed_experts} or set train.expert_parallel=false")
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "cambium.moe",
                "train", "--runs-dir", str(runs_dir), "--no-prep"]
        argv += ["--config", str(config)] if config is not None else []
        argv += ["--resume", resume] if resume is not None else []
        argv += ["--device", device] if device is not None else []
        for item in set_:
            argv += ["--set", item]
        code = subprocess.call(argv)
        if code:
            raise typer.Exit(code)
        return
    result = train(cfg, runs_dir, resume=resume, reporter=ProgressReporter.from_env())
    if os.environ.get("RANK", "0") == "0":
        Console().print(f"run {result.run_id}: {result.steps} steps, {result.events:,} tokens; "
                        + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.final.items())))


@app.command("export-hf")
def export_hf_command(
    run: str = typer.Argument(..., help="Run id (or unique prefix) whose latest checkpoint is exported."),
    out: Path = typer.Option(..., "--out", help="Directory to write (config.json + model.safetensors)."),
    runs_dir: Path = RUNS,
) -> None:
    """Write RUN's latest weights as a Hugging Face DeepseekV3ForCausalLM directory (transformers loads it)."""
    from cambium.moe.hf import save_hf
    from cambium.moe.sample import load_trained

    _, model, step = load_trained(runs_dir, run)
    save_hf(model, out)
    Console().print(f"run {run} step {step} → {out} (DeepseekV3ForCausalLM)")


@app.command("import-hf")
def import_hf_command(
    path: Path = typer.Argument(..., help="A Hugging Face DeepseekV3ForCausalLM directory (config.json + "
                                "safetensors)."),
    config: Path = typer.Option(..., "--config", "-c", help="Base config: data, optimiser, schedule, training."),
    out: Path = typer.Option(..., "--out", help="The config TOML to write."),
    set_: list[str] = SET,
) -> None:
    """Write a config that trains from PATH's weights: CONFIG with PATH's architecture and train.init_from_hf."""
    from cambium.core.config import to_toml
    from cambium.moe.hf import import_config, load_hf

    cfg = import_config(load(config, MoEConfig, set_), path)
    model = load_hf(path)  # the weights load and map (a broken checkpoint fails here, not at training time)
    out.write_text(to_toml(cfg), encoding="utf-8")
    Console().print(f"{path}: {model.num_params() / 1e6:.2f}M parameters ({model.num_params(active=True) / 1e6:.2f}M "
                    f"active) → {out}; train it with `cambium moe train --config {out}`")


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
