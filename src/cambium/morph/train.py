"""A morph training run on CIFAR-10: Tolaria as a `MorphTask` on `cambium.core.loop` (one loop step per epoch), and
a report.

`train(cfg, name=...)` creates `runs/<run_id>/` (config, provenance, metrics.duckdb, checkpoints/, report.json) and
trains the host CNN for `train.epochs` epochs, morphogenetically unless `train.morphogenetic = false` (the same host,
same data order, no seeds: the baseline). A checkpoint is written at every `train.checkpoint_every` epoch boundaries
(default: each), after the lifecycle transitions; `train(..., resume=run_id)` continues from the latest one and gives
the numbers of a run never stopped. Metric rows are numbered by epoch; `steps` counts the optimiser steps.

Data order: epoch e shuffles with a generator seeded (train.seed, e), so no data-loader state needs saving.
The host learning rate follows `train.lr_schedule` through `cambium.core.schedule.LRScheduler`, moved to the step
count after each step and at each epoch start (after a boundary added a fossilized seed's group or rolled the
optimizer back); it is a function of the step, so it needs no saved state either. Seed kernels keep their own
optimizers at `lifecycle.seed_lr`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cambium.core.checkpoint import Checkpoint
from cambium.core.errors import CheckpointError
from cambium.core.files import atomic_write
from cambium.core.loop import Task, count_training_flops, open_session
from cambium.core.progress import ProgressReporter, get_logger
from cambium.core.schedule import CosineSchedule, LRScheduler
from cambium.data.images import load_cifar10, normalize
from cambium.morph.backends import Endpoints, open_bus, open_urza
from cambium.morph.bus import Bus
from cambium.morph.config import MorphConfig, TrainConfig
from cambium.morph.controller import Policy, gnn_policy
from cambium.morph.field_reports import ReplayRecorder
from cambium.morph.hosts import HostCNN
from cambium.morph.library import Urza
from cambium.morph.lifecycle import ACTIVE
from cambium.morph.loop import Morphogenesis, Tolaria, assemble
from cambium.morph.services import TamiyoClient

__all__ = ["CifarSplits", "MorphTask", "load_splits", "train"]

log = get_logger("cambium.morph.train")


class CifarSplits:
    """Normalised train / validation images `[N, 3, 32, 32]` and labels `[N]`, and the held-out test batch."""

    def __init__(self, cfg: MorphConfig) -> None:
        d = cfg.data
        data = load_cifar10(d.root, d.train_batches, d.limit or None)
        n_val = max(int(len(data) * d.val_fraction), 1)
        x, y = normalize(data.images), data.labels
        self.x_train, self.y_train = x[:-n_val], y[:-n_val]
        self.x_val, self.y_val = x[-n_val:], y[-n_val:]
        test = load_cifar10(d.root, ("test_batch",), d.limit or None)
        self.x_test, self.y_test = normalize(test.images), test.labels
        self.files = [d.root / name for name in (*d.train_batches, "test_batch", "batches.meta")]


def load_splits(cfg: MorphConfig) -> CifarSplits:
    return CifarSplits(cfg)


def _batches(s: CifarSplits, batch_size: int, seed: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(s.y_train), generator=g)
    return [(s.x_train[i], s.y_train[i]) for i in order.split(batch_size)]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / max(len(y), 1)


def host_schedule(train: TrainConfig, total_steps: int) -> CosineSchedule | None:
    """The host's lr schedule: None for a constant lr, else a cosine from `lr` to `lr × lr_floor` at `total_steps`."""
    if train.lr_schedule == "constant":
        return None
    return CosineSchedule(lr_max=train.lr, lr_min=train.lr * train.lr_floor, total=max(total_steps, 1))


def _param_count(m: Morphogenesis | None, host: nn.Module) -> int:
    if m is None:
        return sum(p.numel() for p in host.parameters())
    return sum(p.numel() for p in m.kasmina.host_parameters())


class MorphTask(Task):
    """One epoch of the host (with its seeds, unless `train.morphogenetic` is off) for `cambium.core.loop`: the
    loop's step is an epoch, its checkpoints the epoch boundaries after the lifecycle transitions."""

    event_unit = "images"
    progress_key = "train_loss"

    def __init__(self, cfg: MorphConfig, splits: CifarSplits, name: str, *, bus: Bus | None = None,
                 urza: Urza | None = None, policy: Policy | None = None) -> None:
        self.cfg, self.s = cfg, splits
        self.label = f"morph {name}"
        torch.manual_seed(cfg.train.seed)
        self.host = HostCNN(cfg.model.widths, cfg.model.num_classes)
        self.morph = (assemble(self.host, cfg, urza_root=cfg.library.root, bus=bus, urza=urza, policy=policy)
                      if cfg.train.morphogenetic else None)
        self.model: nn.Module = self.morph.model if self.morph is not None else self.host
        params = self.morph.kasmina.host_parameters() if self.morph is not None else list(self.host.parameters())
        self.opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.tolaria = (Tolaria(self.morph, self.opt, nn.functional.cross_entropy,
                               await_compiles=cfg.lifecycle.await_compiles) if self.morph is not None else None)
        self.events_per_step = len(splits.y_train)
        self.batches_per_epoch = math.ceil(len(splits.y_train) / cfg.data.batch_size)
        schedule = host_schedule(cfg.train, cfg.train.epochs * self.batches_per_epoch)
        self.sched = LRScheduler(self.opt, schedule) if schedule is not None else None
        self.step = 0  # optimiser steps (batches) done

    def close(self) -> None:
        if self.morph is not None:
            self.morph.close()

    def total_steps(self) -> int:
        return self.cfg.train.epochs

    def flops_per_step(self) -> float:
        """The host's training FLOPs over an epoch of full batches (seeds and validation left out)."""
        x = torch.zeros(self.cfg.data.batch_size, *self.s.x_train.shape[1:])
        y = torch.zeros(self.cfg.data.batch_size, dtype=torch.long)
        per_batch = count_training_flops(self.host, lambda m: nn.functional.cross_entropy(m(x), y))
        return per_batch * len(self.s.y_train) / self.cfg.data.batch_size

    def states(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model, "optimizer": self.opt}
        if self.morph is not None:
            state["seeds"] = self.morph.kasmina
        return state

    def cursor(self) -> dict[str, Any]:
        return {"step": self.step}

    def restore(self, ckpt: Checkpoint) -> None:
        if self.morph is not None:
            if "seeds" not in ckpt.states:
                raise CheckpointError(f"{ckpt.path} was written by a run without morphogenesis; resume it with the "
                                      "same config")
            # Seed manager first: it rebuilds the kernels the model's state dict fills and the fossilized groups the
            # optimizer's state dict expects.
            self.morph.kasmina.load_state_dict(ckpt.states["seeds"])
            for group in self.morph.kasmina.fossil_param_groups():
                self.opt.add_param_group({"params": group})
        ckpt.restore({"model": self.model, "optimizer": self.opt})
        self.step = int(ckpt.data_cursor["task"]["step"])
        if self.tolaria is not None:
            self.tolaria.step = self.step

    def train_step(self, epoch: int) -> dict[str, float]:
        s, cfg = self.s, self.cfg
        batches = _batches(s, cfg.data.batch_size, cfg.train.seed, epoch)
        sched = self.sched
        if sched is not None:
            sched.step(self.step)
        if self.tolaria is not None and self.morph is not None:
            on_step = (lambda done, _loss: sched.step(done)) if sched is not None else None
            result = self.tolaria.train_epoch(batches, on_step=on_step)
            self.tolaria.end_epoch(epoch, result, lambda: accuracy(self.model, s.x_val, s.y_val))
            self.step = self.tolaria.step
            train_loss, anomaly = result.mean_loss, result.anomaly
        else:
            self.model.train()
            total = 0.0
            for x, y in batches:
                loss = nn.functional.cross_entropy(self.model(x), y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                total += float(loss.detach())
                self.step += 1
                if sched is not None:
                    sched.step(self.step)
            train_loss, anomaly = total / max(len(batches), 1), None
        val = accuracy(self.model, s.x_val, s.y_val)
        values: dict[str, float] = {"train_loss": train_loss, "val_acc": val, "steps": float(self.step),
                                    "params": _param_count(self.morph, self.host),
                                    "anomaly": float(anomaly is not None)}
        if self.morph is not None:
            states = [r.life.state for r in self.morph.kasmina.seeds.values()]
            values["seeds_active"] = sum(st in ACTIVE for st in states)
            values["seeds_fossilized"] = sum(st.value == "FOSSILIZED" for st in states)
        log.info("epoch %d loss %.4f val_acc %.4f", epoch, train_loss, val)
        return values

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        s = self.s
        loss = sum(float(nn.functional.cross_entropy(self.model(s.x_val[i : i + 256]), s.y_val[i : i + 256],
                                                     reduction="sum")) for i in range(0, len(s.y_val), 256))
        return {"val_loss": loss / max(len(s.y_val), 1)}

    def report(self, run_id: str, epochs_done: int) -> dict[str, Any]:
        s, morph = self.s, self.morph
        report: dict[str, Any] = {
            "run_id": run_id, "morphogenetic": morph is not None, "epochs_done": epochs_done, "steps": self.step,
            "val_acc": accuracy(self.model, s.x_val, s.y_val), "test_acc": accuracy(self.model, s.x_test, s.y_test),
            "params": _param_count(morph, self.host), "host_params": sum(p.numel() for p in self.host.parameters()),
        }
        if morph is not None:
            k = morph.kasmina
            report["seeds"] = {
                loc: {"state": r.life.state.value, "timeline": [c.model_dump(mode="json") for c in r.life.history]}
                for loc, r in k.seeds.items()
            }
            report["field_reports"] = [rep.model_dump(mode="json") for rep in k.reports]
            report["skipped"] = dict(k.skipped)
            report["host_rollbacks"] = k.host_rollbacks
            lat = morph.policy.latencies_ms
            report["tamiyo_latency_ms_median"] = sorted(lat)[len(lat) // 2] if lat else math.nan
        return report


def train(cfg: MorphConfig, *, name: str, runs_root: str | Path = "runs", resume: str | None = None,
          stop_after: int | None = None, reporter: ProgressReporter | None = None,
          show_progress: bool = True, measure_peak: bool = False, endpoints: Endpoints | None = None,
          bus_namespace: str | None = None) -> dict[str, Any]:
    """Run (or resume) a CIFAR-10 morph training; returns the report (also written to report.json).

    `stop_after` ends this invocation after that many more epochs (checkpointed; the run stays resumable). The
    report then covers the model as it is, and the run is not marked finished. `endpoints` puts Oona and Urza on
    Redis / PostgreSQL / S3 (the bus's streams are namespaced by the run id, so a resume continues them); the
    numbers are the same as on the embedded backends, and `endpoints.tamiyo_url` takes the decisions from a Tamiyo
    service (the same policy gives the same run). `bus_namespace` names the streams instead (compile workers
    started beforehand with `cambium morph worker --namespace` serve a run with `library.compile_in = "workers"`).
    """
    if cfg.train.morphogenetic and cfg.controller.kind == "gnn":
        gnn_policy(cfg)  # a missing or damaged policy file is refused before a run is created
    splits = load_splits(cfg)
    ends = endpoints if endpoints is not None else Endpoints()
    with open_session(cfg, cfg.train, runs_root, system="morph", name=name, resume=resume, data_files=splits.files,
                      reporter=reporter, show_progress=show_progress, measure_peak=measure_peak) as session:
        bus = open_bus(ends, namespace=bus_namespace or f"oona:{session.run.id}", retention=cfg.bus.retention)
        urza = open_urza(ends, cfg.library.root)
        tamiyo = TamiyoClient(ends.tamiyo_url, ends.api_token) if ends.tamiyo_url is not None else None
        task = MorphTask(cfg, splits, name, bus=bus, urza=urza, policy=tamiyo)
        if task.tolaria is not None:  # Simic's replay buffer (deduplicated: a resume records nothing twice)
            kind = "remote" if tamiyo is not None else cfg.controller.kind
            task.tolaria.recorder = ReplayRecorder(urza, session.run.id, policy=kind,
                                                   budget=cfg.lifecycle.max_adaptations_per_epoch)
        try:
            result = session.fit(task, stop_after=stop_after)
            report = task.report(session.run.id, result.steps)
        finally:
            task.close()
            bus.close()
            if tamiyo is not None:
                tamiyo.close()
        atomic_write(session.run.dir / "report.json", json.dumps(report, indent=2) + "\n")
        if result.steps == result.total:
            session.finish({k: v for k, v in report.items() if isinstance(v, int | float)})
    return report
