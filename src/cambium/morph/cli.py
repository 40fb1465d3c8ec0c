"""`cambium morph ...`: train a morphogenetic CIFAR-10 run (or its static baseline), resume one, show a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cambium.core import cli_options as options
from cambium.core.config import load
from cambium.core.runs import get_run
from cambium.morph.config import CONFIG_MODEL

__all__ = ["app", "demo"]

app = typer.Typer(help="Morphogenetic training: seeds grow into the host where it needs capacity.",
                  no_args_is_help=True, add_completion=False)

ConfigOpt = Annotated[Path, typer.Option("--config", help="TOML config (configs/morph/*.toml)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config value: section.key=value")]


@app.command("train")
def train_command(
    config: Path | None = options.CONFIG,
    overrides: list[str] = options.SET,
    no_morphogenetic: Annotated[bool, typer.Option("--no-morphogenetic", help="train the host alone (baseline)")]
    = False,
    resume: str | None = options.RESUME,
    device: str | None = options.DEVICE,
    runs_dir: Path = options.RUNS_DIR,
) -> None:
    """Train the host CNN on CIFAR-10 with seeds (or without, for the baseline); prints the report summary."""
    from cambium.core.loop import load_run_config
    from cambium.core.progress import ProgressReporter
    from cambium.morph.train import train

    sets = list(overrides)
    if no_morphogenetic:
        sets.append("train.morphogenetic=false")
    if config is None and resume is None:
        config = Path("configs/morph/cifar10-cpu.toml")
    cfg = load_run_config(CONFIG_MODEL, runs_dir, config=config, resume=resume, overrides=sets, device=device)
    if resume is not None:
        name = get_run(runs_dir, resume).name
    else:
        assert config is not None
        name = config.stem + ("-static" if no_morphogenetic else "")
    _print_summary(train(cfg, name=name, runs_root=runs_dir, resume=resume, reporter=ProgressReporter.from_env(),
                         measure_peak=True))


@app.command("compare")
def compare_command(
    config: ConfigOpt = Path("configs/morph/cifar10-cpu.toml"),
    overrides: SetOpt = None,
    runs_dir: Path = options.RUNS_DIR,
) -> None:
    """MOR-11: train morphogenetic, same-host static and larger static runs; write report.md and figures."""
    from cambium.morph.compare import compare, summarize

    cfg = load(config, CONFIG_MODEL, list(overrides or []))
    result = compare(cfg, name=config.stem, runs_root=runs_dir)
    for arm in result.arms:
        typer.echo(f"{arm.label:>12} seed {arm.train_seed}: val_acc {arm.report['val_acc']:.4f} "
                   f"test_acc {arm.report['test_acc']:.4f} params {arm.report['params']} widths {list(arm.widths)} "
                   f"(run {arm.run_id})")
    summary = summarize(result)
    for name, e in summary["paired"].items():
        typer.echo(f"{name}: val_acc {e['val_acc']['mean']:+.4f} ± {e['val_acc']['sd']:.4f}, test_acc "
                   f"{e['test_acc']['mean']:+.4f} ± {e['test_acc']['sd']:.4f} over {e['seeds']} seed(s)")
    typer.echo(f"report: {result.report_path}")


@app.command("report")
def report_command(run: Annotated[str, typer.Argument(help="run id or unique prefix")],
                   runs_dir: Path = options.RUNS_DIR) -> None:
    """Accuracy, parameters and the seed timeline of a finished run."""
    record = get_run(runs_dir, run)
    path = record.dir / "report.json"
    if not path.is_file():
        typer.echo(f"run {record.id} has no report.json yet (still running or stopped early)")
        raise typer.Exit(1)
    _print_summary(json.loads(path.read_text()))


def _print_summary(report: dict[str, Any]) -> None:
    typer.echo(f"run {report['run_id']}: val_acc {report['val_acc']:.4f} test_acc {report['test_acc']:.4f} "
               f"params {report['params']} (host {report['host_params']}) after {report['epochs_done']} epochs")
    for loc, seed in report.get("seeds", {}).items():
        steps = " → ".join(f"{c['target']}@{c['epoch']}" for c in seed["timeline"]) or "DORMANT"
        typer.echo(f"  seed {loc}: {steps}")


def demo(runs_dir: Path = Path("runs")) -> None:
    """A seconds-long morph run on 512 CIFAR-10 images (configs/morph/tiny.toml), registered under `runs_dir`."""
    from cambium.morph.train import train

    cfg = load(Path("configs/morph/tiny.toml"), CONFIG_MODEL, [f"library.root={runs_dir / 'urza'}"])
    _print_summary(train(cfg, name="demo", runs_root=runs_dir))


@app.command("demo")
def demo_command(runs_dir: Path = options.RUNS_DIR) -> None:
    """A seconds-long morph run on 512 CIFAR-10 images (configs/morph/tiny.toml)."""
    demo(runs_dir)
