"""The hold-out backtest: stationary bootstrap against its loop reference and known processes, performance figures by
hand, baselines, the bias check, rollouts with Multiverse scaling and multi-bar decisions."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.worldmodel.test_env import candles

from cambium.core.config import load_data
from cambium.core.errors import ConfigError, DataError
from cambium.worldmodel.backtest import (
    SegmentData,
    bias_check,
    bootstrap_sharpe,
    momentum_positions,
    performance,
    portfolio,
    random_positions,
    rollout,
    run_backtest,
    sharpe,
    stationary_draws,
    stationary_indices,
    stationary_indices_reference,
)
from cambium.worldmodel.config import CONFIG_MODEL, BacktestConfig, EnvConfig
from cambium.worldmodel.env import TradingEnv, read_funding, realise


@pytest.mark.parametrize(("n", "block"), [(1, 3.0), (7, 1.0), (50, 5.0), (200, 40.0)])
def test_stationary_indices_equal_the_loop_reference(n: int, block: float) -> None:
    starts, new = stationary_draws(n, 30, block, np.random.default_rng(n))
    fast = stationary_indices(starts, new)
    np.testing.assert_array_equal(fast, stationary_indices_reference(starts, new))
    assert fast.min() >= 0 and fast.max() < n


def test_stationary_blocks_have_the_configured_mean_length() -> None:
    _, new = stationary_draws(5000, 20, 25.0, np.random.default_rng(0))
    blocks = new.sum() / new.size
    assert 1 / blocks == pytest.approx(25.0, rel=0.05)


def _bootstrap_means(x: np.ndarray, block: float, samples: int, seed: int) -> np.ndarray:
    idx = stationary_indices(*stationary_draws(len(x), samples, block, np.random.default_rng(seed)))
    return x[idx].mean(axis=1)


def test_bootstrap_mean_and_variance_on_known_processes() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    iid = rng.normal(0.1, 1.0, n)
    m = _bootstrap_means(iid, 1.0, 2000, 2)  # block 1 = the iid bootstrap
    assert m.mean() == pytest.approx(iid.mean(), abs=0.01)
    assert m.var() == pytest.approx(iid.var() / n, rel=0.15)
    # AR(1) with φ = 0.8 and unit innovations: the mean's variance is the long-run variance σ²/(1 − φ)² over n;
    # blocks of 50 recover it, blocks of 1 only the marginal variance σ²/(1 − φ²) over n (a seventh of it).
    phi, e = 0.8, rng.normal(size=n)
    ar = np.zeros(n)
    for t in range(1, n):
        ar[t] = phi * ar[t - 1] + e[t]
    long_run = 1.0 / (1 - phi) ** 2 / n
    blocky = _bootstrap_means(ar, 50.0, 2000, 3).var()
    naive = _bootstrap_means(ar, 1.0, 2000, 4).var()
    assert naive < 0.4 * long_run
    assert 0.6 * long_run < blocky < 1.4 * long_run


def test_bootstrap_sharpe_interval_covers_and_pairs() -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(0.001, 0.01, 3000)
    b = a + rng.normal(0.0, 0.001, 3000)  # nearly the same series: the paired difference interval is narrow
    cfg = BacktestConfig(bootstrap_samples=300, block_bars=20.0, confidence=0.9)
    out = bootstrap_sharpe({"a": a, "b": b}, cfg, 8760.0, np.random.default_rng(0), pairs=[("a", "b")])
    sa = float(sharpe(a, 8760.0))
    assert out["sharpe"]["a"]["low"] < sa < out["sharpe"]["a"]["high"]
    width_a = out["sharpe"]["a"]["high"] - out["sharpe"]["a"]["low"]
    d = out["difference"]["a - b"]
    assert d["high"] - d["low"] < 0.2 * width_a


def test_performance_figures_by_hand() -> None:
    r = np.array([0.1, -0.2, 0.05, 0.0])
    f = performance(r, 4.0, turnover=3.0)
    assert f["sharpe"] == pytest.approx(r.mean() / r.std(ddof=1) * 2.0)
    assert f["sortino"] == pytest.approx(r.mean() / np.sqrt(0.04 / 4) * 2.0)
    # equity 1.1, 0.88, 0.924, 0.924: drawdown from the 1.1 peak to 0.88
    assert f["max_drawdown"] == pytest.approx(0.2)
    assert f["total_return"] == pytest.approx(1.1 * 0.8 * 1.05 - 1)
    assert sharpe(np.zeros(5), 4.0) == 0.0


def test_baselines_and_portfolio() -> None:
    close = np.array([10, 11, 12, 11, 10, 9, 10.0])
    np.testing.assert_array_equal(momentum_positions(close, 2), [0, 0, 1, 0, -1, -1])  # 12/10, 11/11, 10/12, 9/11
    p = random_positions(10, 4, np.random.default_rng(0))
    assert len(p) == 10 and len(set(p[:4])) == 1 and p[0] != p[4] and np.abs(p).max() <= 1
    t, r = portfolio([np.array([1, 2, 3]), np.array([2, 3])], [np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0])])
    assert t.tolist() == [1, 2, 3] and r.tolist() == [1.0, 3.0, 4.0]


def test_bias_check_flags_mirrors_and_one_sided_policies() -> None:
    rng = np.random.default_rng(2)
    market = rng.normal(0, 0.01, 1000)
    cfg = BacktestConfig()
    mirror = bias_check(0.5 * market + rng.normal(0, 0.0005, 1000), market, np.full(1000, 0.5), cfg)
    assert "mirrors buy-and-hold" in mirror["flags"] and "always long" in mirror["flags"]
    assert mirror["beta"] == pytest.approx(0.5, abs=0.02)
    short = bias_check(-market, market, -np.ones(1000), cfg)
    assert "always short" in short["flags"] and "mirrors short buy-and-hold" in short["flags"]
    assert short["beta"] == pytest.approx(-1.0)
    mixed = np.where(rng.random(1000) < 0.5, 1.0, -1.0)
    ok = bias_check(mixed * market, market, mixed, cfg)
    assert ok["flags"] == [] and abs(ok["corr"]) < 0.2


class _Sign:
    """A policy that goes long when its first feature is positive."""

    def act(self, obs: np.ndarray) -> np.ndarray:
        return np.array([1.0 if obs[0] > 0 else -0.5])


def test_rollout_scaling_and_multi_bar_decisions_match_realise() -> None:
    t = 41
    ohlc = candles(t, seed=3)
    rng = np.random.default_rng(4)
    feats, funding = rng.normal(size=(t, 2)), rng.normal(0, 1e-4, t)
    scale = rng.uniform(0, 1, t)
    for k in (1, 3, 7):
        cfg = EnvConfig(decision_bars=k)
        env = TradingEnv(ohlc, funding, feats, cfg)
        pos, ret = rollout(env, _Sign(), 0, scale=scale)
        decided = np.arange(t - 1) // k * k  # the bar each bar's position was decided at
        want = np.where(feats[decided, 0] > 0, 1.0, -0.5) * scale[decided]
        np.testing.assert_allclose(pos, want)
        np.testing.assert_allclose(ret, realise(ohlc, funding, want, cfg), atol=1e-13)


def test_run_backtest_pools_every_policy() -> None:
    segs = []
    for i, t in enumerate((60, 45)):
        rng = np.random.default_rng(i)
        segs.append(SegmentData(f"S{i}", candles(t, seed=i), np.zeros(t), rng.normal(size=(t, 2)).astype(np.float32),
                                1_000 + np.arange(t) * 10, rng.uniform(0.5, 1, t)))
    cfg = BacktestConfig(bootstrap_samples=20, block_bars=5.0, momentum_bars=5, random_hold_bars=3)
    res = run_backtest(segs, {"sign": _Sign()}, EnvConfig(), cfg, 8760.0, np.random.default_rng(0), scaling=True)
    names = {"sign", "sign (no Multiverse scaling)", "buy_and_hold", "momentum", "random"}
    assert set(res.figures["policies"]) == names == set(res.returns)
    assert len(res.times) == 59 and res.positions["sign"].shape == (59 + 44,)
    assert set(res.figures["bootstrap"]["difference"]) == {f"sign - {n}" for n in names - {"sign"}}
    bh = res.figures["policies"]["buy_and_hold"]
    assert bh["bias"]["flags"] == ["mirrors buy-and-hold", "always long"]
    assert abs(res.positions["sign"]).max() < abs(res.positions["sign (no Multiverse scaling)"]).max() + 1e-12


@settings(max_examples=60, deadline=None)
@given(fee=st.floats(-1, 1) | st.just(float("nan")), slip=st.sampled_from(["range", "spread", "none", "book", ""]),
       bars=st.integers(-3, 100), missing=st.sampled_from(["zero", "refuse", "skip"]),
       kinds=st.lists(st.sampled_from(["ppo", "tdmpc", "dqn"]), max_size=3), block=st.floats(-5, 500),
       conf=st.floats(-1, 2), hidden=st.lists(st.integers(-2, 64), max_size=3))
def test_agent_sections_config_fuzz(fee, slip, bars, missing, kinds, block, conf, hidden) -> None:
    data = {"size": "tiny", "env": {"taker_fee": fee, "slippage": slip, "decision_bars": bars,
                                    "missing_funding": missing},
            "agents": {"kinds": kinds}, "backtest": {"block_bars": block, "confidence": conf},
            "ppo": {"hidden": hidden}}
    try:
        cfg = load_data(data, CONFIG_MODEL)
    except ConfigError as exc:
        assert str(exc).startswith(("<config>: env", "<config>: agents", "<config>: backtest", "<config>: ppo"))
        return
    assert 0 <= cfg.env.taker_fee < 0.1 and cfg.env.decision_bars >= 1 and cfg.backtest.block_bars >= 1
    assert cfg.agents.kinds and 0 < cfg.backtest.confidence < 1 and min(cfg.ppo.hidden) >= 1


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=300), gz=st.booleans())
def test_funding_file_fuzz(tmp_path_factory, body: bytes, gz: bool) -> None:
    path = tmp_path_factory.mktemp("fund") / "X.csv.gz"
    path.write_bytes(gzip.compress(b"funding_time,funding_rate\n" + body) if gz else body)
    try:
        t, r = read_funding(path)
    except DataError as exc:
        assert str(exc).startswith(str(path))
        return
    assert len(t) == len(r) and np.isfinite(r).all() and np.all(np.diff(t) >= 0)
