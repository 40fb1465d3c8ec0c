"""TD-MPC2 and its MPPI planner: the vectorised planner against the per-sample loop reference, the CVaR objective and a
known quadratic optimum on hand-built models, the quantile loss, the replay buffer, and a learning test on a small
tracking task with a known optimum."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from cambium.core.config import load_data
from cambium.core.errors import ConfigError
from cambium.worldmodel.mppi import PlannerConfig, cvar, draw_noise, mppi_plan, mppi_plan_reference
from cambium.worldmodel.tdmpc import (
    ReplayBuffer,
    TDMPC2Agent,
    TDMPCConfig,
    TDMPCModel,
    mish,
    quantile_huber_loss,
    train_tdmpc,
)

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = PlannerConfig(horizon=3, iterations=3, samples=24, elites=5, policy_trajectories=4, cvar_alpha=0.5)


def _model(seed: int, obs_dim: int = 3, action_dim: int = 2, **kw: Any) -> TDMPCModel:
    torch.manual_seed(seed)
    cfg = TDMPCConfig(latent_dim=16, hidden_dim=32, quantiles=6, critics=3, planner=SMALL, **kw)
    model = TDMPCModel(cfg, obs_dim, action_dim).eval()
    with torch.no_grad():  # the zero-initialised heads would make every sequence equal
        model.critic.out.weight.normal_(0, 0.5)
        model.reward_head[-1].weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("explore", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_mppi_matches_the_loop_reference(seed: int, explore: bool) -> None:
    model = _model(seed)
    z = model.encode(torch.randn(1, 3, generator=torch.Generator().manual_seed(seed)))
    cfg = SMALL.model_copy(update={"iterations": 2, "samples": 12, "elites": 3, "policy_trajectories": 3})
    noise = draw_noise(cfg, 2, 3, torch.Generator().manual_seed(seed + 10))
    fast = mppi_plan(model, z, cfg, noise, discount=0.9, explore=explore)
    slow = mppi_plan_reference(model, z, cfg, noise, discount=0.9, explore=explore)
    assert fast.shape == (2,)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


class _HandModel:
    """A hand-built latent model: z' = z + a, reward r(z, a), terminal atoms from z; policy prior 0."""

    def __init__(self, reward: Any, atoms: Any, k: int = 10) -> None:
        self._reward, self._atoms, self.k = reward, atoms, k

    def next(self, z: Tensor, a: Tensor) -> Tensor:
        return z + a

    def reward(self, z: Tensor, a: Tensor) -> Tensor:
        return self._reward(z, a)

    def pi(self, z: Tensor, eps: Tensor | None) -> Tensor:
        return torch.zeros(z.shape[0], 1)

    def quantiles(self, z: Tensor, a: Tensor, members: Tensor | None = None) -> Tensor:
        atoms = self._atoms(z)[None].expand(2, -1, -1)
        return atoms if members is None else atoms[members]


def test_cvar_objective_prefers_the_better_tail() -> None:
    """Position z_1 = a: a long position earns more on average (mean atom 0.2·a) but loses 8·a in its worst atom; a
    short one has a mild tail. The mean objective goes long, CVaR at the 10 % tail stays flat."""
    base = torch.tensor([-8.0] + [1.0] * 9)
    model = _HandModel(lambda z, a: torch.zeros(z.shape[0]), lambda z: z * base)
    plan = PlannerConfig(horizon=1, iterations=8, samples=256, elites=32, policy_trajectories=0, temperature=5.0)
    z = torch.zeros(1, 1)
    picks = {}
    for alpha in (1.0, 0.1):
        cfg = plan.model_copy(update={"cvar_alpha": alpha})
        picks[alpha] = float(mppi_plan(model, z, cfg, draw_noise(cfg, 1, 2, torch.Generator().manual_seed(0)),
                                       discount=0.9)[0])
    assert picks[1.0] > 0.9
    assert abs(picks[0.1]) < 0.1
    atoms = torch.tensor([[3.0, -1.0, 2.0, 0.0]])
    torch.testing.assert_close(cvar(atoms, 0.5), torch.tensor([-0.5]))
    torch.testing.assert_close(cvar(atoms, 1.0), torch.tensor([1.0]))
    torch.testing.assert_close(cvar(atoms, 0.01), torch.tensor([-1.0]))


def test_mppi_converges_to_the_optimum_of_a_quadratic_model() -> None:
    target = torch.tensor([0.3, -0.6, 0.1])  # the best action at each of the 3 steps
    step = {"t": 0}

    def reward(z: Tensor, a: Tensor) -> Tensor:
        # the latent carries the step index in its second column: z = (position, step)
        t = z[:, 1].round().long().clamp(0, 2)
        return -(a[:, 0] - target[t]) ** 2

    class Quadratic(_HandModel):
        def next(self, z: Tensor, a: Tensor) -> Tensor:
            return torch.stack([z[:, 0] + a[:, 0], z[:, 1] + 1], dim=1)

        def pi(self, z: Tensor, eps: Tensor | None) -> Tensor:
            return torch.zeros(z.shape[0], 1)

    model = Quadratic(reward, lambda z: torch.zeros(z.shape[0], 4))
    cfg = PlannerConfig(horizon=3, iterations=12, samples=512, elites=64, policy_trajectories=0, min_std=0.01)
    a = mppi_plan(model, torch.zeros(1, 2), cfg, draw_noise(cfg, 1, 2, torch.Generator().manual_seed(step["t"])),
                  discount=1.0)
    assert abs(float(a[0]) - 0.3) < 0.02


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), horizon=st.integers(1, 4), samples=st.integers(4, 40),
       explore=st.booleans(), scale=st.sampled_from([1.0, 1e6, float("inf")]))
def test_planner_actions_stay_in_bounds(seed: int, horizon: int, samples: int, explore: bool, scale: float) -> None:
    cfg = PlannerConfig(horizon=horizon, iterations=2, samples=samples, elites=min(4, samples),
                        policy_trajectories=samples // 4, max_std=2.0)
    model = _model(seed % 1000)
    with torch.no_grad():
        model.critic.out.weight.mul_(scale)  # huge or infinite values must not push the action out of [-1, 1]
    z = model.encode(torch.randn(1, 3, generator=torch.Generator().manual_seed(seed)))
    a = mppi_plan(model, z, cfg, draw_noise(cfg, 2, 3, torch.Generator().manual_seed(seed)), discount=0.95,
                  explore=explore)
    assert a.shape == (2,) and bool(torch.isfinite(a).all()) and bool((a.abs() <= 1).all())


def test_quantile_huber_loss_matches_a_loop_and_recovers_quantiles() -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, generator=gen), torch.randn(3, 7, generator=gen) * 2
    expected = torch.zeros(3)
    for b in range(3):
        for i in range(5):
            tau = (i + 0.5) / 5
            for j in range(7):
                u = float(target[b, j] - pred[b, i])
                h = 0.5 * u * u if abs(u) <= 1 else abs(u) - 0.5
                expected[b] += abs(tau - (u < 0)) * h / 7
    torch.testing.assert_close(quantile_huber_loss(pred, target), expected)
    # fitted to a sample with a small Huber threshold, the atoms approach the sample's quantiles at levels (2i+1)/2K
    sample = torch.randn(1, 4000, generator=gen) * 3
    atoms = torch.zeros(1, 4, requires_grad=True)
    opt = torch.optim.Adam([atoms], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        quantile_huber_loss(atoms, sample, kappa=0.01).sum().backward()
        opt.step()
    levels = torch.tensor([0.125, 0.375, 0.625, 0.875])
    torch.testing.assert_close(atoms.detach()[0], torch.quantile(sample[0], levels), atol=0.15, rtol=0)


def test_planning_mish_equals_torch_mish() -> None:
    x = torch.cat([torch.linspace(-60, 60, 20001), torch.tensor([0.0, 19.999, 20.0, 20.001, -1e4, 1e4])])
    with torch.no_grad():
        fast = mish(x)
    torch.testing.assert_close(fast, torch.nn.functional.mish(x), atol=2e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(mish(x.double()), torch.nn.functional.mish(x.double()), atol=1e-12, rtol=1e-12)
    y = x.clone().requires_grad_(True)
    mish(y).sum().backward()  # with autograd: torch's own Mish and its gradient
    assert y.grad is not None and torch.isfinite(y.grad).all()


def test_replay_sub_trajectories_stay_inside_one_episode_across_the_ring() -> None:
    buf = ReplayBuffer(10, 1, 1)
    step = 0
    for episode, length in enumerate([4, 2, 6, 5]):  # 17 transitions into a ring of 10
        for _ in range(length):
            buf.add(np.array([step], np.float32), np.zeros(1, np.float32), float(step),
                    np.array([step + 1], np.float32), False, episode)
            step += 1
    obs, action, reward, _ = buf.sample(200, 3, np.random.default_rng(0))
    assert obs.shape == (4, 200, 1) and action.shape == (3, 200, 1) and reward.shape == (3, 200)
    # consecutive steps: obs_t = step, reward_t = step, one episode (steps 7…11 of episode 2 or 12…16 of 3)
    torch.testing.assert_close(obs[1:, :, 0] - obs[:-1, :, 0], torch.ones(3, 200))
    torch.testing.assert_close(reward, obs[:-1, :, 0])
    firsts = set(obs[0, :, 0].int().tolist())
    assert firsts <= {7, 8, 9, 12, 13, 14} and len(firsts) >= 5
    with pytest.raises(ConfigError, match="episodes must be longer"):
        buf.sample(4, 7, np.random.default_rng(0))


class Track(gym.Env[np.ndarray, np.ndarray]):
    """Move a point toward a target: x' = clip(x + a/2, −2, 2), reward −|x' − g|, observation (x, g), 16 steps.
    Going to the target at full speed and staying is optimal (`optimal_action`)."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.x = self.g = 0.0
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.x, self.g = (float(v) for v in self.np_random.uniform(-1.5, 1.5, 2))
        self.t = 0
        return np.array([self.x, self.g], np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.x = float(np.clip(self.x + 0.5 * float(np.clip(action[0], -1, 1)), -2, 2))
        self.t += 1
        return np.array([self.x, self.g], np.float32), -abs(self.x - self.g), False, self.t >= 16, {}


def optimal_action(obs: np.ndarray) -> np.ndarray:
    return np.clip([(obs[1] - obs[0]) / 0.5], -1, 1).astype(np.float32)


def _mean_return(policy: Any, episodes: int = 10) -> float:
    env, total = Track(), 0.0
    for i in range(episodes):
        obs, _ = env.reset(seed=1000 + i)
        done = False
        while not done:
            obs, r, term, trunc, _ = env.step(policy(obs))
            total += r
            done = term or trunc
    return total / episodes


LEARN = TDMPCConfig(latent_dim=32, hidden_dim=64, quantiles=8, batch_size=32, seed_steps=150, lr=1e-3, discount=0.9,
                    planner=PlannerConfig(horizon=3, iterations=3, samples=64, elites=8, policy_trajectories=8,
                                          cvar_alpha=1.0))


@pytest.mark.slow
def test_tdmpc_learns_to_track_a_target() -> None:
    """400 steps (25 episodes): the agent closes most of the gap between a random policy and the optimum."""
    logs: list[dict[str, float]] = []
    agent = train_tdmpc(Track(), LEARN, seed=0, steps=400, progress=lambda step, m: logs.append(m))
    rng = np.random.default_rng(0)
    random = _mean_return(lambda o: rng.uniform(-1, 1, 1).astype(np.float32))
    best = _mean_return(optimal_action)
    got = _mean_return(agent.act)
    share = (got - random) / (best - random)
    assert share > 0.85, (got, random, best)
    losses = [m["consistency"] for m in logs if "consistency" in m]
    assert losses[-1] < losses[0]
    assert sum("episode_return" in m for m in logs) == 25
    # evaluation is deterministic, and the state dict carries the whole agent
    obs = np.array([0.5, -1.0], np.float32)
    a = agent.act(obs)
    assert a.shape == (1,) and a.dtype == np.float32 and -1 <= a[0] <= 1
    np.testing.assert_array_equal(agent.act(obs), a)
    fresh = TDMPC2Agent(LEARN, 2, 1, seed=5)
    fresh.load_state_dict(agent.state_dict())
    np.testing.assert_array_equal(fresh.act(obs), a)


def test_training_is_reproducible_and_leaves_the_global_generator_alone() -> None:
    cfg = LEARN.model_copy(update={"seed_steps": 20, "planner": SMALL.model_copy(update={"samples": 8, "elites": 2,
                                                                                       "policy_trajectories": 2})})
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    runs = []
    for _ in range(2):
        logs: list[dict[str, float]] = []
        agent = train_tdmpc(Track(), cfg, seed=3, steps=40, progress=lambda s, m, out=logs: out.append(m))
        runs.append((logs, agent.act(np.array([0.1, 0.2], np.float32))))
    assert torch.equal(torch.rand(1), before)
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 22  # 21 updates (20 at once), one episode's end
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert all(math.isfinite(v) for m in runs[0][0] for v in m.values())


def test_policy_prior_acting_without_planning() -> None:
    cfg = LEARN.model_copy(update={"mpc": False, "seed_steps": 10})
    agent = train_tdmpc(Track(), cfg, seed=0, steps=20)
    a = agent.act(np.zeros(2, np.float32))
    assert a.shape == (1,) and -1 <= a[0] <= 1
    with pytest.raises(ConfigError, match="does not have the agent's 2 values"):
        agent.act(np.zeros(3, np.float32))


def test_unsupported_environments_are_refused() -> None:
    class Discrete(Track):
        def __init__(self) -> None:
            super().__init__()
            self.action_space = gym.spaces.Discrete(3)  # type: ignore[assignment]

    class Wide(Track):
        def __init__(self) -> None:
            super().__init__()
            self.action_space = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)

    with pytest.raises(ConfigError, match="1-D Box action space"):
        train_tdmpc(Discrete(), LEARN, seed=0, steps=5)
    with pytest.raises(ConfigError, match=r"actions in \[-1, 1\]"):
        train_tdmpc(Wide(), LEARN, seed=0, steps=5)
    with pytest.raises(ConfigError, match="steps=0"):
        train_tdmpc(Track(), LEARN, seed=0, steps=0)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.just({"horizon": 0}))
_KEYS = [*TDMPCConfig.model_fields, *(f"planner.{k}" for k in PlannerConfig.model_fields), "unknown"]


@settings(max_examples=80, deadline=None)
@given(key=st.sampled_from(_KEYS), value=_VALUES, other=st.sampled_from(_KEYS), value2=_VALUES)
def test_config_fuzz_gives_one_line_errors(key: str, value: object, other: str, value2: object) -> None:
    data: dict[str, Any] = {}
    for k, v in ((key, value), (other, value2)):
        head, _, tail = k.partition(".")
        if tail:
            section = data.setdefault(head, {})
            if isinstance(section, dict):
                section[tail] = v
        else:
            data[head] = v
    try:
        cfg = load_data(data, TDMPCConfig)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert cfg.planner.elites <= cfg.planner.samples and cfg.latent_dim % cfg.simnorm_dim == 0
