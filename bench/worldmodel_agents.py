"""Strate IV environment throughput: the trading environment stepped alone against the same environment inside
stable-baselines3's PPO rollout collection (policy forward, buffer writes, the vectorised-env wrapper).

Run: `python -m bench.worldmodel_agents [--quick] [--threads N]`. Shape: the cpu-long agents' observation (64 latent
dims + 2 volatility + 3 Multiverse + 2 per-bar features + the position = 72 values), 20,000 bars of synthetic candles
(real-candle arithmetic is the same), decisions every 1 and every 16 bars, PPO's MLP 64 × 64 on the CPU. Metric:
environment steps per second (best of interleaved rounds, bench/common.py); the record's value is the rate inside
PPO's rollout and its reference the environment alone, so the ratio (< 1) is the share of a rollout's time that the
environment itself leaves to the rest. PPO's gradient updates are not timed (rollout collection only).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from bench.common import interleaved_best, machine, make_record, parse_args, write_results
from cambium.worldmodel.config import EnvConfig, PPOConfig
from cambium.worldmodel.env import TradingEnv
from cambium.worldmodel.ppo import make_ppo

FEATURES, BARS = 71, 20_000


def make_env(decision_bars: int) -> TradingEnv:
    rng = np.random.default_rng(0)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, BARS)))
    ohlc = np.stack([close, close * 1.002, close * 0.998, close], axis=1)
    feats = rng.normal(size=(BARS, FEATURES)).astype(np.float32)
    return TradingEnv(ohlc, rng.normal(0, 1e-4, BARS), feats, EnvConfig(decision_bars=decision_bars,
                                                                          episode_bars=2880))


class _RolloutClock(BaseCallback):
    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._t0 = 0.0

    def _on_rollout_start(self) -> None:
        self._t0 = time.perf_counter()

    def _on_rollout_end(self) -> None:
        self.seconds.append(time.perf_counter() - self._t0)

    def _on_step(self) -> bool:
        return True


def run_case(decision_bars: int, steps: int, rounds: int, facts: dict[str, Any]) -> list[dict[str, Any]]:
    env = make_env(decision_bars)
    actions = np.random.default_rng(1).uniform(-1, 1, (steps, 1)).astype(np.float32)

    def alone() -> None:
        env.reset(seed=0)
        for a in actions:
            *_, done, _ = env.step(a)
            if done:
                env.reset()

    cfg = PPOConfig(steps=steps, n_steps=steps, batch_size=steps, n_epochs=1)
    from stable_baselines3.common.vec_env import DummyVecEnv

    model = make_ppo(DummyVecEnv([lambda: make_env(decision_bars)]), cfg, seed=0)
    clock = _RolloutClock()

    def inside_ppo() -> None:
        model.learn(total_timesteps=steps, callback=clock, reset_num_timesteps=True)

    best = interleaved_best({"alone": alone, "ppo": inside_ppo}, rounds)
    rollout_s = min(clock.seconds)  # the rollout part of the best `learn` (its update is not timed)
    case = f"decision_bars={decision_bars} obs={FEATURES + 1} steps={steps}"
    return [make_record(case, "env steps/s inside SB3 PPO rollout", steps / rollout_s, "steps/s",
                        "the environment stepped alone", steps / best["alone"], higher_is_better=True,
                        machine_facts=facts)]


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (PPO's policy forward)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, _extra)
    torch.set_num_threads(args.threads)
    steps, rounds = (512, 2) if args.quick else (4096, 4)
    facts = machine()
    records = []
    for k in (1, 16):
        records += run_case(k, steps, rounds, facts)
    path = write_results("worldmodel_agents", records, args.results_dir)
    print(f"wrote {path} (load average {facts['load_avg_1m']} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
