"""The shipped config holds exactly the documented defaults; cross-field checks name fields and values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from cambium.core.config import load, load_data
from cambium.core.errors import ConfigError
from cambium.screener.config import CONFIG_MODEL, ScreenerConfig

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "screener" / "default.toml"


def test_default_toml_equals_model_defaults() -> None:
    assert load(DEFAULT, CONFIG_MODEL) == ScreenerConfig()


def test_documented_defaults() -> None:
    cfg = ScreenerConfig()
    assert (cfg.scorer.w_30s, cfg.scorer.w_2m, cfg.scorer.w_5m, cfg.scorer.utility_cap_bps,
            cfg.scorer.toxic_penalty) == (0.2, 0.5, 0.3, 50.0, 0.5)
    assert cfg.ranker.top_k == 20 and cfg.ranker.enter_threshold > cfg.ranker.exit_threshold
    assert not (cfg.notify.terminal.enabled or cfg.notify.webhook.enabled or cfg.notify.telegram.enabled)
    assert cfg.model.artifacts_dir is None


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str | None]]:
    out = []
    for name, field in model.model_fields.items():
        out.append((prefix + name, field.description))
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += _fields(sub, prefix + name + ".")
    return out


def test_every_field_is_described() -> None:
    missing = [name for name, desc in _fields(CONFIG_MODEL) if not desc]
    assert missing == []


@pytest.mark.parametrize(("override", "match"), [
    ("ranker.exit_threshold=0.3", r"enter_threshold=0.25 must be > exit_threshold=0.3"),
    ("scorer.w_2m=0.6", r"w_2m=0.6"),
    ("notify.telegram.enabled=true", r"chat_id"),
    ("notify.telegram.events=[\"SYMBOL_WOBBLE\"]", r"notify.telegram.events.0"),
    ("storage.rotate_rows=10", r"rotate_rows=10 must be >= batch_rows=1000"),
    ("ranker.top_kk=3", r"did you mean 'top_k'"),
    ("explain.llm_url=ftp://x", r"llm_url='ftp://x' must be an http:// or https:// URL"),
    ("train.calibration=beta", r"train.calibration"),
    ("train.holdout_fraction=1.0", r"train.holdout_fraction"),
    ("live.status_every_s=0", r"live.status_every_s"),
    ("storage.root=/tmp/x", r"unknown key 'storage.root'"),  # where the store goes is the command's --store
    ("features.stale_ms=5000", r"unknown key 'features.stale_ms'"),  # staleness is status.max_stale_*_ms
])
def test_bad_values_are_named(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load(DEFAULT, CONFIG_MODEL, [override])


def test_explain_and_train_tables_are_read_from_the_file() -> None:
    cfg = load(DEFAULT, CONFIG_MODEL, ["explain.max_tooltips=2", "train.cv_folds=3"])
    assert cfg.explain.max_tooltips == 2 and cfg.train.cv_folds == 3 and not cfg.explain.llm_enabled


def test_overrides_apply() -> None:
    cfg = load_data({}, CONFIG_MODEL, ["ranker.top_k=5", "notify.terminal.enabled=true"])
    assert cfg.ranker.top_k == 5 and cfg.notify.terminal.enabled
