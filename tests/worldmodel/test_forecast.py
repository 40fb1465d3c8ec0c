"""Forecast evaluation (WM-7) and Strate III pieces: scoring rules against properscoring and brute force, GARCH against
`arch`, Diebold–Mariano, baselines and anchors that use no future bar, the return head against torch's Student-t, and
the forecast config refusing bad values."""

from __future__ import annotations

import math

import numpy as np
import properscoring
import pytest
import torch
from arch import arch_model
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.core.config import load_data
from cambium.core.errors import ConfigError
from cambium.worldmodel.config import CONFIG_MODEL, EvalConfig, FlowConfig, ForecastConfig, JEPAConfig, TokenizerConfig
from cambium.worldmodel.data import chronological_split
from cambium.worldmodel.evaluation import CodedSeries
from cambium.worldmodel.forecast import (
    GarchFit,
    baseline_paths,
    diebold_mariano,
    energy_score,
    fit_garch,
    garch_backcast,
    garch_for_origins,
    garch_variance,
    interval_coverage,
    pit,
    score_paths,
)
from cambium.worldmodel.futures import (
    FutureModel,
    ReturnHead,
    build_anchors,
    holdout_origins,
    sample_paths,
    trailing_std,
    train_anchors,
)
from cambium.worldmodel.jepa import WorldModelJEPA
from cambium.worldmodel.tokenizer import FSQTokenizer


def _garch_series(t: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w, a, b, nu = 0.05, 0.08, 0.9, 5.0
    var, r = w / (1 - a - b), np.empty(t)
    for i in range(t):
        r[i] = math.sqrt(var) * rng.standard_t(nu) * math.sqrt((nu - 2) / nu)
        var = w + a * r[i] ** 2 + b * var
    return r / 100


def test_garch_filter_and_forecast_equal_arch() -> None:
    r = _garch_series(2500)
    fit = fit_garch(r)
    res = arch_model(r * 100, mean="Zero", vol="GARCH", p=1, q=1, dist="t", rescale=False).fit(disp="off")
    assert fit.alpha == pytest.approx(float(res.params["alpha[1]"]), rel=1e-6)
    var = garch_variance(fit, r, garch_backcast(r))
    np.testing.assert_allclose(var[:-1], res.conditional_volatility**2, rtol=1e-10)
    assert var[-1] == pytest.approx(float(res.forecast(horizon=1).variance.values[-1, 0]), rel=1e-10)
    # A fit recovers the simulating parameters roughly.
    assert 0.85 < fit.alpha + fit.beta < 1.0 and 3 < fit.nu < 9


def test_energy_score_is_crps_in_one_dimension_and_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 17)), rng.normal(size=30)
    np.testing.assert_allclose(energy_score(x[:, :, None], y[:, None]), properscoring.crps_ensemble(y, x), atol=1e-12)
    xp, yp = rng.normal(size=(5, 9, 3)), rng.normal(size=(5, 3))
    brute = [np.mean([np.linalg.norm(a - yp[m]) for a in xp[m]])
             - 0.5 * np.mean([np.linalg.norm(a - b) for a in xp[m] for b in xp[m]]) for m in range(5)]
    np.testing.assert_allclose(energy_score(xp, yp, chunk=2), brute, atol=1e-12)


def test_coverage_pit_and_scores_of_a_calibrated_forecast() -> None:
    rng = np.random.default_rng(1)
    m, n = 4000, 200
    samples, obs = rng.normal(size=(m, n)), rng.normal(size=m)
    assert interval_coverage(samples, obs, 0.9).mean() == pytest.approx(0.9, abs=0.02)
    assert interval_coverage(samples, obs, 0.5).mean() == pytest.approx(0.5, abs=0.03)
    hist = np.histogram(pit(samples, obs), bins=10, range=(0, 1))[0] / m
    assert np.abs(hist - 0.1).max() < 0.02
    paths, realised = rng.normal(size=(m, 50, 4)) * 0.01, rng.normal(size=(m, 4)) * 0.01
    s = score_paths(paths, realised, 4)
    np.testing.assert_allclose(s.crps, properscoring.crps_ensemble(realised.sum(1), paths.sum(-1)))
    wide = score_paths(paths * 3, realised, 4)
    assert wide.crps.mean() > s.crps.mean() and wide.in90.mean() > 0.97  # too wide: worse CRPS, over-coverage


def test_diebold_mariano_detects_a_real_difference_and_averages_symbols_per_time() -> None:
    rng = np.random.default_rng(2)
    t = np.repeat(np.arange(400), 3)  # three symbols at every origin time
    a = rng.exponential(size=1200)
    same = diebold_mariano(a, a + rng.normal(scale=0.01, size=1200), t, lags=2)
    assert same["n_times"] == 400 and same["p_value"] > 0.01
    worse = diebold_mariano(a, a + 0.2 + rng.normal(scale=0.5, size=1200), t, lags=2)
    assert worse["stat"] < -5 and worse["p_value"] < 1e-6 and worse["mean_diff"] == pytest.approx(-0.2, abs=0.05)
    # Newey–West with 0 extra lags of a serially uncorrelated series: the plain t statistic of the per-time means.
    d = rng.normal(loc=0.1, size=300)
    res = diebold_mariano(d, np.zeros(300), np.arange(300), lags=0)
    assert res["stat"] == pytest.approx(d.mean() / (d.std() / math.sqrt(300)), rel=1e-12)


def test_baselines_and_garch_use_no_bar_after_the_origin() -> None:
    r = np.concatenate([[np.nan], _garch_series(4000, seed=3)])
    ends = np.array([3000, 3100, 3300, 3500])
    kw = {"train_bars": 2800, "vol_window": 168, "bootstrap_window": 720}
    gv, gf, n_fits = garch_for_origins(r, ends, 2800, 168, 2000)
    assert n_fits == 3  # blocks of 168 bars after the training window holding an origin: 1, 3, 4 (3300 and 3500)
    changed = r.copy()
    changed[3501:] *= 7.0  # every bar after the last origin
    gv2, gf2, _ = garch_for_origins(changed, ends, 2800, 168, 2000)
    np.testing.assert_array_equal(gv, gv2)
    for method in ("random_walk", "gbm", "bootstrap", "garch"):
        a = baseline_paths(method, r, ends, 16, 24, np.random.default_rng(0), garch_var=gv, garch_fit=gf, **kw)
        b = baseline_paths(method, changed, ends, 16, 24, np.random.default_rng(0), garch_var=gv2, garch_fit=gf2,
                           **kw)
        np.testing.assert_array_equal(a, b)
        assert a.shape == (4, 16, 24) and np.isfinite(a).all()
    hist = r[3500 - 719 : 3501]
    boot = baseline_paths("bootstrap", r, ends[-1:], 50, 24, np.random.default_rng(0), **kw)
    assert np.isin(boot, hist).all()
    gbm = baseline_paths("gbm", r, ends[:1], 4000, 24, np.random.default_rng(0), **kw)
    assert gbm.std() == pytest.approx(np.std(r[3000 - 167 : 3001], ddof=1), rel=0.02)


def test_garch_paths_variance_follows_the_recursion() -> None:
    from cambium.worldmodel.forecast import garch_paths

    fit = GarchFit(0.05, 0.08, 0.9, 6.0)
    paths = garch_paths(fit, np.array([2.0]), 40000, 3, np.random.default_rng(0)) * 100
    expected = [2.0, 0.05 + 0.98 * 2.0, 0.05 + 0.98 * (0.05 + 0.98 * 2.0)]
    np.testing.assert_allclose(paths[0].var(0), expected, rtol=0.04)


def test_trailing_std_matches_a_loop() -> None:
    r = np.concatenate([[np.nan], np.random.default_rng(4).normal(size=60)])
    got = trailing_std(r, 7)
    assert np.isnan(got[:7]).all()
    for i in range(7, 61):
        assert got[i] == pytest.approx(np.std(r[i - 6 : i + 1], ddof=1), rel=1e-9)


def test_return_head_nll_is_the_student_t_and_paths_have_the_scale(make_candles) -> None:
    torch.manual_seed(0)
    head = ReturnHead(6, 8, 5, 16)
    cond, fut, y = torch.randn(7, 6), torch.randn(7, 8), torch.randn(7, 5)
    with torch.no_grad():
        loc, scale, df = head(cond, fut)
    ref = -torch.distributions.StudentT(df, loc, scale).log_prob(y).mean()
    assert float(head.nll(cond, fut, y).detach()) == pytest.approx(float(ref), rel=1e-6)
    assert float(df) > 2


def _segment(make_candles, bars: int):
    c = make_candles(1, bars, seed=5)
    from cambium.worldmodel.training import CandleSeries

    return CandleSeries("TESTUSDT", c.ohlcv[0], c.open_time_ms[0])


def test_anchors_use_no_future_bar_and_splits_hold(make_candles) -> None:
    torch.manual_seed(0)
    s = _segment(make_candles, 1600)
    tok = FSQTokenizer(TokenizerConfig(patch_length=8, hidden_channels=8, n_layers=3))
    jcfg = JEPAConfig.model_validate({"seq_len": 4, "encoder": {"d_model": 8, "n_layers": 1, "n_heads": 2,
                                                                "chunk_size": 4}})
    model = WorldModelJEPA(jcfg, tok).eval()
    flow = FlowConfig(vol_window=24, hidden_dim=16, head_hidden=16)

    def coded(series) -> list[CodedSeries]:
        codes = tok.tokenize(series.ohlcv.float().unsqueeze(0))[0]
        return [CodedSeries(series, codes, series.ohlcv.shape[0] % 8, 8)]

    cs = coded(s)
    anchors = build_anchors(model, cs, flow, (1, 4, 12))
    e = int(anchors.end_bar[0])
    assert e >= 4 * 24 and anchors.returns.shape[1] == 16 and anchors.future.shape[1] == 2 * 8
    close = s.ohlcv[:, 3]
    assert float(anchors.returns[0, 0]) == pytest.approx(math.log(float(close[e + 1] / close[e])), rel=1e-12)
    split = chronological_split([s], EvalConfig(holdout_fraction=0.3, embargo_bars=10), "1h")
    tr = train_anchors(anchors, cs, split)
    assert len(tr) > 10 and (s.open_time_ms[tr.end_bar + 16] < split.split_ms).all()
    ho = holdout_origins(anchors, cs, split, 12, 100)
    assert len(ho) > 5 and (ho.origin_ms >= split.holdout_ms).all() and (ho.end_bar + 12 < 1600).all()
    # Encoding only the hold-out origins' windows gives the same hold-out origins.
    late = holdout_origins(build_anchors(model, cs, flow, (1, 4, 12), from_ms=split.holdout_ms), cs, split, 12, 100)
    for name in ("latent", "vol", "scale", "returns", "end_bar"):
        torch.testing.assert_close(getattr(late, name), getattr(ho, name), rtol=0, atol=0, equal_nan=True)
    # Replacing every bar after an origin changes none of its context (latent, vol features, scale).
    k = 40
    cut = int(anchors.end_bar[k])
    changed = s.ohlcv.clone()
    changed[cut + 1 :, :4] *= 1.5
    s2 = type(s)(s.name, changed, s.open_time_ms)
    again = build_anchors(model, coded(s2), flow, (1, 4, 12))
    for name in ("latent", "vol", "scale"):
        torch.testing.assert_close(getattr(again, name)[: k + 1], getattr(anchors, name)[: k + 1], rtol=0, atol=0)
    # The sampler gives [M, N, max(h)] finite paths, scaled by each origin's trailing volatility.
    fm = FutureModel(flow, 8, 2, 8)
    fm.fit_standardisation(tr.latent)
    fc = ForecastConfig(horizons=(1, 4, 12), n_futures=6, ode_steps=2, batch_origins=4)
    paths = sample_paths(fm, ho.select(torch.arange(5)), fc, torch.Generator().manual_seed(0),
                         np.random.default_rng(0))
    assert paths.shape == (5, 6, 12) and np.isfinite(paths).all()


def test_bad_forecast_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"forecast.*horizons=\[4, 4\] must be increasing"):
        load_data({"size": "tiny", "forecast": {"horizons": [4, 4]}}, CONFIG_MODEL)
    with pytest.raises(ConfigError, match=r"flow\.coupling"):
        load_data({"size": "tiny", "flow": {"coupling": "sinkhorn"}}, CONFIG_MODEL)


@settings(max_examples=60, deadline=None)
@given(horizons=st.lists(st.integers(-3, 300), max_size=5), n=st.integers(-5, 500), steps=st.integers(-2, 64),
       sampler=st.sampled_from(["euler", "midpoint", "rk4", "heun", ""]), cw=st.floats(-2, 1e6) | st.just(float("nan")),
       reg=st.floats(-1, 10) | st.just(float("inf")))
def test_forecast_and_flow_config_fuzz(horizons, n, steps, sampler, cw, reg) -> None:
    data = {"size": "tiny", "forecast": {"horizons": horizons, "n_futures": n, "ode_steps": steps, "sampler": sampler},
            "flow": {"cond_weight": cw, "sinkhorn_reg": reg}}
    try:
        cfg = load_data(data, CONFIG_MODEL)
    except ConfigError as exc:
        assert str(exc).startswith("<config>: forecast") or str(exc).startswith("<config>: flow")
        return
    assert list(cfg.forecast.horizons) == sorted(set(horizons)) and cfg.forecast.n_futures >= 2
    assert cfg.flow.cond_weight >= 0 and cfg.flow.sinkhorn_reg > 0
