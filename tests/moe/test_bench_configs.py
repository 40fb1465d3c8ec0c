"""The dense twin used by the MoE-vs-dense comparison: equal active parameters, otherwise the same run."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.moe_vs_dense import SHAPES, active_params, dense_twin, schedule_overrides

from cambium.core.config import load
from cambium.moe.config import MoEConfig
from cambium.moe.model import MoETransformer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "moe"


def test_dense_cpu_is_moonlet_cpus_equal_active_twin() -> None:
    moe = load(CONFIGS / "moonlet-cpu.toml", MoEConfig)
    dense = load(CONFIGS / "dense-cpu.toml", MoEConfig)
    model = MoETransformer(dense.model)
    assert model.moe_layers() == []
    assert active_params(dense) == active_params(moe)
    twin, hidden = dense_twin(moe)
    assert hidden == dense.model.dense_hidden
    # Everything but the name and the feed-forward layout is shared: same data, optimiser, schedule, training loop.
    a, b = moe.model_dump(), dense.model_dump()
    a["model"].update(n_dense_layers=None, dense_hidden=None, moe=None)  # dense-cpu has no moe table
    b["model"].update(n_dense_layers=None, dense_hidden=None)
    a.pop("name"), b.pop("name")
    assert a == b
    assert twin.model == dense.model


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_dense_twin_matches_active_params_within_one_column(shape: str) -> None:
    overrides = [*SHAPES[shape], *schedule_overrides(100_000, 3e-3)]
    moe = load(CONFIGS / "moonlet-cpu.toml", MoEConfig, overrides)
    dense, hidden = dense_twin(moe)
    # One hidden column of a dense layer is 3·D parameters per layer: the twin is within half of that.
    assert abs(active_params(dense) - active_params(moe)) <= 3 * moe.model.dim * moe.model.n_layers / 2
    assert dense.schedule == moe.schedule and dense.data == moe.data and dense.optim == moe.optim
    assert hidden > 0
