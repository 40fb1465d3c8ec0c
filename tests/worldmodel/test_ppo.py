"""PPO on the trading environment: it learns a task with a known answer, and its weights round-trip (that a retrain
from the same seed acts the same is tested by test_agents_pipeline's resume)."""

from __future__ import annotations

import numpy as np
import torch

from cambium.worldmodel.backtest import rollout
from cambium.worldmodel.config import EnvConfig, PPOConfig
from cambium.worldmodel.env import TradingEnv
from cambium.worldmodel.ppo import PPOAgent, train_ppo

CFG = PPOConfig(steps=2048, n_steps=256, batch_size=64, hidden=(32,))


def leaky_env() -> TradingEnv:
    """A feature that is the sign of the next bar's return (a leak on purpose): the best policy follows it."""
    t = 1500
    rng = np.random.default_rng(0)
    r = rng.normal(0, 0.01, t)
    close = 100 * np.exp(np.cumsum(r))
    ohlc = np.stack([close, close * 1.001, close * 0.999, close], axis=1)
    nxt = np.sign(np.concatenate([np.diff(np.log(close)), [0.0]]))
    feats = np.stack([nxt, rng.normal(size=t)], axis=1)
    return TradingEnv(ohlc, np.zeros(t), feats, EnvConfig(taker_fee=0.0, slippage="none", episode_bars=150))


def test_ppo_learns_a_known_task_and_round_trips() -> None:
    torch.set_num_threads(1)
    agent, figures = train_ppo(leaky_env, CFG, seed=3)
    assert figures["steps"] == 2048
    env = leaky_env()
    pos, ret = rollout(env, agent, 0)
    assert np.corrcoef(pos, env.features[:-1, 0])[0, 1] > 0.8 and ret.sum() > 0
    loaded = PPOAgent.from_state_dict(agent.state_dict(), env, CFG)
    np.testing.assert_array_equal(rollout(env, loaded, 0)[0], pos)
    obs = env.reset(options={"segment": 0, "start": 5})[0]
    a = agent.act(obs)
    assert a.shape == (1,) and -1 <= a[0] <= 1 and np.array_equal(agent.act(obs), a)
