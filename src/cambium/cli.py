"""The `cambium` command: mounts the CLI group of the core and of each system. No logic lives here.

Groups are mounted lazily: `cambium market …` imports `cambium.market.cli` and nothing else, so commands that need no
torch (market, screener, config) start without it. `cambium --help` lists every group from the one-line helps in
`MOUNTS`, importing none of them; tests/test_cli.py checks that these equal the groups' own help texts.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from difflib import get_close_matches

import typer
import typer.main
from typer import _click
from typer.core import TyperCommand, TyperGroup

from cambium.core.errors import CambiumError


@dataclass(frozen=True)
class Mount:
    """Where `cambium <name>` lives: a typer app (a group) or a function (a single command) in `module`."""

    module: str
    attr: str
    help: str


MOUNTS: dict[str, Mount] = {
    "doctor": Mount("cambium.core.doctor", "doctor_command", "Show versions, CPU/RAM, devices, measured matmul peak "
                    "and bandwidth, optional servers and packages."),
    "demo": Mount("cambium.demo", "demo_command", "Run `cambium doctor`, then each system's demo on the committed "
                  "samples, and say where the results went."),
    "runs": Mount("cambium.core.cli", "runs_app", "List, inspect and compare runs (the directories under --runs-dir "
                  "and their registry experiments.sqlite)."),
    "dashboard": Mount("cambium.dashboard.cli", "dashboard_command", "Serve a web dashboard over every run in "
                       "--runs-dir: runs list, curves, comparisons, per-system panels."),
    "config": Mount("cambium.config_cli", "config_app", "Validate and inspect TOML configs."),
    "market": Mount("cambium.market.cli", "app", "Market data: candle store, Binance downloader, recorder and replay."),
    "moe": Mount("cambium.moe.cli", "app", "DeepSeek-shaped mixture-of-experts language models: data, training, "
                 "sampling."),
    "morph": Mount("cambium.morph.cli", "app", "Morphogenetic training: seeds grow into the host where it needs "
                   "capacity."),
    "nested": Mount("cambium.nested.cli", "app", "Nested learning: models whose forward pass is optimisation (MAG, "
                    "MAL, MAC over attention with CMS memory levels; SWA-only and full-attention baselines), built on "
                    "a continuous context stream."),
    "screener": Mount("cambium.screener.cli", "app", "Live crypto in-play screener: replay recordings "
                      "deterministically, or watch Binance live."),
    "worldmodel": Mount("cambium.worldmodel.cli", "app", "Market world model: FSQ tokenizer, Mamba-2 JEPA, OT-CFM "
                        "futures, pipeline and evaluation."),
}


def load_mount(name: str) -> _click.Command:
    """Import `cambium <name>` and build its click command exactly as `add_typer`/`command` on the root would."""
    mount = MOUNTS[name]
    target = getattr(importlib.import_module(mount.module), mount.attr)
    # A one-off parent with a callback is always a group, so a single function comes back under its name too.
    parent = typer.Typer(add_completion=False)
    parent.callback()(lambda: None)
    if isinstance(target, typer.Typer):
        parent.add_typer(target, name=name)
    else:
        parent.command(name)(target)
    group = typer.main.get_command(parent)
    assert isinstance(group, TyperGroup)
    return group.commands[name]


class LazyGroup(TyperGroup):
    """The root group: resolves a subcommand by importing only its module; help listings import nothing."""

    _listing = False

    def list_commands(self, ctx: _click.Context) -> list[str]:
        return list(MOUNTS)

    def get_command(self, ctx: _click.Context, cmd_name: str) -> _click.Command | None:
        if cmd_name not in MOUNTS:
            return None
        if cmd_name not in self.commands:
            if self._listing:
                return TyperCommand(cmd_name, help=MOUNTS[cmd_name].help)
            self.commands[cmd_name] = load_mount(cmd_name)
        return self.commands[cmd_name]

    def format_help(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def resolve_command(
        self, ctx: _click.Context, args: list[str]
    ) -> tuple[str | None, _click.Command | None, list[str]]:
        # TyperGroup suggests from `self.commands`, which holds only what was loaded so far.
        try:
            return super().resolve_command(ctx, args)
        except _click.exceptions.UsageError as exc:
            matches = get_close_matches(args[0], list(MOUNTS)) if args else []
            if matches and "Did you mean" not in exc.message:
                exc.message = f"{exc.message.rstrip('.')}. Did you mean {', '.join(map(repr, matches))}?"
            raise


app = typer.Typer(
    cls=LazyGroup,
    help="cambium: screener, worldmodel, moe, nested and morph on one shared core.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Groups are added by `LazyGroup`, so typer needs a callback to build the root as a group."""


def main() -> None:
    """Entry point of the console script: a CambiumError becomes one line on stderr and a non-zero exit."""
    try:
        app()
    except CambiumError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
