"""`cambium demo`: the doctor, then the demo of every system that exists, then where the results are."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import typer
from rich.console import Console

from cambium.core.doctor import doctor_command

# (system, module holding its `demo()`); a system is listed here once its demo exists.
DEMOS: list[tuple[str, str]] = [
    ("market", "cambium.market.cli"),
    ("moe", "cambium.moe.cli"),
    ("morph", "cambium.morph.cli"),
    ("nested", "cambium.nested.cli"),
    ("screener", "cambium.screener.cli"),
    ("worldmodel", "cambium.worldmodel.cli"),
]


def demo_command(
    runs_dir: Path = typer.Option(Path("runs"), help="Directory that receives the runs made by the demos."),
    only: list[str] = typer.Option([], help="Run only these systems' demos (repeatable)."),
) -> None:
    """Run `cambium doctor`, then each system's demo on the committed samples, and say where the results went."""
    console = Console(stderr=True)
    doctor_command(quick=True, json_output=False, runs_dir=runs_dir)
    unknown = sorted(set(only) - {name for name, _ in DEMOS})
    if unknown:
        available = [name for name, _ in DEMOS]
        raise typer.BadParameter(f"no demo for {unknown}; available: {available}", param_hint="--only")
    if not DEMOS:
        console.print("No system demo exists yet (see README.md for the status of each system).")
    for name, module in DEMOS:
        if only and name not in only:
            continue
        console.rule(f"cambium {name} demo")
        start = time.perf_counter()
        importlib.import_module(module).demo(runs_dir=runs_dir)
        console.print(f"{name} demo finished in {time.perf_counter() - start:.1f} s")
    console.print(f"Results: runs in {runs_dir.resolve()} (list them with `cambium runs ls --runs-dir {runs_dir}`).")
