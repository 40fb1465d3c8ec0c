"""A small task a linear host cannot solve and a seed with a nonlinearity can: the label is sign(x0 · x1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cambium.morph.config import LibraryConfig, LifecycleConfig, MorphConfig, PolicyConfig, SeedsConfig
from cambium.morph.loop import EpochResult, Morphogenesis, Tolaria, assemble


def xor_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] * x[:, 1] > 0).long()


def linear_host() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))


def config(tmp_path, **lifecycle) -> MorphConfig:
    base = dict(graft_steps=16, seed_lr=3e-2, training_epochs=4, embargo_epochs=2, min_delta=0.0)
    base.update(lifecycle)
    return MorphConfig(
        seeds=SeedsConfig(locations=("1",), telemetry_every=1),
        lifecycle=LifecycleConfig(**base),
        policy=PolicyConfig(health_threshold=1.0, confidence_threshold=0.0),
        library=LibraryConfig(root=tmp_path / "urza", benchmark_repeats=1),
    )


class Harness:
    """Tolaria on the XOR task with accuracy as the validation metric."""

    def __init__(self, tmp_path, host: nn.Module | None = None, *, policy: bool = False,
                 on_compile_start: Any = None, bus: Any = None, **lifecycle) -> None:
        self.cfg = config(tmp_path, **lifecycle)
        self.m: Morphogenesis = assemble(host if host is not None else linear_host(), self.cfg,
                                         on_compile_start=on_compile_start, bus=bus)
        if not policy:
            self.m.policy.cfg = self.m.policy.cfg.model_copy(update={"health_threshold": 0.0})
        self.opt = torch.optim.AdamW(self.m.kasmina.host_parameters(), lr=1e-2)
        self.t = Tolaria(self.m, self.opt, nn.functional.cross_entropy,
                         await_compiles=self.cfg.lifecycle.await_compiles)
        self.x, self.y = xor_data(512, 0)
        self.vx, self.vy = xor_data(512, 1)
        self.epoch = 0

    def batches(self):
        for i in range(0, len(self.x), 32):
            yield self.x[i : i + 32], self.y[i : i + 32]

    @torch.no_grad()
    def accuracy(self) -> float:
        self.m.model.eval()
        return float((self.m.model(self.vx).argmax(1) == self.vy).float().mean())

    def run_epoch(self, on_step=None, after_boundary=None) -> EpochResult:
        res = self.t.train_epoch(self.batches(), on_step)
        res = self.t.end_epoch(self.epoch, res, self.accuracy)
        self.epoch += 1
        return res

    def germinate(self, blueprint_id: str, seed_id: str = "1") -> bool:
        """Germinate at the current epoch boundary (the one the last run_epoch closed)."""
        k = self.m.kasmina
        with k.boundary(self.epoch):
            k.adaptations_this_epoch = 0
            ok = k.germinate(seed_id, blueprint_id)
        return ok

    def state(self, seed_id: str = "1"):
        return self.m.kasmina.seeds[seed_id].life.state

    def close(self) -> None:
        self.m.close()


def assert_same_state(a: Any, b: Any, path: str = "state") -> None:
    """Nested state dicts equal bit for bit (tensors by `torch.equal`); `path` names the first difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path
