"""Shared fixtures: the tiny config's mixture, prepared once per session from a slice of the committed text."""

from __future__ import annotations

from pathlib import Path

import pytest

from cambium.core.config import load
from cambium.data.mixture import prepare_mixture
from cambium.nested.config import NestedConfig

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "nested" / "tiny.toml"


def tiny_overrides(mixture_dir: Path) -> list[str]:
    return [f"context.mixture.out_dir={mixture_dir}", "context.mixture.tokenizer.train_chars=60000"]


@pytest.fixture(scope="session")
def tiny_mixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nested") / "mixture"
    spec = load(TINY, NestedConfig, tiny_overrides(out)).context.mixture
    # The config's dataset path is relative to the repository root; make it independent of the working directory.
    datasets = tuple(d.model_copy(update={"path": REPO / d.path}) for d in spec.datasets)
    prepare_mixture(spec.model_copy(update={"datasets": datasets}))
    return out


def tiny_config(mixture_dir: Path, *extra: str) -> NestedConfig:
    return load(TINY, NestedConfig, [*tiny_overrides(mixture_dir), *extra])
