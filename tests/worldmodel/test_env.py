"""The Strate IV trading environment: gymnasium's checker, cost arithmetic by hand, funding alignment, no future
leak, the vectorised realisation against the steps, and a fuzz of actions."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.core.errors import DataError
from cambium.worldmodel.config import EnvConfig
from cambium.worldmodel.env import TradingEnv, funding_per_bar, read_funding, realise

REPO = Path(__file__).resolve().parents[2]
HOUR = 3_600_000


def candles(t: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, t)))
    open_ = np.concatenate([[100.0], close[:-1]])
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.01, t))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.01, t))
    return np.stack([open_, high, low, close], axis=1)


def make_env(t: int = 50, f: int = 3, cfg: EnvConfig | None = None, seed: int = 0, **kw) -> TradingEnv:
    rng = np.random.default_rng(seed + 1)
    return TradingEnv(candles(t, seed), rng.normal(0, 1e-4, t), rng.normal(size=(t, f)), cfg or EnvConfig(), **kw)


def test_gymnasium_env_checker() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker's warnings (dtype, bounds, determinism) count as failures
        check_env(make_env(), skip_render_check=True)
    check_env(make_env(segment_lengths=[20, 30]), skip_render_check=True)


def test_costs_funding_and_returns_against_a_hand_computation() -> None:
    ohlc = np.array([[100, 102, 98, 100], [100, 106, 99, 105], [105, 105, 100, 102], [102, 103, 101, 103]],
                    dtype=np.float64)
    funding = np.array([0.0, 0.001, 0.0, -0.002])
    cfg = EnvConfig(taker_fee=0.0005, slippage="range", range_fraction=0.1, reward_scale=10.0)
    env = TradingEnv(ohlc, funding, np.zeros((4, 2)), cfg)
    env.reset(options={"segment": 0, "start": 0, "full": True})
    # bar 0 -> 1: go long 1 from flat: price +5 %, funding 0.001 paid by the long, cost 1 · (0.0005 + 0.1 · 4/100)
    _, reward, _, _, info = env.step(np.array([1.0], np.float32))
    want = 0.05 - 0.001 - (0.0005 + 0.1 * 0.04)
    assert info["return"] == pytest.approx(want, abs=1e-12) and reward == pytest.approx(10 * want, abs=1e-11)
    # bar 1 -> 2: flip to −0.5 (trade 1.5) at bar 1's range 7/105; price −3/105, no funding
    _, _, _, _, info = env.step(np.array([-0.5], np.float32))
    want2 = -0.5 * (102 / 105 - 1) - 1.5 * (0.0005 + 0.1 * 7 / 105)
    assert info["return"] == pytest.approx(want2, abs=1e-12)
    # bar 2 -> 3: a target of −3 is clipped to −1 (trade 0.5); the short receives the negative funding's payment
    obs, _, term, trunc, info = env.step(np.array([-3.0], np.float32))
    want3 = -1 * (103 / 102 - 1) - (-1) * (-0.002) - 0.5 * (0.0005 + 0.1 * 5 / 102)
    assert info["position"] == -1.0 and info["return"] == pytest.approx(want3, abs=1e-12)
    assert obs[-1] == -1.0 and trunc and not term
    np.testing.assert_allclose(realise(ohlc, funding, np.array([1.0, -0.5, -1.0]), cfg), [want, want2, want3],
                               atol=1e-12)
    maker = EnvConfig(order_type="maker", maker_fee=0.0002, slippage="spread", half_spread_bps=2.0)
    np.testing.assert_allclose(realise(ohlc, funding, np.array([1.0, 1.0, 1.0]), maker)[0],
                               0.05 - 0.001 - (0.0002 + 2e-4), atol=1e-12)


def test_realise_equals_the_environment_steps() -> None:
    env = make_env(t=40, cfg=EnvConfig(slippage="range", range_fraction=0.3))
    rng = np.random.default_rng(3)
    positions = rng.uniform(-1, 1, 39)
    env.reset(options={"segment": 0, "start": 0, "full": True})
    got = [env.step(np.array([p]))[4]["return"] for p in positions]
    np.testing.assert_allclose(got, realise(env.ohlc, env.funding, positions, env.cfg), atol=1e-13)


def test_a_sampled_future_in_hand_changes_no_reward() -> None:
    """Features built from a sampled future (or anything else) move the observations, never the rewards: the
    environment realises its own real closes."""
    t = 60
    ohlc = candles(t, seed=5)
    funding = np.zeros(t)
    rng = np.random.default_rng(9)
    sampled_future = np.exp(np.cumsum(rng.normal(0, 0.05, (t, 4)), axis=0))  # a generated path per bar
    other_future = -sampled_future
    actions = rng.uniform(-1, 1, t - 1)
    rewards = []
    for feats in (sampled_future, other_future, np.zeros((t, 4))):
        env = TradingEnv(ohlc, funding, feats, EnvConfig())
        env.reset(options={"segment": 0, "start": 0, "full": True})
        rewards.append([env.step(np.array([a]))[1] for a in actions])
    assert rewards[0] == rewards[1] == rewards[2]
    close = ohlc[:, 3]
    expect = realise(ohlc, funding, actions, EnvConfig()) * EnvConfig().reward_scale
    np.testing.assert_allclose(rewards[0], expect, atol=1e-10)
    assert np.corrcoef(actions, close[1:] / close[:-1] - 1)[0, 1] != 0  # the rewards do depend on the real prices


def test_episodes_stay_inside_their_segment() -> None:
    env = make_env(t=30, cfg=EnvConfig(episode_bars=100), segment_lengths=[10, 20])
    for seed in range(20):
        _, info = env.reset(seed=seed)
        seg, start = info["segment"], info["bar"]
        done, steps = False, 0
        while not done:
            *_, done, _ = env.step(np.array([0.5], np.float32))
            steps += 1
        assert env.t == env.ends[seg] and steps == env.ends[seg] - start
    _, info = env.reset(options={"segment": 1, "start": 0})
    assert info == {"segment": 1, "bar": 10}


def test_funding_file_alignment(tmp_path: Path) -> None:
    open_ms = np.arange(10) * HOUR + 1_000 * HOUR
    times = np.array([1_000 * HOUR + 7, 1_000 * HOUR + 8 * HOUR + 3, 1_000 * HOUR + 8 * HOUR + 5, 900 * HOUR])
    rates = np.array([0.001, 0.002, 0.0005, 0.5])
    per_bar, covered = funding_per_bar(open_ms, HOUR, np.sort(times), rates[np.argsort(times)])
    want = np.zeros(10)
    want[0], want[8] = 0.001, 0.0025  # the stamp before the first bar is charged to no bar
    np.testing.assert_allclose(per_bar, want)
    assert covered.all()
    _, none = funding_per_bar(open_ms, HOUR, None, None)
    assert not none.any()
    path = tmp_path / "X.csv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("timestamp,symbol,funding_rate\n20,X,0.1\n10,X,-0.2\n")
    t, r = read_funding(path)
    assert t.tolist() == [10, 20] and r.tolist() == [-0.2, 0.1]
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt") as fh:
        fh.write("time,rate\n1,2\n")
    with pytest.raises(DataError, match=r"bad\.csv\.gz: not a funding-rate history"):
        read_funding(bad)
    t, r = read_funding(REPO / "data/samples/market/funding_futures/BTCUSDT.csv.gz")
    assert len(t) > 100 and np.all(np.diff(t) > 0) and np.abs(r).max() < 0.01


def test_bad_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="ohlc has shape"):
        TradingEnv(np.ones((5, 3)), np.zeros(5), np.zeros((5, 1)), EnvConfig())
    with pytest.raises(ValueError, match="finite and > 0"):
        TradingEnv(np.zeros((5, 4)), np.zeros(5), np.zeros((5, 1)), EnvConfig())
    with pytest.raises(ValueError, match="features must be finite"):
        TradingEnv(np.ones((5, 4)), np.zeros(5), np.full((5, 1), np.nan), EnvConfig())
    with pytest.raises(ValueError, match="segment_lengths"):
        TradingEnv(np.ones((5, 4)), np.zeros(5), np.zeros((5, 1)), EnvConfig(), segment_lengths=[4, 1])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                          st.lists(st.floats(-2, 2), min_size=0, max_size=3)), min_size=1, max_size=40))
def test_fuzz_actions_are_clipped_or_refused_in_one_line(actions: list) -> None:
    env = make_env(t=20)
    env.reset(seed=0, options={"segment": 0, "start": 0, "full": True})
    for a in actions:
        arr = np.asarray(a, dtype=np.float32).reshape(-1) if not isinstance(a, list) else np.asarray(a, np.float32)
        if env.t >= env.stop:
            env.reset(options={"segment": 0, "start": 0, "full": True})
        ok_shape = arr.shape == (1,)
        if not ok_shape or not np.isfinite(arr).all():
            with pytest.raises(ValueError, match="action"):
                env.step(arr)
            continue
        obs, reward, _, _, info = env.step(arr)
        assert -1.0 <= info["position"] <= 1.0 and info["position"] == float(np.clip(arr[0], -1, 1))
        assert np.isfinite(reward) and env.observation_space.contains(obs)
