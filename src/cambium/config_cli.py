"""`cambium config show`: validate a config file against its system's model and print the resolved config.

The system is the config's directory name (`configs/<system>/<name>.toml`) unless `--system` says otherwise; its root
model is `cambium.<system>.config.CONFIG_MODEL`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.syntax import Syntax

from cambium.core.config import fingerprint, load, to_toml
from cambium.core.errors import ConfigError

config_app = typer.Typer(help="Validate and inspect TOML configs.", no_args_is_help=True)


def model_for(system: str) -> type[BaseModel]:
    try:
        module = importlib.import_module(f"cambium.{system}.config")
    except ModuleNotFoundError:
        raise ConfigError(f"no system named {system!r} has a config model; pass --system with a system name") from None
    model: type[BaseModel] = module.CONFIG_MODEL
    return model


@config_app.command("show")
def show(
    path: Path = typer.Argument(..., help="The TOML config file."),
    set_: list[str] = typer.Option([], "--set", help="Override a value: section.key=value (repeatable)."),
    system: str = typer.Option("", help="System whose model validates the file (default: the file's directory)."),
) -> None:
    """Validate PATH (with any --set overrides) and print the resolved config and its sha256 fingerprint."""
    cfg = load(path, model_for(system or path.resolve().parent.name), set_)
    console = Console()
    console.print(Syntax(to_toml(cfg), "toml", theme="ansi_dark", background_color="default"))
    console.print(f"# fingerprint {fingerprint(cfg)}")
