"""Every shipped config under configs/<system>/ loads with its system's root model (`cambium.<system>.config`)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from cambium.core.config import load, to_toml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    model = importlib.import_module(f"cambium.{path.parent.name}.config").CONFIG_MODEL
    cfg = load(path, model)
    again = tmp_path / path.name
    again.write_text(to_toml(cfg))
    assert load(again, model) == cfg
