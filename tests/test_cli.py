"""The `cambium` command: every command and option is described, and a user's config mistake is one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from cambium.cli import MOUNTS, app, load_mount

REPO = Path(__file__).resolve().parents[1]


def walk(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    # typer builds on its own copy of click, so duck typing rather than isinstance(click.Group); the root group is
    # lazy, so subcommands come from get_command rather than `.commands`.
    out = [(path, cmd)]
    if hasattr(cmd, "list_commands"):
        ctx = cmd.make_context("cambium", ["--help"], resilient_parsing=True)
        for name in sorted(cmd.list_commands(ctx)):
            out += walk(cmd.get_command(ctx, name), (*path, name))
    return out


COMMANDS = walk(typer.main.get_command(app))

# Run in a fresh interpreter: what `cambium --help`, `cambium market --help` and `cambium screener --help` import.
LAZY_PROBE = """
import json
import sys
from typer.testing import CliRunner
import cambium.cli as cli

runner = CliRunner()
listing = runner.invoke(cli.app, ["--help"], env={"COLUMNS": "100"})
assert listing.exit_code == 0, listing.output
for group in ("market", "screener"):
    result = runner.invoke(cli.app, [group, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0 and "demo" in result.output, result.output
print("torch" in sys.modules)
for name in cli.MOUNTS:
    cli.load_mount(name)
print(json.dumps(listing.output))
"""


def test_every_system_with_a_demo_offers_it_as_a_subcommand() -> None:
    """`cambium demo` runs each system's `demo()`; `cambium <system> demo` runs the same one alone."""
    from cambium.demo import DEMOS

    paths = {path for path, _ in COMMANDS}
    assert {(name, "demo") for name, _ in DEMOS} <= paths


def test_market_and_screener_start_without_torch_and_the_lazy_listing_is_the_real_one() -> None:
    proc = subprocess.run([sys.executable, "-c", LAZY_PROBE], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    torch_imported, lazy_listing = proc.stdout.splitlines()[-2:]
    assert torch_imported == "False", "`cambium market/screener --help` imported torch"
    loaded = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "100"})  # every group is loaded here (COMMANDS)
    assert loaded.exit_code == 0 and json.loads(lazy_listing) == loaded.output


def test_the_short_helps_kept_in_cli_are_the_groups_own() -> None:
    for name, mount in MOUNTS.items():
        assert load_mount(name).help == mount.help, f"cambium.cli.MOUNTS[{name!r}].help differs from the group's"


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=lambda x: " ".join(x) if isinstance(x, tuple) else "")
def test_every_command_and_option_is_described(path: tuple[str, ...], cmd: Any) -> None:
    assert (cmd.help or "").strip(), f"cambium {' '.join(path)} has no description"
    for param in cmd.params:
        if param.param_type_name == "option" and param.name != "help":
            assert (param.help or "").strip(), f"cambium {' '.join(path)} {param.opts[0]} has no help text"
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("top_k = 2", "topk = 2", "model.moe.topk: unknown key (did you mean 'top_k'?"),
        ("dim = 64", 'dim = "wide"', 'model.dim="wide": Input should be a valid integer'),
        ("top_k = 2", "top_k = 99", "top_k=99 must be <= n_routed_experts=8"),
        ("[train]\n", "[train]\nlog_every = 0\n", "train.log_every=0: Input should be greater than or equal to 1"),
        ("dim = 64", "dim = -3", "model.dim=-3: Input should be greater than or equal to 2"),
    ],
)
def test_a_config_mistake_is_one_line_and_a_nonzero_exit(tmp_path: Path, old: str, new: str, needle: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((REPO / "configs" / "moe" / "tiny.toml").read_text().replace(old, new, 1))
    proc = subprocess.run([sys.executable, "-m", "cambium.cli", "moe", "train", "--config", str(bad)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: ") and needle in lines[0], proc.stderr


def test_an_override_mistake_names_the_override(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cambium.cli", "config", "show", "configs/moe/tiny.toml",
                           "--set", "model.moe.topk=3"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: override model.moe.topk: unknown key")
    assert "did you mean 'top_k'" in proc.stderr
