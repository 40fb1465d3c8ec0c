"""The `cambium` command: mounts the CLI group of the core and of each system. No logic lives here."""

from __future__ import annotations

import sys

import typer

from cambium.config_cli import config_app
from cambium.core.cli import runs_app
from cambium.core.doctor import doctor_command
from cambium.core.errors import CambiumError
from cambium.demo import demo_command
from cambium.market.cli import app as market_app
from cambium.moe.cli import app as moe_app
from cambium.morph.cli import app as morph_app
from cambium.nested.cli import app as nested_app
from cambium.screener.cli import app as screener_app
from cambium.worldmodel.cli import app as worldmodel_app

app = typer.Typer(
    help="cambium: screener, worldmodel, moe, nested and morph on one shared core.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("doctor")(doctor_command)
app.command("demo")(demo_command)
app.add_typer(runs_app, name="runs")
app.add_typer(config_app, name="config")
app.add_typer(market_app, name="market")
app.add_typer(moe_app, name="moe")
app.add_typer(morph_app, name="morph")
app.add_typer(nested_app, name="nested")
app.add_typer(screener_app, name="screener")
app.add_typer(worldmodel_app, name="worldmodel")


def main() -> None:
    """Entry point of the console script: a CambiumError becomes one line on stderr and a non-zero exit."""
    try:
        app()
    except CambiumError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
