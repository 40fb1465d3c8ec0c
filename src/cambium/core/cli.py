"""`cambium runs ls|show|compare|export`: read the run registry, run directories, metrics and checkpoints.

Mounted by `cambium.cli` as the `runs` group. Never changes a run's files; the only writes are the registry marking a
"running" run whose process has died as "killed" (see `cambium.core.runs`), and `export`, which writes under its --out
(default `<run dir>/export/<format>`, see `cambium.core.export`).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from cambium.core.checkpoint import list_checkpoints, verify_checkpoint
from cambium.core.errors import CambiumError, RunError
from cambium.core.metrics import last_step, latest_values
from cambium.core.registry import RunRecord
from cambium.core.runs import get_run, list_runs

__all__ = ["runs_app"]

runs_app = typer.Typer(
    help="List, inspect and compare runs (the directories under --runs-dir and their registry experiments.sqlite).",
    no_args_is_help=True,
    add_completion=False,
)

RootOption = Annotated[Path, typer.Option("--runs-dir", help="runs directory holding experiments.sqlite and one "
                                          "directory per run")]
_STATUS_STYLE = {"running": "cyan", "finished": "green", "failed": "red", "killed": "yellow"}
_PREFERRED = ("loss", "val_loss", "val.bpb", "lr", "grad_norm")


@runs_app.command("ls")
def ls_command(
    root: RootOption = Path("runs"),
    system: Annotated[str | None, typer.Option("--system", help="show only runs of this system (e.g. moe)")] = None,
    metrics: Annotated[int, typer.Option("--metrics", min=0, help="how many latest metric values to show per run")] = 3,
) -> None:
    """Table of runs, oldest first: id, system, name, status, created, steps and the latest metric values."""
    records = list_runs(root, system)
    console = _console()
    if not records:
        console.print(f"no runs under {root}" + (f" for system {system!r}" if system else ""))
        return
    table = Table(title=f"runs in {root}")
    table.add_column("id", no_wrap=True, min_width=max(len(r.id) for r in records))
    for name in ("system", "name", "status", "created"):
        table.add_column(name, no_wrap=True)
    table.add_column("steps", justify="right")
    table.add_column("last metrics")
    for r in records:
        steps, latest = _metrics_digest(r.dir)
        shown = _pick(latest, metrics)
        table.add_row(r.id, r.system, r.name, _status(r.status), r.created[:19].replace("T", " "),
                      "-" if steps is None else str(steps),
                      " ".join(f"{k}={_fmt(v)}" for k, (_, v) in shown.items()) or "-")
    console.print(table)


@runs_app.command("show")
def show_command(
    run: Annotated[str, typer.Argument(help="run id or a unique prefix of one")],
    root: RootOption = Path("runs"),
) -> None:
    """One run: registry record, resolved config, provenance, latest metric values and checkpoints."""
    record = get_run(root, run)
    console = _console()
    head = Table.grid(padding=(0, 2))
    for key, text in (("id", record.id), ("system", record.system), ("name", record.name),
                       ("status", _status(record.status)), ("created", record.created), ("updated", record.updated),
                       ("dir", str(record.dir)), ("config fingerprint", record.fingerprint),
                       ("summary", json.dumps(record.summary) if record.summary else "-")):
        head.add_row(f"[bold]{key}", text)
    console.print(head)

    config_path = record.dir / "config.toml"
    console.rule("config.toml")
    if config_path.is_file():
        console.print(Syntax(config_path.read_text(encoding="utf-8"), "toml", theme="ansi_dark"))
    else:
        console.print(f"[red]{config_path} is missing")

    console.rule("provenance")
    console.print(_provenance_table(record.dir / "provenance.json"))

    console.rule("metrics (latest value of each)")
    latest = _metrics_digest(record.dir)[1]
    if latest:
        metric_table = Table("name", "step", "value")
        for metric, (step, number) in latest.items():
            metric_table.add_row(metric, str(step), _fmt(number))
        console.print(metric_table)
    else:
        console.print("no metrics yet")

    console.rule("checkpoints")
    console.print(_checkpoint_table(record.dir / "checkpoints"))


@runs_app.command("compare")
def compare_command(
    runs: Annotated[list[str], typer.Argument(help="two or more run ids (or unique prefixes)")],
    root: RootOption = Path("runs"),
) -> None:
    """Config differences by dotted key and the final values of the metrics the runs have in common."""
    if len(runs) < 2:
        raise RunError(f"compare needs at least two runs, got {len(runs)}: {runs}")
    records = [get_run(root, r) for r in runs]
    console = _console()
    configs = [_flat_config(r) for r in records]
    keys = sorted(set().union(*configs))
    differing = [k for k in keys if len({json.dumps(c.get(k, "<missing>")) for c in configs}) > 1]
    if differing:
        table = Table("config key", *(r.id for r in records), title="config differences")
        for key in differing:
            table.add_row(key, *(_fmt_config(c.get(key, "<missing>")) for c in configs))
        console.print(table)
    else:
        console.print(f"configs identical ({len(keys)} keys)")

    latest = [_metrics_digest(r.dir)[1] for r in records]
    common = sorted(set.intersection(*(set(m) for m in latest)))
    if common:
        table = Table("metric", *(r.id for r in records), title="final values (step)")
        for name in common:
            table.add_row(name, *(f"{_fmt(m[name][1])} ({m[name][0]})" for m in latest))
        console.print(table)
    else:
        console.print("no metric names in common")


@runs_app.command("export")
def export_command(
    run: Annotated[str, typer.Argument(help="run id or a unique prefix of one")],
    to: Annotated[str, typer.Option("--to", help="format: tensorboard (event files) or mlflow (an MLflow file "
                                    "store)")],
    root: RootOption = Path("runs"),
    out: Annotated[Path | None, typer.Option("--out", help="where to write (default: <run dir>/export/<format>)")]
    = None,
) -> None:
    """Write a finished run's metrics as TensorBoard event files or an MLflow file store, for those tools' viewers."""
    from cambium.core.export import export_run

    done = export_run(root, run, to, out)
    viewer = (f"tensorboard --logdir {done['out']}" if to == "tensorboard"
              else f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {Path(done['out']).resolve().as_uri()}")
    _console().print(f"exported {done['rows']} rows of {done['names']} metrics to {done['out']} (view: {viewer})")


def _console() -> Console:
    """The terminal's width when there is one; wide when piped so tables of long run ids stay unbroken."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 200))


def _metrics_digest(run_dir: Path) -> tuple[int | None, dict[str, tuple[int, float]]]:
    """Highest step and latest value per metric over every metrics file of the run (all ranks)."""
    steps: int | None = None
    latest: dict[str, tuple[int, float]] = {}
    for path in sorted(run_dir.glob("metrics*.duckdb")):
        try:
            step = last_step(path, lock_timeout_s=2.0)
            values = latest_values(path, lock_timeout_s=2.0)
        except CambiumError:
            continue
        if step is not None:
            steps = step if steps is None else max(steps, step)
        for name, (s, v) in values.items():
            if name not in latest or s > latest[name][0]:
                latest[name] = (s, v)
    return steps, latest


def _pick(latest: dict[str, tuple[int, float]], n: int) -> dict[str, tuple[int, float]]:
    order = [k for k in _PREFERRED if k in latest] + [k for k in latest if k not in _PREFERRED]
    return {k: latest[k] for k in order[:n]}


def _provenance_table(path: Path) -> Table | str:
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"[red]cannot read {path}: {exc}"
    table = Table.grid(padding=(0, 2))
    git = prov.get("git") or {}
    commit = git.get("commit") or "no git commit"
    table.add_row("[bold]git", f"{commit}{' (dirty)' if git.get('dirty') else ''}")
    table.add_row("[bold]seed", str(prov.get("seed")))
    table.add_row("[bold]host", str(prov.get("host")))
    table.add_row("[bold]command", " ".join(prov.get("command", [])))
    table.add_row("[bold]versions", ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items()))
    for f in prov.get("data_files", []):
        table.add_row("[bold]data", f"{f['path']} ({f['bytes']} bytes, sha256 {f['sha256'][:16]})")
    table.add_row("[bold]resumes", str(len(prov.get("resumes", []))))
    return table


def _checkpoint_table(directory: Path) -> Table | str:
    paths = list_checkpoints(directory)
    if not paths:
        return "no checkpoints"
    table = Table("step", "size", "time", "state")
    for p in paths:
        try:
            meta = verify_checkpoint(p, hashes=False)
            table.add_row(str(meta["step"]), f"{meta['total_bytes'] / 1e6:.2f} MB", str(meta["time"])[:19],
                          "complete (sizes checked; load verifies hashes)")
        except CambiumError as exc:
            table.add_row(p.name, "-", "-", f"[red]incomplete: {str(exc).split(': ', 1)[-1]}")
    return table


def _flat_config(record: RunRecord) -> dict[str, Any]:
    path = record.dir / "config.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RunError(f"run {record.id}: cannot read {path}: {exc}") from None
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", data)
    return flat


def _status(status: str) -> str:
    return f"[{_STATUS_STYLE.get(status, 'white')}]{status}[/]"


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _fmt_config(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
