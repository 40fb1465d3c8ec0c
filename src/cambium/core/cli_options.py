"""The options every training command shares, so that each system spells them the same way."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["CONFIG", "DEVICE", "RESUME", "RUNS_DIR", "SET"]

CONFIG = typer.Option(None, "--config", "-c", help="TOML config of a new run (with --resume: optional, the run's "
                      "stored config is used; a changed key must be one a resume may change).")
SET = typer.Option([], "--set", help="Override a config value: section.key=value, the value written as in TOML "
                   "(repeatable).")
RUNS_DIR = typer.Option(Path("runs"), "--runs-dir", help="Directory of the run registry.")
RESUME = typer.Option(None, "--resume", help="Continue this run (id or unique prefix) from its latest checkpoint, "
                      "with its stored config; --set may change lengths, intervals, threads and device.")
DEVICE = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (the same as --set <loop section>.device=…); "
                      "CUDA where there is none is an error.")

