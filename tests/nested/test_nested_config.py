"""cambium.nested.config: the root model validates the memory knobs and the composition when a file loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from cambium.core.config import load, load_data, to_toml
from cambium.core.errors import ConfigError
from cambium.nested.config import CONFIG_MODEL
from cambium.nested.model import count_parameters

MINIMAL = {"model": {"vocab_size": 256, "dim": 64, "n_levels": 2, "heads": 4, "mlp_hidden": 128, "window": 32}}


def test_minimal_config_loads_with_documented_defaults() -> None:
    cfg = load_data(MINIMAL, CONFIG_MODEL)
    assert cfg.model.composition == "mag"
    assert cfg.model.memory.structure == "matrix"
    assert "structure" in to_toml(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.memory.structure=vector", "model.memory.algorithm=newton_schulz"], "structure='vector'"),
        (["model.heads=3"], "dim=64 must be divisible by heads=3"),
        (["model.composition=swa", "model.memory.chunk_size=32"], "composition='swa' has no memory"),
        (["build.warmup_steps=500"], "warmup_steps=500"),
    ],
)
def test_invalid_configs_are_rejected_naming_the_fields(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_data(MINIMAL, CONFIG_MODEL, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["cms.periods=[1, 8]"], r"'cms' is not built yet \(the Continuous Memory System.*issue 20\)"),
        (["cms.combine=gated"], r"'cms' is not built yet"),
        (["model.segment_len=48"], r"'model.segment_len' is not built yet \(MAC's segments, issue 20\)"),
        (["model.persistent_tokens=4"], r"'model.persistent_tokens' is not built yet"),
        (["model.composition=mac"], r"model.composition=\"mac\": not built yet \(issue 20\); use one of 'mag', 'swa'"),
        (["model.composition=mal"], r"model.composition=\"mal\": not built yet \(issue 20\)"),
        (["model.composition=full"], r"model.composition=\"full\": not built yet \(issue 20\)"),
    ],
)
def test_unbuilt_features_are_refused_naming_the_key(overrides: list[str], message: str) -> None:
    """What issue 20 will build is refused when set, never accepted and ignored (a `cms` table trained
    bit-identically to none)."""
    with pytest.raises(ConfigError, match=message):
        load_data(MINIMAL, CONFIG_MODEL, overrides)


def test_an_unbuilt_table_in_a_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "cms.toml"
    path.write_text(to_toml(load_data(MINIMAL, CONFIG_MODEL)) + "\n[cms]\nperiods = [1, 8]\ncombine = \"gated\"\n")
    with pytest.raises(ConfigError, match=r"cms.toml: cms: not built yet \(the Continuous Memory System"):
        load(path, CONFIG_MODEL)


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "nested"


def test_mag_and_swa_comparison_configs_differ_only_in_composition_and_mlp_width() -> None:
    mag = load(CONFIGS / "mag-cpu.toml", CONFIG_MODEL)
    swa = load(CONFIGS / "swa-cpu.toml", CONFIG_MODEL)
    assert (mag.model.composition, swa.model.composition) == ("mag", "swa")
    assert mag.context == swa.context and mag.build == swa.build and mag.model.window == swa.model.window
    same = {"composition", "mlp_hidden", "memory"}  # swa has no memory table
    assert mag.model.model_dump(exclude=same) == swa.model.model_dump(exclude=same)
    n_mag, n_swa = count_parameters(mag.model), count_parameters(swa.model)
    assert abs(n_mag - n_swa) / n_mag < 5e-4, (n_mag, n_swa)
    # One SwiGLU unit wider per level would overshoot: the baseline's width is the closest match.
    wider = swa.model.model_copy(update={"mlp_hidden": swa.model.mlp_hidden + 1})
    narrower = swa.model.model_copy(update={"mlp_hidden": swa.model.mlp_hidden - 1})
    assert abs(n_mag - n_swa) <= min(abs(n_mag - count_parameters(m)) for m in (wider, narrower))
