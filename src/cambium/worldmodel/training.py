"""Strate I and Strate II as `cambium.core.loop` tasks on in-memory candle series (the pipeline runs them in a run
with metrics and checkpoints; `fit_tokenizer`/`fit_jepa` run them plainly).

Windows are sampled uniformly: a series with enough bars, then a start bar. Tokenizer windows start at any bar, so
patch boundaries move from one step to the next (more distinct patches than a fixed grid gives).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cambium.core.distributed import DistInfo
from cambium.core.errors import ConfigError, DataError
from cambium.core.loop import DeviceContext, Task, count_training_flops
from cambium.core.schedule import CosineSchedule, LRScheduler
from cambium.worldmodel.config import TrainConfig
from cambium.worldmodel.features import CandleBatch, clock_features
from cambium.worldmodel.jepa import WorldModelJEPA, block_mask, ema_momentum
from cambium.worldmodel.tokenizer import FSQTokenizer

__all__ = [
    "CandleSeries", "GeneratorState", "JEPATask", "TokenizerTask", "candle_batch_fn", "fit_jepa", "fit_tokenizer",
    "sample_windows", "tokenize_series",
]

StepCallback = Callable[[int, dict[str, float]], None]
# (generator) -> (code indices [B, N], clock features [B, N, F])
JEPABatchFn = Callable[[torch.Generator], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class CandleSeries:
    """One instrument's contiguous bars: ohlcv [T, 5] (float64), open_time_ms [T] (int64)."""

    name: str
    ohlcv: Tensor
    open_time_ms: Tensor


def sample_windows(
    series: Sequence[CandleSeries], bars: int, batch: int, generator: torch.Generator
) -> CandleBatch:
    """`batch` random windows of `bars` consecutive bars -> CandleBatch (ohlcv [batch, bars, 5] float32)."""
    usable = [s for s in series if s.ohlcv.shape[0] >= bars]
    if not usable:
        longest = max((s.ohlcv.shape[0] for s in series), default=0)
        raise DataError(f"no series has {bars} bars for one training window (longest: {longest}); shorten seq_len")
    which = torch.randint(len(usable), (batch,), generator=generator).tolist()
    ohlcv, times = [], []
    for i in which:
        s = usable[i]
        start = int(torch.randint(s.ohlcv.shape[0] - bars + 1, (1,), generator=generator))
        ohlcv.append(s.ohlcv[start : start + bars])
        times.append(s.open_time_ms[start : start + bars])
    return CandleBatch(torch.stack(ohlcv).float(), torch.stack(times))


def _optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> tuple[torch.optim.AdamW, LRScheduler]:
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    schedule = CosineSchedule(
        lr_max=train.lr, lr_min=train.lr * 0.1, warmup=min(train.warmup_steps, train.steps), total=train.steps
    )
    return opt, LRScheduler(opt, schedule)


class GeneratorState:
    """A torch.Generator as a checkpointable object (state_dict / load_state_dict)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["state"])


class _PhaseTask(Task):
    """What Strate I and Strate II share: AdamW with the cosine schedule over `train.steps`, the data generator in
    the checkpoint, an optional fixed hold-out batch, and data parallelism by rows of the global batch."""

    event_unit = "bars"

    def __init__(self, model: nn.Module, train: TrainConfig, generator: torch.Generator,
                 device: DeviceContext | None) -> None:
        self.model, self.train, self.generator = model, train, generator
        self.device = device or DeviceContext(torch.device("cpu"))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt, self.sched = _optimizer(self.params, train)
        self.forward: nn.Module = model  # the DDP wrapper once parallelized
        self.shard = slice(None)  # this rank's rows of each global batch

    def total_steps(self) -> int:
        return self.train.steps

    def parallelize(self, dist: DistInfo) -> None:
        """Each rank takes its rows of the global batch (drawn alike on every rank, so every rank's generator stays
        in step) and DDP averages the gradients."""
        self.shard = _rank_rows(self.train.batch_size, dist)
        self.forward = _ddp(self.model, dist)

    def states(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.opt, "scheduler": self.sched,
                "generator": GeneratorState(self.generator)}


class TokenizerTask(_PhaseTask):
    """Strate I training one optimizer step at a time, for `cambium.core.loop` (or a plain loop: `fit_tokenizer`).

    `holdout` (optional) gives `evaluate` a fixed sample of hold-out windows: their reconstruction loss is
    `holdout_loss`. Data parallel: the equal shards' mean losses average to the global batch's mean loss."""

    label = "worldmodel tokenizer"

    def __init__(self, model: FSQTokenizer, series: Sequence[CandleSeries], train: TrainConfig,
                 generator: torch.Generator, window_patches: int = 8, *, device: DeviceContext | None = None,
                 holdout: CandleBatch | None = None) -> None:
        super().__init__(model, train, generator, device)
        self.model: FSQTokenizer = model
        self.series, self.holdout = series, holdout
        self.bars = window_patches * model.cfg.patch_length
        self.events_per_step = self.bars * train.batch_size

    def flops_per_step(self) -> float:
        rows = len(range(self.train.batch_size)[self.shard])
        return count_training_flops(self.model, lambda m: m(torch.randn(rows, self.bars, 5, device=self.device.device)
                                                            .abs() + 1.0).loss)

    def train_step(self, step: int) -> dict[str, float]:
        """Optimizer step number `step` (0-based) -> {loss, grad_norm, lr} (lr used by this step)."""
        self.model.train()
        lr = self.opt.param_groups[0]["lr"]
        batch = sample_windows(self.series, self.bars, self.train.batch_size, self.generator).ohlcv
        ohlcv = self.device.to(batch[self.shard])
        with self.device.autocast():
            out = self.forward(ohlcv)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip)
        self.opt.step()
        self.sched.step(step + 1)
        return {"loss": _global_mean(out.loss.detach()), "grad_norm": float(grad_norm), "lr": float(lr)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.holdout is None:
            return {}
        self.model.eval()
        with self.device.autocast():
            loss = self.model(self.device.to(self.holdout.ohlcv)).loss
        return {"holdout_loss": float(loss)}


class JEPATask(_PhaseTask):
    """Strate II training one optimizer step at a time on batches from `batch_fn` (the tokenizer stays frozen).

    `holdout` (optional) is a fixed batch (codes, clock features, mask) whose JEPA loss `evaluate` reports."""

    label = "worldmodel jepa"

    def __init__(self, model: WorldModelJEPA, batch_fn: JEPABatchFn, train: TrainConfig,
                 generator: torch.Generator, *, device: DeviceContext | None = None,
                 holdout: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
        super().__init__(model, train, generator, device)
        self.model: WorldModelJEPA = model
        self.batch_fn, self.holdout = batch_fn, holdout
        self.events_per_step = model.cfg.seq_len * model.tokenizer.cfg.patch_length * train.batch_size

    def flops_per_step(self) -> float:
        rows, n = len(range(self.train.batch_size)[self.shard]), self.model.cfg.seq_len
        mask = block_mask(rows, n, self.model.cfg.masking, torch.Generator().manual_seed(0))
        dev = self.device.device
        indices = torch.zeros(rows, n, dtype=torch.long, device=dev)
        clock = torch.zeros(rows, n, self.model.clock_dim, device=dev)

        def loss_of(probe: nn.Module) -> Tensor:
            assert isinstance(probe, WorldModelJEPA)
            probe.data_parallel = False  # the count is this rank's own work: no collectives on one rank alone
            return probe(indices, clock, mask.to(dev)).loss

        return count_training_flops(self.model, loss_of)

    def parallelize(self, dist: DistInfo) -> None:
        """Rows of the global batch and masks per rank, as Strate I; the model then computes the global batch's loss
        (`WorldModelJEPA.data_parallel`), so DDP's averaged gradient is the one-process one."""
        super().parallelize(dist)
        self.model.data_parallel = True

    def train_step(self, step: int) -> dict[str, float]:
        """Optimizer step number `step` (0-based) -> loss terms, grad_norm, lr, ema momentum."""
        cfg = self.model.cfg
        self.model.train()
        lr = self.opt.param_groups[0]["lr"]
        indices, clock = self.batch_fn(self.generator)
        mask = block_mask(indices.shape[0], indices.shape[1], cfg.masking, self.generator)
        rows = self.shard
        with self.device.autocast():
            out = self.forward(self.device.to(indices[rows]), self.device.to(clock[rows]),
                               self.device.to(mask[rows]))
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip)
        self.opt.step()
        self.sched.step(step + 1)
        tau = ema_momentum(step + 1, self.train.steps, cfg.ema)
        self.model.update_target(tau)
        return {
            "loss": float(out.loss.detach()), "invariance": float(out.invariance.detach()),
            "variance": float(out.variance.detach()), "covariance": float(out.covariance.detach()),
            "grad_norm": float(grad_norm), "lr": float(lr), "ema_tau": float(tau),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.holdout is None:
            return {}
        self.model.eval()
        indices, clock, mask = (self.device.to(x) for x in self.holdout)
        with self.device.autocast():
            out = self.model(indices, clock, mask)
        return {"holdout_loss": float(out.loss)}


def _rank_rows(batch_size: int, dist: DistInfo) -> slice:
    if batch_size % dist.world_size:
        raise ConfigError(f"batch_size={batch_size} must divide by the {dist.world_size} data-parallel ranks")
    per = batch_size // dist.world_size
    return slice(dist.rank * per, (dist.rank + 1) * per)


def _ddp(model: nn.Module, dist: DistInfo) -> nn.Module:
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _global_mean(value: Tensor) -> float:
    """The mean of a per-rank scalar over the ranks (itself in one process)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return float(value)


def candle_batch_fn(series: Sequence[CandleSeries], model: WorldModelJEPA, batch_size: int) -> JEPABatchFn:
    """Random windows of seq_len patches from `series`, tokenized on the fly (patch grid moves with the start)."""
    patch = model.tokenizer.cfg.patch_length

    def batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        candles = sample_windows(series, model.cfg.seq_len * patch, batch_size, generator)
        return model.tokenizer.tokenize(candles.ohlcv), clock_features(candles, patch)

    return batch


def fit_tokenizer(
    model: FSQTokenizer,
    series: Sequence[CandleSeries],
    train: TrainConfig,
    generator: torch.Generator,
    window_patches: int = 8,
    on_step: StepCallback | None = None,
) -> list[float]:
    """Train Strate I for train.steps steps on random windows; returns the loss of every step."""
    task = TokenizerTask(model, series, train, generator, window_patches)
    losses = []
    for step in range(train.steps):
        row = task.train_step(step)
        losses.append(row["loss"])
        if on_step is not None:
            on_step(step, {"loss": row["loss"], "grad_norm": row["grad_norm"]})
    model.eval()
    return losses


@torch.no_grad()
def tokenize_series(model: FSQTokenizer, series: Sequence[CandleSeries]) -> list[Tensor]:
    """Codes [N_i] of each series on the fixed grid of patches ending at its last bar."""
    model.eval()
    return [model.tokenize(s.ohlcv.float().unsqueeze(0))[0] for s in series]


def fit_jepa(
    model: WorldModelJEPA,
    series: Sequence[CandleSeries],
    train: TrainConfig,
    generator: torch.Generator,
    on_step: StepCallback | None = None,
) -> list[dict[str, float]]:
    """Train Strate II (the tokenizer stays frozen); returns the loss terms of every step."""
    task = JEPATask(model, candle_batch_fn(series, model, train.batch_size), train, generator)
    history = []
    for step in range(train.steps):
        full = task.train_step(step)
        row = {k: full[k] for k in ("loss", "invariance", "variance", "covariance", "grad_norm")}
        history.append(row)
        if on_step is not None:
            on_step(step, row)
    model.eval()
    return history
