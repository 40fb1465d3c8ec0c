"""The Continuous Memory System: the conductor's pulses, k = 1 is the plain memory bit for bit, a level's parameters
and context memory change only on its firing steps, its buffered gradients are the sum of the skipped steps'
gradients, and the buffers and the conductor go through a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cambium.core.checkpoint import latest_checkpoint, load_checkpoint
from cambium.core.errors import CheckpointError
from cambium.core.loop import DeviceContext
from cambium.core.metrics import read_metrics
from cambium.nested.build import BuildTask, build
from cambium.nested.cms import CmsMemory, Conductor, OuterGradients
from cambium.nn.memory import MemoryConfig, MemoryLayer

from .conftest import tiny_config

CPU = DeviceContext(torch.device("cpu"))


def test_conductor_fires_each_level_every_period_steps_and_round_trips() -> None:
    conductor = Conductor((1, 2, 4))
    pulses = []
    for _ in range(8):
        pulses.append(conductor.pulse())
        conductor.advance()
    assert [p.active for p in pulses] == [(True, (s + 1) % 2 == 0, (s + 1) % 4 == 0) for s in range(8)]
    assert [p.opens[2] for p in pulses] == [True, False, False, False, True, False, False, False]
    assert [p.step for p in pulses] == list(range(8)) and pulses[0].phase == "build"
    restored = Conductor((1, 2, 4))
    restored.load_state_dict(conductor.state_dict())
    assert restored.pulse() == conductor.pulse()
    with pytest.raises(CheckpointError, match=r"does not fit cms\.periods"):
        Conductor((1, 8)).load_state_dict(conductor.state_dict())


def test_one_level_is_the_plain_memory_bit_for_bit() -> None:
    cfg = MemoryConfig(execution="chunkwise_exact", chunk_size=8)
    for combine in ("sum", "mix"):
        torch.manual_seed(3)
        cms = CmsMemory(32, 2, cfg, (1,), combine, seed=5)
        torch.manual_seed(3)
        plain = MemoryLayer(32, 2, cfg, seed=5)
        x = torch.randn(2, 20, 32)
        out, states = cms(x)
        ref, state = plain(x)
        assert torch.equal(out, ref) and torch.equal(states[0].params[0], state.params[0])  # type: ignore[union-attr]


def test_a_k1_build_with_either_combination_rule_gives_the_same_losses(tiny_mixture: Path, tmp_path: Path) -> None:
    losses = {}
    for combine in ("sum", "mix"):
        cfg = tiny_config(tiny_mixture, "build.steps=4", "build.warmup_steps=1", "build.threads=1",
                          f"cms.combine={combine}")
        result = build(cfg, tmp_path / "runs", show_progress=False)
        losses[combine] = [r.value for r in read_metrics(result.run_dir / "metrics.duckdb") if r.name == "loss"]
    assert losses["sum"] == losses["mix"] and len(losses["sum"]) == 4


def test_outer_gradients_buffer_in_fp32_and_fire_with_the_sum() -> None:
    fast, slow = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    outer = OuterGradients([[fast], [slow]], (1, 3))
    conductor = Conductor((1, 3))
    seen = []
    for s in range(6):
        fast.grad, slow.grad = torch.full((3,), float(s)), torch.full((2,), 0.1 * (s + 1), dtype=torch.bfloat16)
        seen.append(slow.grad.float().clone())
        outer.gate(conductor.pulse())
        conductor.advance()
        assert fast.grad is not None and torch.equal(fast.grad, torch.full((3,), float(s)))  # period 1: untouched
        if s % 3 == 2:
            assert slow.grad is not None and slow.grad.dtype == torch.bfloat16
            torch.testing.assert_close(slow.grad.float(), (seen[-3] + seen[-2] + seen[-1]).bfloat16().float())
            assert outer.pending[1] == 0 and not outer.buffers[1][0].any()
        else:
            assert slow.grad is None and outer.buffers[1][0].dtype == torch.float32
    state = outer.state_dict()
    other = OuterGradients([[fast], [slow]], (1, 3))
    other.load_state_dict(state)
    assert other.pending == outer.pending


def _level_params(task: BuildTask, level: int) -> list[torch.Tensor]:
    return [p.detach().clone() for p in task.model.level_parameters(level)]


def test_a_level_changes_only_on_its_firing_steps_with_the_summed_gradients(tiny_mixture: Path) -> None:
    cfg = tiny_config(tiny_mixture, "cms.periods=[1, 3]", "build.steps=7", "build.warmup_steps=1", "build.threads=1")
    torch.set_num_threads(1)
    task = BuildTask(cfg, CPU)
    raw: list[list[torch.Tensor]] = []
    applied: list[list[torch.Tensor] | None] = []
    gate = task.outer.gate

    def recording_gate(pulse):  # type: ignore[no-untyped-def]
        raw.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                    for p in task.model.level_parameters(1)])
        gate(pulse)
        grads = [p.grad for p in task.model.level_parameters(1)]
        applied.append(None if all(g is None for g in grads) else
                       [torch.zeros_like(p) if g is None else g.detach().clone()
                        for p, g in zip(task.model.level_parameters(1), grads, strict=True)])

    task.outer.gate = recording_gate  # type: ignore[method-assign]
    memory_before = None
    for step in range(7):
        fast, slow = _level_params(task, 0), _level_params(task, 1)
        task.train_step(step)
        fires = (step + 1) % 3 == 0
        assert any(not a.equal(b) for a, b in zip(fast, _level_params(task, 0), strict=True))
        changed = [not a.equal(b) for a, b in zip(slow, _level_params(task, 1), strict=True)]
        assert any(changed) == fires, (step, changed)
        block0 = task.memory.states[0]
        assert block0 is not None and block0[0] is not None
        slow_memory = block0[1]
        if fires:
            assert slow_memory is not None and (memory_before is None or not slow_memory.params[0].equal(memory_before))
            memory_before = slow_memory.params[0].clone()
            expected = [raw[step - 2][j] + raw[step - 1][j] + raw[step][j] for j in range(len(raw[step]))]
            got = applied[step]
            assert got is not None
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)
        else:
            assert applied[step] is None
            # the slow level's context memory is the one committed when it last fired (none before step 2)
            assert (slow_memory is None) if memory_before is None else slow_memory.params[0].equal(memory_before)


def test_checkpoint_holds_the_conductor_and_the_gradient_buffers_and_resume_is_exact(tiny_mixture: Path,
                                                                                       tmp_path: Path) -> None:
    """Stopped at step 4 (a period-3 level has one step buffered), resumed to 8: the same losses as never stopping."""
    sets = ("cms.periods=[1, 3]", "cms.combine=mix", "build.steps=8", "build.warmup_steps=1", "build.threads=1",
            "build.checkpoint_every=4", "build.eval_every=4", "build.eval_chunks=2")
    whole = build(tiny_config(tiny_mixture, *sets), tmp_path / "a", show_progress=False)
    first = build(tiny_config(tiny_mixture, *sets, "build.max_steps=4"), tmp_path / "b", show_progress=False)
    path = latest_checkpoint(first.run_dir / "checkpoints")
    assert path is not None
    ckpt = load_checkpoint(path)
    assert ckpt.states["conductor"]["step"] == 4 and ckpt.states["cms_gradients"]["pending"] == [0, 1]
    assert ckpt.states["cms_gradients"]["l1.0"].abs().sum() > 0
    resumed = build(tiny_config(tiny_mixture, *sets, "build.max_steps=8"), tmp_path / "b", resume=first.run_id,
                    show_progress=False)
    rows = [[(r.step, r.name, r.value) for r in read_metrics(run.run_dir / "metrics.duckdb")
             if not r.name.startswith("perf/")] for run in (whole, resumed)]
    assert rows[0] == rows[1] and max(s for s, _, _ in rows[0]) == 8
