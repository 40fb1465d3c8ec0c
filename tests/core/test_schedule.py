"""Schedules at exact points against their closed forms; the scheduler over param groups; state round-trip."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pydantic import TypeAdapter

from cambium.core.config import ConfigModel, load_data
from cambium.core.errors import ConfigError
from cambium.core.schedule import CosineSchedule, LRScheduler, Schedule, WSDSchedule

LR_MAX, LR_MIN, LR_INIT = 1e-3, 1e-5, 1e-4
W, S, D = 100, 400, 200


def wsd(shape: str, unit: str = "steps", scale: int = 1) -> WSDSchedule:
    return WSDSchedule.model_validate(dict(
        unit=unit, lr_max=LR_MAX, lr_min=LR_MIN, lr_init=LR_INIT, warmup=W * scale, stable=S * scale,
        decay=D * scale, decay_shape=shape,
    ))


SHAPES = {
    "linear": lambda p: 1 - p,
    "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1 - math.sqrt(p),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(("unit", "scale"), [("steps", 1), ("tokens", 4096)])
def test_wsd_exact_points(shape: str, unit: str, scale: int) -> None:
    s = wsd(shape, unit, scale)
    f = SHAPES[shape]
    points = {
        0: LR_INIT,
        W // 4: LR_INIT + (LR_MAX - LR_INIT) * 0.25,
        W: LR_MAX,  # end of warmup
        W + S // 2: LR_MAX,  # inside stable
        W + S: LR_MAX,  # start of decay: shape(0) = 1
        W + S + D // 4: LR_MIN + (LR_MAX - LR_MIN) * f(0.25),
        W + S + D // 2: LR_MIN + (LR_MAX - LR_MIN) * f(0.5),  # mid-decay
        W + S + D: LR_MIN,  # end
        W + S + D + 1: LR_MIN,  # after the end: the floor
        10 * (W + S + D): LR_MIN,
    }
    for x, expected in points.items():
        assert s.lr_at(x * scale) == pytest.approx(expected, rel=1e-12, abs=1e-15), (x, shape)
    assert s.total == (W + S + D) * scale
    mid = {"linear": 0.5, "cosine": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}[shape]
    assert s.lr_at((W + S + D // 2) * scale) == pytest.approx(LR_MIN + (LR_MAX - LR_MIN) * mid)
    # Continuous at every phase boundary and never below the floor.
    for edge in (W, W + S, W + S + D):
        assert abs(s.lr_at(edge * scale - 1e-6) - s.lr_at(edge * scale)) < 1e-9
    xs = torch.linspace(0, 2 * s.total, 999).tolist()
    assert min(s.lr_at(x) for x in xs) >= LR_MIN - 1e-18


def test_wsd_monotone_in_each_phase() -> None:
    s = wsd("cosine")
    lrs = [s.lr_at(x) for x in range(s.total + 10)]
    assert all(a <= b for a, b in itertools.pairwise(lrs[: W + 1]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[W:]))


def test_wsd_with_warmup_steps_in_tokens() -> None:
    s = WSDSchedule.with_warmup_steps(warmup_steps=10, tokens_per_step=512, stable_tokens=20_000,
                                      decay_tokens=10_000, lr_max=LR_MAX, lr_min=LR_MIN)
    assert (s.unit, s.warmup, s.stable, s.decay) == ("tokens", 5120, 20_000, 10_000)
    assert s.lr_at(5 * 512) == pytest.approx(LR_MAX / 2)
    assert s.lr_at(5120 + 20_000 + 5_000) == pytest.approx((LR_MAX + LR_MIN) / 2)


def test_cosine_exact_points() -> None:
    total, warm = 1000, 100
    s = CosineSchedule(lr_max=LR_MAX, lr_min=LR_MIN, warmup=warm, total=total)
    assert s.lr_at(0) == 0.0
    assert s.lr_at(50) == pytest.approx(LR_MAX / 2)
    assert s.lr_at(warm) == pytest.approx(LR_MAX)
    assert s.lr_at(550) == pytest.approx((LR_MAX + LR_MIN) / 2)
    assert s.lr_at(325) == pytest.approx(LR_MIN + (LR_MAX - LR_MIN) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s.lr_at(total) == LR_MIN
    assert s.lr_at(5 * total) == LR_MIN
    no_warmup = CosineSchedule(lr_max=LR_MAX, total=10)
    assert no_warmup.lr_at(0) == LR_MAX
    assert no_warmup.lr_at(10) == 0.0


def test_bad_schedules() -> None:
    with pytest.raises(ValueError, match=r"lr_min=0.1 must be <= lr_max=0.001"):
        WSDSchedule(lr_max=1e-3, lr_min=0.1, stable=1, decay=1)
    with pytest.raises(ValueError, match="warmup=20 must be <= total=10"):
        CosineSchedule(lr_max=1e-3, warmup=20, total=10)
    with pytest.raises(ConfigError, match="x=-1"):
        wsd("linear").lr_at(-1)


def test_schedule_from_config_by_kind() -> None:
    class Cfg(ConfigModel):
        schedule: Schedule

    cfg = load_data({"schedule": {"kind": "wsd", "unit": "tokens", "lr_max": 3e-3, "lr_min": 3e-5, "warmup": 10,
                                  "stable": 100, "decay": 50, "decay_shape": "1-sqrt"}}, Cfg)
    assert isinstance(cfg.schedule, WSDSchedule) and cfg.schedule.decay_shape == "1-sqrt"
    cfg2 = load_data({"schedule": {"kind": "cosine", "lr_max": 3e-3, "total": 100}}, Cfg)
    assert isinstance(cfg2.schedule, CosineSchedule)
    with pytest.raises(ConfigError, match="schedule"):
        load_data({"schedule": {"kind": "wsd", "lr_max": 3e-3, "stable": 1, "decay": 1, "bogus": 1}}, Cfg)
    assert TypeAdapter(Schedule).validate_python(cfg.schedule.model_dump()) == cfg.schedule


def make_optimizer() -> torch.optim.Optimizer:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    return torch.optim.AdamW([{"params": [a], "lr": LR_MAX}, {"params": [b], "lr": 0.02}])


def test_scheduler_scales_every_group_by_its_base_lr() -> None:
    s = wsd("linear")
    opt = make_optimizer()
    sched = LRScheduler(opt, s)
    assert sched.get_last_lr() == [pytest.approx(LR_INIT), pytest.approx(0.02 * LR_INIT / LR_MAX)]
    for x in (1, 50, 100, 300, 500, 600, 700, 5000):
        sched.step(x)
        expected = s.lr_at(x)
        assert sched.get_last_lr() == [pytest.approx(expected), pytest.approx(0.02 * expected / LR_MAX)]
    assert sched.get_last_lr()[0] == pytest.approx(LR_MIN)  # absolute floor for the reference group


def test_a_group_added_later_joins_the_schedule_at_its_own_base_lr() -> None:
    s = wsd("linear")
    opt = make_optimizer()
    sched = LRScheduler(opt, s, 300)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4))], "lr": 0.5})  # e.g. a grown module
    sched.step(600)
    expected = s.lr_at(600)
    assert sched.get_last_lr() == [pytest.approx(expected), pytest.approx(0.02 * expected / LR_MAX),
                                   pytest.approx(0.5 * expected / LR_MAX)]
    assert sched.base_lrs == [LR_MAX, 0.02, 0.5]


def test_scheduler_step_without_position_and_tokens_unit() -> None:
    opt = make_optimizer()
    sched = LRScheduler(opt, wsd("linear"))
    for _ in range(W // 2):
        sched.step()
    assert sched.position == W // 2
    assert opt.param_groups[0]["lr"] == pytest.approx(wsd("linear").lr_at(W // 2))
    token_sched = LRScheduler(make_optimizer(), wsd("linear", "tokens", 100))
    with pytest.raises(ConfigError, match="tokens"):
        token_sched.step()


def test_scheduler_state_roundtrip() -> None:
    opt = make_optimizer()
    sched = LRScheduler(opt, wsd("cosine"))
    sched.step(550)
    state = sched.state_dict()
    fresh_opt = make_optimizer()
    fresh = LRScheduler(fresh_opt, wsd("cosine"))
    fresh.load_state_dict(state)
    assert fresh.get_last_lr() == sched.get_last_lr()
    fresh.step(560)
    sched.step(560)
    assert fresh.get_last_lr() == sched.get_last_lr()
    # Base lrs come from the state, not from whatever lr the fresh optimizer had.
    other = make_optimizer()
    other.param_groups[0]["lr"] = 123.0
    again = LRScheduler(other, wsd("cosine"))
    again.load_state_dict(state)
    assert again.get_last_lr() == [pytest.approx(x) for x in LRScheduler(make_optimizer(), wsd("cosine"),
                                                                          550).get_last_lr()]
