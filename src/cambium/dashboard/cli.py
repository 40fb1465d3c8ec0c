"""`cambium dashboard`: serve the dashboard app (`cambium.dashboard.app`) with uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cambium.core.errors import ConfigError

__all__ = ["dashboard_command"]


def dashboard_command(
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="runs directory holding experiments.sqlite and one "
                                           "directory per run")] = Path("runs"),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port to listen on (0: any free one)")]
    = 8050,
    host: Annotated[str, typer.Option("--host", help="address to listen on; the default serves this machine only, "
                                      "another address serves anyone who can reach it")] = "127.0.0.1",
) -> None:
    """Serve a web dashboard over every run in --runs-dir: runs list, curves, comparisons, per-system panels."""
    import uvicorn

    from cambium.dashboard.app import LOOPBACK_HOSTS, create_app

    if not runs_dir.is_dir():
        raise ConfigError(f"--runs-dir {str(runs_dir)!r} is not a directory; train something first or point it at "
                          "a runs directory")
    allowed = LOOPBACK_HOSTS if host in LOOPBACK_HOSTS else ("*",)
    typer.echo(f"cambium dashboard over {runs_dir.resolve()} at http://{host}:{port}/  (Ctrl-C stops)")
    uvicorn.run(create_app(runs_dir, allowed_hosts=allowed), host=host, port=port, log_level="warning")
