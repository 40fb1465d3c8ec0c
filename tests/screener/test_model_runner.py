"""SCR-4: baseline heuristic (closed forms checked numerically), artifact loading and the schema-hash guard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cambium.core.errors import DataError
from cambium.screener.baseline import _partial_mean, baseline_predict, norm_cdf
from cambium.screener.config import BaselineConfig, ModelConfig
from cambium.screener.model_runner import MANIFEST_FORMAT, TARGETS, ModelRunner, load_artifacts
from cambium.screener.schema import FEATURE_SCHEMA, FEATURE_SCHEMA_HASH, feature_names, feature_vector, schema_hash

from ._builders import feature_snapshot


def test_schema_hash_depends_on_order_names_and_dtypes() -> None:
    assert schema_hash(FEATURE_SCHEMA) == FEATURE_SCHEMA_HASH and len(FEATURE_SCHEMA_HASH) == 64
    swapped = (FEATURE_SCHEMA[1], FEATURE_SCHEMA[0], *FEATURE_SCHEMA[2:])
    retyped = (("mid", "float32"), *FEATURE_SCHEMA[1:])
    assert len({FEATURE_SCHEMA_HASH, schema_hash(swapped), schema_hash(retyped),
                schema_hash(FEATURE_SCHEMA[:-1])}) == 4


def test_feature_vector_is_schema_ordered_with_nan_for_missing() -> None:
    x = feature_vector([feature_snapshot()])
    names = feature_names()
    assert x.shape == (1, len(names))
    assert x[0, names.index("mid")] == 61800.25
    assert math.isnan(x[0, names.index("ret_bps_5m")])


def test_norm_cdf_and_partial_mean_against_numerical_integration() -> None:
    grid = np.linspace(-40.0, 40.0, 400_001)
    pdf = np.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi)
    for x in (-3.0, -0.5, 0.0, 1.2, 4.0):
        left = np.linspace(-40.0, x, 200_001)
        numeric = np.trapezoid(np.exp(-0.5 * left**2) / math.sqrt(2 * math.pi), left)
        assert norm_cdf(x) == pytest.approx(numeric, abs=1e-8)
    for m, s, c in [(0.0, 3.0, 6.0), (2.0, 5.0, 4.5), (-1.0, 0.7, 0.2)]:
        y = m + s * grid
        numeric = np.trapezoid(np.maximum(y - c, 0.0) * pdf, grid)
        assert _partial_mean(m, s, c) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_baseline_inplay_matches_monte_carlo_terminal_bound() -> None:
    # 2·P(|X| ≥ T) (reflection) must be at least the terminal probability estimated by sampling.
    cfg = BaselineConfig()
    snap = feature_snapshot(features={"spread_bps": 1.0, "impact_bps": 1.0, "realized_vol_bps_60s": 12.0,
                                      "flow_imbalance_10s": 0.4, "flow_imbalance_60s": 0.4})
    out = baseline_predict(snap, "B", cfg)
    rng = np.random.default_rng(0)
    sigma = 12.0 * math.sqrt(2.0)
    x = rng.normal(cfg.flow_drift * 0.4 * sigma, sigma, 400_000)
    terminal = float(np.mean(np.abs(x) >= 15.0 + 4.0 + 2.0))
    assert out.p_inplay[1] == pytest.approx(min(1.0, 2 * terminal), abs=0.01)
    utility = float(np.mean(np.maximum(np.abs(x) - 6.0, 0.0)))
    assert out.expected_utility_bps_2m == pytest.approx(utility, rel=0.02)
    assert out.reasons == ("FLOW_BUY",)


def test_baseline_moves_the_right_way_and_gates() -> None:
    runner = ModelRunner()
    calm = runner.predict(feature_snapshot(features={"spread_bps": 0.5, "impact_bps": 0.5,
                                                     "realized_vol_bps_60s": 2.0}))
    wild = runner.predict(feature_snapshot(features={"spread_bps": 0.5, "impact_bps": 0.5,
                                                     "realized_vol_bps_60s": 40.0}))
    costly = runner.predict(feature_snapshot(features={"spread_bps": 8.0, "impact_bps": 15.0,
                                                       "realized_vol_bps_60s": 40.0}))
    gated = runner.predict(feature_snapshot(features={"spread_bps": 12.0, "impact_bps": 0.5,
                                                      "realized_vol_bps_60s": 40.0}))
    assert calm.model_version == "baseline-v1" and calm.calibration_version == "none"
    assert calm.p_inplay_2m < wild.p_inplay_2m and costly.p_inplay_2m < wild.p_inplay_2m
    assert calm.p_inplay_30s <= calm.p_inplay_2m
    assert calm.p_toxic < wild.p_toxic
    assert calm.status == "DEAD" and wild.status in {"TRAP", "TRADEABLE", "WATCH"}
    assert gated.p_inplay_2m == 0.0 and "WIDE_SPREAD" in gated.reasons
    assert runner.predict(feature_snapshot(), profile="A").profile == "A"


def test_missing_required_feature_is_a_data_issue() -> None:
    pred = ModelRunner().predict(feature_snapshot(features={"spread_bps": 1.0}))
    assert pred.status == "DATA_ISSUE"
    assert pred.reasons[:2] == ("MISSING_FEATURE:impact_bps", "MISSING_FEATURE:realized_vol_bps_60s")


def _write_manifest(path: Path, **over: object) -> Path:
    n = len(FEATURE_SCHEMA)
    coef = [0.0] * n
    coef[feature_names().index("realized_vol_bps_60s")] = 0.1
    spec = {"kind": "logistic", "params": {"coef": coef, "intercept": -1.0}}
    data: dict[str, object] = {"format": MANIFEST_FORMAT, "feature_schema_hash": FEATURE_SCHEMA_HASH,
                               "feature_names": list(feature_names()), "model_version": "logistic-test-1",
                               "calibration_version": "identity-1", "models": {"B": dict.fromkeys(TARGETS, spec)}}
    data.update(over)
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps(data))
    return path


def test_artifacts_are_used_when_present(tmp_path: Path) -> None:
    runner = ModelRunner(ModelConfig(artifacts_dir=str(_write_manifest(tmp_path / "art"))))
    pred = runner.predict(feature_snapshot())
    expected = 1.0 / (1.0 + math.exp(-(0.1 * 3.0 - 1.0)))
    assert pred.p_inplay_2m == pytest.approx(expected) and pred.p_toxic == pytest.approx(expected)
    assert pred.model_version == "logistic-test-1" and pred.calibration_version == "identity-1"
    with pytest.raises(DataError, match="profile A"):
        runner.predict(feature_snapshot(), profile="A")


def test_artifact_with_other_schema_hash_is_refused_naming_both(tmp_path: Path) -> None:
    other = "ab" * 32
    art = _write_manifest(tmp_path / "art", feature_schema_hash=other)
    with pytest.raises(DataError) as info:
        load_artifacts(art)
    assert other in str(info.value) and FEATURE_SCHEMA_HASH in str(info.value)


@pytest.mark.parametrize(("over", "match"), [
    ({"format": "v0"}, "format"),
    ({"models": {"B": {"p_inplay_2m": {"kind": "logistic", "params": {"coef": [1.0], "intercept": 0.0}}}}},
     "lacks models"),
    ({"models": {"B": {t: {"kind": "pickle", "params": {}} for t in TARGETS}}}, "unknown kind 'pickle'"),
    ({"models": {"B": {t: {"kind": "logistic", "params": {"coef": [1.0], "intercept": 0.0}} for t in TARGETS}}},
     "coef has 1 values"),
    ({"extra": 1}, "unknown field `extra`"),
])
def test_bad_manifests_are_refused(tmp_path: Path, over: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_artifacts(_write_manifest(tmp_path / "art", **over))
    with pytest.raises(DataError, match="does not exist"):
        load_artifacts(tmp_path / "nowhere")
