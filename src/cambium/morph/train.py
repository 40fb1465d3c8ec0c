"""A morph training run on CIFAR-10: Tolaria plus the run registry, metrics, checkpoints and a report.

`train(cfg, name=...)` creates `runs/<run_id>/` (config, provenance, metrics.duckdb, checkpoints/, report.json) and
trains the host CNN for `train.epochs` epochs, morphogenetically unless `train.morphogenetic = false` (the same host,
same data order, no seeds: the baseline). A checkpoint is written at every epoch boundary, after the lifecycle
transitions; `train(..., resume=run_id)` continues from the latest one and gives the numbers of a run never stopped.

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

from cambium.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cambium.core.errors import CheckpointError
from cambium.core.metrics import MetricsWriter
from cambium.core.progress import get_logger, progress
from cambium.core.runs import Run, create_run, open_run
from cambium.core.schedule import CosineSchedule, LRScheduler
from cambium.data.images import load_cifar10, normalize
from cambium.morph.config import MorphConfig, TrainConfig
from cambium.morph.hosts import HostCNN
from cambium.morph.lifecycle import ACTIVE
from cambium.morph.tolaria import Morphogenesis, Tolaria, assemble

__all__ = ["CifarSplits", "load_splits", "train"]

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


def train(cfg: MorphConfig, *, name: str, runs_root: str | Path = "runs", resume: str | None = None,
          stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) a CIFAR-10 morph training; returns the report (also written to report.json).

    `stop_after` ends this invocation after that many epochs (checkpointed; the run stays resumable). The report
    then covers the model as it is, and the run is not marked finished.
    """
    splits = load_splits(cfg)
    torch.manual_seed(cfg.train.seed)
    host = HostCNN(cfg.model.widths, cfg.model.num_classes)
    if resume is None:
        run = create_run(runs_root, system="morph", name=name, config=cfg, seed=cfg.train.seed,
                         data_files=splits.files)
    else:
        run = open_run(runs_root, resume, config=cfg)
    morph = assemble(host, cfg, urza_root=cfg.library.root) if cfg.train.morphogenetic else None
    model: nn.Module = morph.model if morph is not None else host
    params = morph.kasmina.host_parameters() if morph is not None else list(host.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    tolaria = Tolaria(morph, opt, nn.functional.cross_entropy) if morph is not None else None
    start_epoch, step = 0, 0
    if resume is not None:
        start_epoch, step = _restore(run, model, opt, morph)
        if tolaria is not None:
            tolaria.step = step
    try:
        with MetricsWriter(run.metrics_path(), run.id) as metrics:
            metrics.truncate_after(step)  # rows a crash wrote after the checkpoint
            end = cfg.train.epochs if stop_after is None else min(cfg.train.epochs, start_epoch + stop_after)
            report = _loop(cfg, run, splits, model, host, opt, morph, tolaria, metrics, start_epoch, end, step)
    except BaseException:
        if morph is not None:
            morph.close()
        run.finish("failed")
        raise
    if morph is not None:
        morph.close()
    (run.dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if report["epochs_done"] == cfg.train.epochs:
        run.finish("finished", {k: v for k, v in report.items() if isinstance(v, int | float)})
    return report


def _loop(cfg: MorphConfig, run: Run, s: CifarSplits, model: nn.Module, host: nn.Module,
          opt: torch.optim.Optimizer, morph: Morphogenesis | None, tolaria: Tolaria | None,
          metrics: MetricsWriter, start_epoch: int, end_epoch: int, step: int) -> dict[str, Any]:
    seen = start_epoch * len(s.y_train)
    schedule = host_schedule(cfg.train, cfg.train.epochs * math.ceil(len(s.y_train) / cfg.data.batch_size))
    sched = LRScheduler(opt, schedule, step) if schedule is not None else None
    on_step = (lambda done, _loss: sched.step(done)) if sched is not None else None
    with progress(f"morph {run.id}", total=cfg.train.epochs, unit="epoch") as bar:
        bar.advance(start_epoch)
        for epoch in range(start_epoch, end_epoch):
            batches = _batches(s, cfg.data.batch_size, cfg.train.seed, epoch)
            if sched is not None:
                sched.step(step)
            if tolaria is not None and morph is not None:
                result = tolaria.train_epoch(batches, on_step=on_step)
                tolaria.end_epoch(epoch, result, lambda: accuracy(model, s.x_val, s.y_val))
                step = tolaria.step
                train_loss, anomaly = result.mean_loss, result.anomaly
            else:
                model.train()
                total = 0.0
                for x, y in batches:
                    loss = nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                    step += 1
                    if sched is not None:
                        sched.step(step)
                train_loss, anomaly = total / max(len(batches), 1), None
            seen += len(s.y_train)
            val = accuracy(model, s.x_val, s.y_val)
            values: dict[str, float] = {"train_loss": train_loss, "val_acc": val,
                                        "params": _param_count(morph, host), "anomaly": float(anomaly is not None)}
            if morph is not None:
                states = [r.life.state for r in morph.kasmina.seeds.values()]
                values["seeds_active"] = sum(st in ACTIVE for st in states)
                values["seeds_fossilized"] = sum(st.value == "FOSSILIZED" for st in states)
            metrics.log(step, seen, values)
            metrics.flush()
            _save(run, epoch + 1, step, model, opt, morph)
            bar.set(loss=train_loss, val_acc=val)
            bar.advance()
            log.info("epoch %d loss %.4f val_acc %.4f", epoch, train_loss, val)
    return _report(cfg, run, s, model, host, morph, step, end_epoch)


def _save(run: Run, epoch: int, step: int, model: nn.Module, opt: torch.optim.Optimizer,
          morph: Morphogenesis | None) -> None:
    cursor: dict[str, Any] = {"epoch": epoch, "step": step}
    state: dict[str, Any] = {"model": model, "optimizer": opt}
    if morph is not None:
        meta, tensors = morph.kasmina.export_state()
        cursor["kasmina"] = meta
        state["seeds"] = tensors
    save_checkpoint(run.checkpoint_dir, step, state, data_cursor=cursor, keep=2)


def _restore(run: Run, model: nn.Module, opt: torch.optim.Optimizer, morph: Morphogenesis | None) -> tuple[int, int]:
    path = latest_checkpoint(run.checkpoint_dir)
    if path is None:
        raise CheckpointError(f"run {run.id} has no checkpoint under {run.checkpoint_dir}; start it afresh")
    ckpt = load_checkpoint(path)
    if morph is not None:
        if "kasmina" not in ckpt.data_cursor:
            raise CheckpointError(f"{path} was written by a run without morphogenesis; resume it with the same config")
        groups = morph.kasmina.import_state(ckpt.data_cursor["kasmina"], ckpt.states["seeds"])
        for group in groups:
            opt.add_param_group({"params": group})
    ckpt.restore({"model": model, "optimizer": opt})
    if morph is not None:
        morph.kasmina.resnapshot()
    return int(ckpt.data_cursor["epoch"]), int(ckpt.data_cursor["step"])


def _report(cfg: MorphConfig, run: Run, s: CifarSplits, model: nn.Module, host: nn.Module,
            morph: Morphogenesis | None, step: int, epochs_done: int) -> dict[str, Any]:
    report: dict[str, Any] = {
        "run_id": run.id, "morphogenetic": morph is not None, "epochs_done": epochs_done, "steps": step,
        "val_acc": accuracy(model, s.x_val, s.y_val), "test_acc": accuracy(model, s.x_test, s.y_test),
        "params": _param_count(morph, host), "host_params": sum(p.numel() for p in host.parameters()),
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
