"""cambium.nested.config: the root model validates the memory knobs and the composition when a file loads."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.core.config import load, load_data, to_toml
from cambium.core.errors import ConfigError
from cambium.nested.config import CONFIG_MODEL
from cambium.nested.model import count_parameters

MINIMAL = {"model": {"vocab_size": 256, "dim": 64, "n_blocks": 2, "heads": 4, "mlp_hidden": 128, "window": 32}}


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
        (["cms.periods=[1, 1]"], "strictly increasing"),
        (["cms.periods=[0, 8]"], "must be >= 1"),
        (["cms.periods=[]"], "cms.periods"),
        (["cms.combine=gated"], "cms.combine"),
        (["model.composition=swa", "cms.periods=[1, 8]"], "has no memory; remove the cms table"),
        (["model.segment_len=48"], "segment_len=48 is read by composition='mac' only"),
        (["model.composition=mac"], "composition='mac' has no attention window"),
        (["model.composition=mac", "model.window=null"], "composition='mac' needs segment_len"),
        (["model.composition=full"], "composition='full' has no attention window"),
        (["model.composition=mal", "model.window=null"], "composition='mal' needs a window"),
        (["model.composition=full", "model.window=null", "context.carry_attention=true"], "no window to carry"),
        (["model.n_levels=2"], "n_levels"),
        (["model.persistent_tokens=-1"], "persistent_tokens"),
    ],
)
def test_cms_and_compositions_refuse_settings_that_would_be_ignored(overrides: list[str], message: str) -> None:
    """`model.window=null` stands for a config without a window (TOML has no null)."""
    base = MINIMAL
    if "model.window=null" in overrides:
        base = {"model": {k: v for k, v in MINIMAL["model"].items() if k != "window"}}
        overrides = [o for o in overrides if o != "model.window=null"]
    with pytest.raises(ConfigError, match=message):
        load_data(base, CONFIG_MODEL, overrides)


def test_the_spec_default_cms_is_four_levels_and_a_cms_table_loads_from_a_file(tmp_path: Path) -> None:
    assert load_data(MINIMAL, CONFIG_MODEL).cms.periods == (1, 8, 64, 512)
    path = tmp_path / "cms.toml"
    text = to_toml(load_data(MINIMAL, CONFIG_MODEL, ["cms.periods=[1, 8]", "cms.combine=mix"]))
    assert "[cms]" in text
    path.write_text(text)
    cms = load(path, CONFIG_MODEL).cms
    assert (cms.periods, cms.combine) == ((1, 8), "mix")


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


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(min_value=-3, max_value=2**40), max_size=6),
       st.sampled_from(["sum", "mix", "gated", ""]))
def test_any_cms_table_loads_or_is_refused_in_one_line(periods: list[int], combine: str) -> None:
    try:
        cfg = load_data({**MINIMAL, "cms": {"periods": periods, "combine": combine}}, CONFIG_MODEL)
    except ConfigError as exc:
        assert str(exc).count("\n") == 0 and "cms" in str(exc)
        return
    assert list(cfg.cms.periods) == periods and periods and periods[0] >= 1
    assert all(b > a for a, b in itertools.pairwise(periods)) and combine in ("sum", "mix")
