"""Atomic checkpoints: round trip of states and every RNG, crash leftovers, corruption, pruning, safe loading."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cambium.core.checkpoint import (
    capture_rng,
    checkpoint_path,
    keep_last,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    verify_checkpoint,
)
from cambium.core.errors import CheckpointError


def _setup(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
           steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _draw(gens: dict[str, np.random.Generator]) -> list[float]:
    out = [random.random(), random.gauss(0, 1), float(np.random.random()), float(np.random.standard_normal()),
           torch.rand(1).item()]
    out += [float(g.random()) for g in gens.values()]
    return out


def test_roundtrip_continues_training_exactly(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    _train(model, opt, sched, 3)
    path = save_checkpoint(tmp_path, 3, {"model": model, "optimizer": opt, "scheduler": sched},
                           data_cursor={"shard": 2, "offset": 1234})
    expected = _train(model, opt, sched, 4)

    model2, opt2, sched2 = _setup(seed=99)
    ckpt = load_checkpoint(path)
    assert ckpt.step == 3 and ckpt.data_cursor == {"shard": 2, "offset": 1234}
    ckpt.restore({"model": model2, "optimizer": opt2, "scheduler": sched2})
    assert _train(model2, opt2, sched2, 4) == expected
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_every_rng_is_restored(tmp_path: Path) -> None:
    gens = {"pcg": np.random.default_rng(1), "philox": np.random.Generator(np.random.Philox(2)),
            "sfc": np.random.Generator(np.random.SFC64(3)), "mt": np.random.Generator(np.random.MT19937(4))}
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    _draw(gens)
    path = save_checkpoint(tmp_path, 1, {}, generators=gens)
    expected = [_draw(gens) for _ in range(3)]
    for g in gens.values():
        g.random(10)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    load_checkpoint(path).restore(generators=gens)
    assert [_draw(gens) for _ in range(3)] == expected


def test_files_load_with_weights_only_and_meta_describes_them(tmp_path: Path) -> None:
    model, opt, _ = _setup()
    path = save_checkpoint(tmp_path, 12, {"model": model, "optimizer": opt}, generators={"g": np.random.default_rng()})
    assert path == checkpoint_path(tmp_path, 12) and path.name == "step_00000012"
    assert sorted(p.name for p in path.iterdir()) == ["cursor.json", "meta.json", "model.pt", "optimizer.pt", "rng.pt"]
    for pt in path.glob("*.pt"):
        torch.load(pt, weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 12 and set(meta["files"]) == {"cursor.json", "model.pt", "optimizer.pt", "rng.pt"}
    assert meta["total_bytes"] == sum((path / f).stat().st_size for f in meta["files"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_crash_during_write_leaves_previous_checkpoint_latest(tmp_path: Path) -> None:
    model, _, _ = _setup()
    good = save_checkpoint(tmp_path, 5, {"model": model})

    def crash(path: Path) -> None:
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 10, {"model": model}, on_file_written=crash)
    temps = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert temps == [f".tmp-step_00000010-{os.getpid()}"]
    assert latest_checkpoint(tmp_path) == good
    # A temp dir of a process that no longer exists is removed as well; one of a live process is left alone.
    (tmp_path / ".tmp-step_00000007-999999999").mkdir()
    (tmp_path / f".tmp-step_00000008-{os.getppid()}").mkdir()
    save_checkpoint(tmp_path, 10, {"model": model})
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-step_00000008-{os.getppid()}", "step_00000005",
                                                          "step_00000010"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-meta", "bad-meta", "missing-file"])
def test_damaged_checkpoints_are_skipped_and_refused(tmp_path: Path, damage: str) -> None:
    model, _, _ = _setup()
    good = save_checkpoint(tmp_path, 1, {"model": model})
    bad = save_checkpoint(tmp_path, 2, {"model": model})
    target = bad / "model.pt"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        reason = "sha256"
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
        reason = "bytes"
    elif damage == "no-meta":
        (bad / "meta.json").unlink()
        reason = "meta.json is missing"
    elif damage == "bad-meta":
        (bad / "meta.json").write_text("{not json")
        reason = "unreadable"
    else:
        target.unlink()
        reason = "missing"
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match=reason) as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value)


def test_unsafe_pickle_is_refused_even_with_matching_hash(tmp_path: Path) -> None:
    model, _, _ = _setup()
    path = save_checkpoint(tmp_path, 1, {"model": model})
    torch.save({"module": nn.Linear(1, 1)}, path / "model.pt")  # a pickled class, not plain tensors
    meta = json.loads((path / "meta.json").read_text())
    from cambium.core.files import file_sha256 as _sha256

    meta["files"]["model.pt"] = {"bytes": (path / "model.pt").stat().st_size, "sha256": _sha256(path / "model.pt")}
    (path / "meta.json").write_text(json.dumps(meta))
    verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(path)


def test_keep_last_and_resave(tmp_path: Path) -> None:
    model, _, _ = _setup()
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, {"model": model}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert keep_last(tmp_path, 5) == []
    first = next(iter(model.children()))
    assert isinstance(first, nn.Linear)
    with torch.no_grad():
        first.weight.fill_(1.0)
    save_checkpoint(tmp_path, 5, {"model": model})
    assert torch.equal(load_checkpoint(checkpoint_path(tmp_path, 5)).states["model"]["0.weight"],
                       torch.ones(8, 4))
    assert latest_checkpoint(tmp_path / "absent") is None


def test_errors_name_the_problem(tmp_path: Path) -> None:
    model, _, _ = _setup()
    with pytest.raises(CheckpointError, match="'rng'"):
        save_checkpoint(tmp_path, 1, {"rng": model})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, 1, {"model": model}, data_cursor={"x": object()})
    with pytest.raises(CheckpointError, match="step"):
        save_checkpoint(tmp_path, -1, {"model": model})
    path = save_checkpoint(tmp_path, 1, {"model": model}, generators={"g": np.random.default_rng(0)})
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="'optimizer'"):
        ckpt.restore({"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)})
    with pytest.raises(CheckpointError, match="does not fit"):
        ckpt.restore({"model": nn.Linear(3, 3)})
    with pytest.raises(CheckpointError, match="PCG64"):
        ckpt.restore(generators={"g": np.random.Generator(np.random.Philox(0))})
    with pytest.raises(CheckpointError, match="'h'"):
        restore_rng(capture_rng(), {"h": np.random.default_rng(0)})
