"""PPO (stable-baselines3) on the Strate IV trading environment: config-driven, seeded, deterministic evaluation.

`train_ppo` trains an SB3 `PPO` with an MLP policy on `ppo.n_envs` copies of an environment (each reset from its own
seed) for `ppo.steps` environment steps; the result is a `PPOAgent`, whose `act` is the policy's mean action (no
sampling) clipped to [−1, 1] — the same observation always gives the same position. The agent's weights travel as a
safetensors state dict (`state_dict` / `PPOAgent.from_state_dict`), never as a pickle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv

from cambium.worldmodel.config import PPOConfig
from cambium.worldmodel.env import TradingEnv

__all__ = ["PPOAgent", "make_ppo", "train_ppo"]

log = logging.getLogger("cambium.worldmodel.ppo")


def make_ppo(env: DummyVecEnv, cfg: PPOConfig, seed: int) -> PPO:
    """An untrained SB3 PPO (MLP policy, CPU) on `env` with the settings of `cfg`, seeded `seed`."""
    n_steps = cfg.n_steps
    return PPO("MlpPolicy", env, learning_rate=cfg.lr, n_steps=n_steps, batch_size=min(cfg.batch_size,
               n_steps * cfg.n_envs), n_epochs=cfg.n_epochs, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda,
               clip_range=cfg.clip_range, ent_coef=cfg.ent_coef, seed=seed, device="cpu", verbose=0,
               policy_kwargs={"net_arch": list(cfg.hidden)})


class PPOAgent:
    """A trained PPO policy behind the backtest's `Policy` protocol."""

    def __init__(self, model: PPO) -> None:
        self.model = model

    def act(self, obs: np.ndarray) -> np.ndarray:
        action, _ = self.model.predict(np.asarray(obs, np.float32), deterministic=True)
        return np.clip(np.asarray(action, np.float64).reshape(1), -1.0, 1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.policy.state_dict().items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], env: TradingEnv, cfg: PPOConfig) -> PPOAgent:
        """A PPO agent for `env`'s spaces with the weights `state` (as written by `state_dict`)."""
        model = make_ppo(DummyVecEnv([lambda: env]), cfg, seed=0)
        model.policy.load_state_dict(state)
        return cls(model)


class _Progress(BaseCallback):
    def __init__(self, progress: Callable[[int, dict[str, float]], None] | None) -> None:
        super().__init__()
        self.progress = progress

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        assert isinstance(self.model, PPO)
        rewards = self.model.rollout_buffer.rewards
        values = {"rollout_reward_mean": float(np.mean(rewards))}
        log.info("ppo: %d steps, mean reward %.4f", self.num_timesteps, values["rollout_reward_mean"])
        if self.progress is not None:
            self.progress(self.num_timesteps, values)


def train_ppo(make_env: Callable[[], TradingEnv], cfg: PPOConfig, *, seed: int,
              progress: Callable[[int, dict[str, float]], None] | None = None) -> tuple[PPOAgent, dict[str, Any]]:
    """Train PPO for `cfg.steps` environment steps on `cfg.n_envs` environments from `make_env` (seeded `seed`,
    seed + 1, …). -> (the agent, training figures: steps, last rollout's mean reward)."""
    vec = DummyVecEnv([make_env for _ in range(cfg.n_envs)])
    model = make_ppo(vec, cfg, seed)
    callback = _Progress(progress)
    model.learn(total_timesteps=cfg.steps, callback=callback, progress_bar=False)
    return PPOAgent(model), {"steps": int(model.num_timesteps),
                             "rollout_reward_mean": float(np.mean(model.rollout_buffer.rewards))}
