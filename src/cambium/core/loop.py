"""The one training loop: run creation or resume, device and autocast, checkpoint cadence, progress, perf metrics.

A system supplies a `Task` (its model, data and one optimiser step); the loop owns everything around it:

    session = open_session(cfg, cfg.train, runs_root, system="moe", name=..., resume=run_id_or_None)
    with session:
        result = session.fit(MoETask(cfg, session.device))
        session.finish(result.final)

`open_session` resolves the device first (asking for CUDA where there is none is a ConfigError, never a fallback),
then creates the run or reopens it. On resume the config given may differ from the run's stored one only in fields
marked `RESUME_SAFE` (train length, intervals, threads, device); anything else is refused with the key named, before
the run is touched. `Session.fit` restores the latest checkpoint of the task (config fingerprint checked before any
state is loaded), truncates the metric rows the lost future wrote, then steps: every `log_every` steps a metric row
(with `perf/…` wall-clock figures and MFU: the task's FLOPs per step over the step time, against the device's
measured peak), every `eval_every` an evaluation, every `checkpoint_every` (and at the end) a checkpoint holding the
task's states, every RNG state and the task's cursor; `keep_checkpoints` are kept.

A run of several phases (the world model) calls `fit` once per phase with a metric-step `offset` and a `phase` tag: a
checkpoint belongs to the phase that wrote it, and a phase with none of its own starts afresh.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, Field, field_validator
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cambium.core.checkpoint import CURSOR_FILE, Checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from cambium.core.config import (
    RESUME_SAFE,
    ConfigModel,
    changed_keys,
    is_resume_safe,
    load,
    resume_fingerprint,
)
from cambium.core.distributed import DistInfo, barrier, init_distributed, teardown
from cambium.core.doctor import DevicePeak, load_or_measure_peak
from cambium.core.errors import CheckpointError, ConfigError, DataError
from cambium.core.metrics import MetricsWriter
from cambium.core.progress import ProgressReporter, get_logger, progress
from cambium.core.runs import Run, create_run, get_run, open_run, run_handle, update_config

__all__ = [
    "DeviceContext", "LoopConfig", "LoopResult", "Session", "Task", "count_training_flops", "load_run_config",
    "open_session",
    "resolve_device",
]

log = get_logger("cambium.core.loop")
M = TypeVar("M", bound=BaseModel)
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class LoopConfig(ConfigModel):
    """The loop settings every trainer shares (a system's train section subclasses this)."""

    seed: int = Field(0, description="seed of initialisation and data order", ge=0)
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'; "
                        "CUDA where there is none is an error", json_schema_extra=RESUME_SAFE)
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="autocast dtype of the forward pass (fp32 on CPU: bf16 is emulated there and slower)")
    threads: int | None = Field(None, description="torch intra-op threads (None: torch's default; 1 gives the same "
                                "numbers under any load)", ge=1, json_schema_extra=RESUME_SAFE)
    max_steps: int | None = Field(None, description="optimiser steps to run (None: the schedule's length; past its end "
                                  "the lr stays at its final value)", ge=1, json_schema_extra=RESUME_SAFE)
    log_every: int = Field(1, description="write step metrics every this many steps", ge=1,
                           json_schema_extra=RESUME_SAFE)
    eval_every: int = Field(50, description="evaluate every this many steps (and at the end)", ge=1,
                            json_schema_extra=RESUME_SAFE)
    checkpoint_every: int = Field(50, description="checkpoint every this many steps (and at the end)", ge=1,
                                  json_schema_extra=RESUME_SAFE)
    keep_checkpoints: int = Field(2, description="how many recent checkpoints to keep", ge=1,
                                  json_schema_extra=RESUME_SAFE)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value


def resolve_device(spec: str) -> torch.device:
    """The torch device of a `LoopConfig.device` value; CUDA asked for where there is none is a ConfigError."""
    if not _DEVICE_RE.match(spec):
        raise ConfigError(f"device={spec!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={spec!r} but this machine has no CUDA device (torch {torch.__version__}); use "
                          "device='cpu' or 'auto'")
    index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device={spec!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class DeviceContext:
    """Where a task computes and in which precision: `autocast()` around forward passes, `to()` for batches."""

    device: torch.device
    dtype: str = "float32"

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def to(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the device: pinned and copied without blocking when going to CUDA."""
        if tensor.device == self.device:
            return tensor
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class Task:
    """What a system supplies to the loop. Subclasses set the attributes and override the methods they need.

    `train_step(step)` runs optimiser step `step` (0-based) and returns its metrics (a "loss" among them);
    `states()` names the objects with `state_dict`/`load_state_dict` a checkpoint holds; `cursor()` is the JSON-able
    rest of the task's position (data cursor, counters), given back to `load_cursor` on resume.
    """

    label: str = "train"
    events_per_step: int = 1
    event_unit: str = "events"
    progress_key: str = "loss"  # the metric the progress bar shows

    def total_steps(self) -> int:
        raise NotImplementedError

    def states(self) -> dict[str, Any]:
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def flops_per_step(self) -> float | None:
        """Model FLOPs of one step, for MFU (None: not reported). See `count_training_flops`."""
        return None

    def cursor(self) -> dict[str, Any]:
        return {}

    def load_cursor(self, cursor: dict[str, Any]) -> None:
        return None

    def parallelize(self, dist: DistInfo) -> None:
        """Make the task data parallel over `dist.world_size` ranks: wrap its model (DDP) and shard its data so that
        the ranks together step on the same global batch as one process would. A task that cannot refuses."""
        raise ConfigError(f"{self.label} does not run data parallel (launched with {dist.world_size} ranks); run it "
                          "in one process")

    def save_shards(self, directory: Path) -> bool:
        """Called on every rank before each checkpoint: a task whose state is spread over ranks (e.g. experts
        sharded across them) writes it into `directory` (every rank the same one, e.g. with
        torch.distributed.checkpoint) and returns True; rank 0 then moves it into the checkpoint as `shards/`.
        Default: nothing to write (the states are whole on rank 0)."""
        return False

    def restore(self, ckpt: Checkpoint) -> None:
        """Load a checkpoint into the task (override when states must be rebuilt before they can be loaded)."""
        ckpt.restore(self.states())
        self.load_cursor(ckpt.data_cursor.get("task", {}))


@dataclass
class LoopResult:
    """`steps` done of `total` (fewer when `fit` was told to stop early), their `events`, the last logged values."""

    run_id: str
    run_dir: Path
    steps: int
    events: int
    final: dict[str, float] = field(default_factory=dict)
    total: int = 0


def count_training_flops(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor]) -> float:
    """Matmul and convolution FLOPs of one forward and backward, `loss_of(model).backward()`, counted by torch's
    FlopCounterMode on a copy of `model`: the model, its gradients and every RNG are left as they were."""
    probe = copy.deepcopy(model)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as counter:
        loss_of(probe).backward()
    return float(counter.get_total_flops())


def load_run_config(model: type[M], runs_root: str | Path, *, config: Path | None, resume: str | None,
                    overrides: list[str], device: str | None = None, section: str = "train") -> M:
    """The config a training command runs with: `config` (a TOML file), else with `resume` the run's stored
    config.toml; `overrides` applied on top, and `device` (the `--device` option) as `<section>.device`. Whether a
    resume may change what it changes is checked by `open_session`."""
    if device is not None:
        overrides = [*overrides, f"{section}.device={device}"]
    if config is None and resume is None:
        raise ConfigError("give --config FILE for a new run, or --resume RUN_ID to continue one")
    if config is None:
        assert resume is not None
        return load(get_run(runs_root, resume).dir / "config.toml", model, overrides)
    return load(config, model, overrides)


class _NoMetrics:
    """The metrics writer of a rank other than 0: rank 0 alone writes the run's rows (its values are global)."""

    def log(self, step: int, tokens_or_events: int, values: dict[str, Any]) -> None:
        return None

    def flush(self) -> None:
        return None

    def truncate_after(self, step: int) -> int:
        return 0

    def close(self) -> None:
        return None


class Session:
    """One run being trained by this process: the run, its metrics writer, device and progress reporter.

    Under torchrun (`dist.world_size > 1`) every rank holds a session of the same run; rank 0 alone writes metrics,
    checkpoints and the registry, and `fit` makes the task data parallel (`Task.parallelize`).
    """

    def __init__(self, config: BaseModel, loop: LoopConfig, run: Run, *, resumed: bool, device: DeviceContext,
                 reporter: ProgressReporter, show_progress: bool, peak: DevicePeak | None,
                 dist: DistInfo | None = None) -> None:
        self.config, self.loop, self.run = config, loop, run
        self.dist = dist or DistInfo(0, 1, 0, None, device.device)
        self.is_main = self.dist.is_main
        self.resumed, self.device = resumed, device
        self.reporter = reporter if self.is_main else ProgressReporter(None)
        self.show_progress, self.peak = show_progress and self.is_main, peak
        self.metrics: MetricsWriter | _NoMetrics = (MetricsWriter(run.metrics_path(), run.id) if self.is_main
                                                    else _NoMetrics())
        self.fingerprint = resume_fingerprint(config)
        self._announced = False
        self._finished = False
        self.reporter.run_started(run.id)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.metrics.close()
        if self.is_main:
            if exc_type is None and not self._finished:
                # Stopped on purpose before the end (e.g. after a number of epochs): resumable, not finished.
                self.run.finish("killed", {"stopped": "before the end; continue it with --resume"})
            self.run.__exit__(exc_type, exc, tb)
        if self.dist.world_size > 1:
            teardown()

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the run finished with `summary` (an empty one, e.g. a resume with nothing left to do, keeps the
        summary the run had)."""
        self.metrics.close()
        if self.is_main:
            self.run.finish("finished", summary=summary or None)
        self._finished = True

    def barrier(self) -> None:
        if self.dist.world_size > 1:
            barrier()

    def announce_resume(self, step: int) -> None:
        """Tell the reporter once per process where the run went on from."""
        if self.resumed and not self._announced:
            self._announced = True
            self.reporter.resumed(step)

    def forget_from(self, step: int, *, collective: bool = True) -> None:
        """Drop metric rows and checkpoints after `step` (a phase starting afresh, or the future of a resume).

        Every rank calls it (`collective`), or rank 0 alone in work that only rank 0 does."""
        if collective:
            self.barrier()  # every rank has read what it needs from the checkpoints before rank 0 deletes any
        if self.is_main:
            self.metrics.truncate_after(step)
            for path in list_checkpoints(self.run.checkpoint_dir):
                if int(path.name.split("_")[1]) > step:
                    shutil.rmtree(path)
        if collective:
            self.barrier()
        self.announce_resume(step)

    def _latest_of(self, phase: str | None) -> Checkpoint | None:
        """The newest intact checkpoint written by `phase` (a damaged one is skipped with a warning)."""
        for path in reversed(list_checkpoints(self.run.checkpoint_dir)):
            try:
                cursor = json.loads((path / CURSOR_FILE).read_text(encoding="utf-8"))
                if cursor.get("phase") != phase:
                    continue
                return load_checkpoint(path, map_location=self.device.device)
            except (OSError, ValueError, CheckpointError) as exc:
                log.warning("skipping checkpoint %s: %s", path, exc)
        return None

    def _restore(self, task: Task, offset: int, phase: str | None) -> int:
        ckpt = self._latest_of(phase) if self.resumed else None
        if ckpt is None:
            if self.resumed and phase is None:
                log.info("no checkpoint in %s: starting from step 0", self.run.checkpoint_dir)
            self.forget_from(offset)
            return 0
        # Before any state is loaded: another config's tensors would fail on shapes with a less useful message.
        if ckpt.data_cursor.get("config_fingerprint") != self.fingerprint:
            raise CheckpointError(f"{ckpt.path} was written with another config; resume with the run's own config")
        cursor_file = ckpt.path / CURSOR_FILE
        start = ckpt.data_cursor.get("loop_step")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < 2**63:
            raise CheckpointError(f"{cursor_file}: loop_step={start!r} is not a step count")
        try:
            task.restore(ckpt)
        except (DataError, CheckpointError) as exc:
            # The loaders name the key; the file is only known here.
            raise CheckpointError(f"{cursor_file}: {exc}" if str(ckpt.path) not in str(exc) else str(exc)) from None
        except (KeyError, IndexError, TypeError) as exc:
            raise CheckpointError(f"{cursor_file}: the task's cursor does not fit this run "
                                  f"({type(exc).__name__}: {exc})") from None
        # Rows and checkpoints after this one belong to the lost future (or to later phases) and are made again.
        self.forget_from(offset + start)
        log.info("resumed %s%s at step %d", self.run.id, f" ({phase})" if phase else "", start)
        return start

    def _shards(self, task: Task, step: int) -> dict[str, Path]:
        """Every rank: the task's sharded state for the checkpoint of `step`, staged beside the checkpoints."""
        staging = self.run.checkpoint_dir / f".shards-step_{step:08d}"
        if self.is_main:
            for stale in self.run.checkpoint_dir.glob(".shards-step_*"):  # left by a process killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir(parents=True)
        self.barrier()
        wrote = task.save_shards(staging)
        self.barrier()
        if not wrote and self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        return {"shards": staging} if wrote else {}

    def _checkpoint(self, task: Task, done: int, offset: int, phase: str | None) -> None:
        attach = self._shards(task, offset + done) if type(task).save_shards is not Task.save_shards else {}
        if self.is_main:
            self.metrics.flush()
            g = offset + done
            cursor = {"task": task.cursor(), "loop_step": done, "phase": phase,
                      "config_fingerprint": self.fingerprint}
            save_checkpoint(self.run.checkpoint_dir, g, task.states(), data_cursor=cursor,
                            keep=self.loop.keep_checkpoints,
                            on_file_written=self.reporter.checkpoint_file_callback(g), attach=attach)
            self.reporter.checkpoint_saved(g)
        self.barrier()

    def fit(self, task: Task, *, offset: int = 0, phase: str | None = None, prefix: str = "",
            stop_after: int | None = None) -> LoopResult:
        """Train `task` to its end from where its checkpoints left it (or for `stop_after` more steps, checkpointed
        there). Metric rows and checkpoints are numbered `offset + steps done`; names get `prefix`."""
        cfg = self.loop
        total = cfg.max_steps if cfg.max_steps is not None else task.total_steps()
        if self.dist.world_size > 1:
            task.parallelize(self.dist)
        start = self._restore(task, offset, phase)
        end = total if stop_after is None else min(total, start + stop_after)
        flops_per_step = task.flops_per_step() if self.peak is not None else None
        final: dict[str, float] = {}
        perf = f"perf/{prefix}"
        bar_ctx = progress(task.label, total=total, unit="step") if self.show_progress else nullcontext()
        with bar_ctx as bar:
            if bar is not None:
                bar.advance(start)
            for i in range(start, end):
                t0 = time.perf_counter()
                row = task.train_step(i)
                self.device.synchronize()
                elapsed = time.perf_counter() - t0
                done = i + 1
                last = done == total
                if done % cfg.log_every == 0 or last:
                    values = {f"{prefix}{k}": v for k, v in row.items()}
                    rate = task.events_per_step / elapsed
                    values[f"{perf}step_ms"] = elapsed * 1e3
                    values[f"{perf}{task.event_unit}_per_s"] = rate
                    if self.peak is not None and flops_per_step:
                        values[f"{perf}mfu"] = self.peak.mfu(flops_per_step / elapsed)
                    if done % cfg.eval_every == 0 or last:
                        values.update({f"{prefix}{k}": v for k, v in task.evaluate().items()})
                    self.metrics.log(offset + done, done * task.events_per_step, values)
                    final.update(values)
                if bar is not None:
                    bar.advance()
                    shown = row.get(task.progress_key)
                    if shown is not None and math.isfinite(shown):
                        bar.set(**{task.progress_key: shown})
                if done % cfg.checkpoint_every == 0 or last or done == end:
                    self._checkpoint(task, done, offset, phase)
                self.reporter.step_done(offset + done)
        self.metrics.flush()
        return LoopResult(self.run.id, self.run.dir, end, end * task.events_per_step, final, total)


def open_session(
    config: BaseModel,
    loop: LoopConfig,
    runs_root: str | Path,
    *,
    system: str,
    name: str,
    resume: str | None = None,
    data_files: list[Path] | None = None,
    reporter: ProgressReporter | None = None,
    show_progress: bool = True,
    measure_peak: bool = False,
) -> Session:
    """Create a run for `config` (or reopen run `resume`), with threads and device set up (see the module doc)."""
    if loop.threads:
        torch.set_num_threads(loop.threads)
    device = resolve_device(loop.device)
    # Under torchrun: join the process group (gloo on CPU, NCCL on CUDA, each rank on cuda:LOCAL_RANK).
    info = init_distributed("cuda" if device.type == "cuda" else "cpu")
    ctx = DeviceContext(info.device if info.world_size > 1 else device, loop.dtype)
    run: Run | None = None
    if info.is_main:
        if resume is None:
            run = create_run(runs_root, system=system, name=name, config=config, seed=loop.seed,
                             data_files=data_files or [])
        else:
            run = _reopen(runs_root, resume, config, system)
    if info.world_size > 1:
        run = _share_run(run, runs_root)
    assert run is not None
    # The peak depends on the thread count and device: both are set above.
    peak = load_or_measure_peak(runs_root, ctx.device) if measure_peak and info.is_main else None
    return Session(config, loop, run, resumed=resume is not None, device=ctx, reporter=reporter or
                   ProgressReporter(None), show_progress=show_progress, peak=peak, dist=info)


def _share_run(run: Run | None, runs_root: str | Path) -> Run:
    """Rank 0's run on every rank (the others read its directory; only rank 0 writes the registry)."""
    box: list[str | None] = [run.id if run is not None else None]
    torch.distributed.broadcast_object_list(box, src=0)
    if run is not None:
        return run
    assert box[0] is not None
    return run_handle(runs_root, box[0])


def _reopen(runs_root: str | Path, resume: str, config: BaseModel, system: str) -> Run:
    record = get_run(runs_root, resume)
    if record.system != system:
        raise ConfigError(f"run {record.id} is a {record.system} run, not {system}; resume it with `cambium "
                          f"{record.system}`")
    stored = load(record.dir / "config.toml", type(config))
    changed = changed_keys(stored, config)
    refused = [k for k in changed if not is_resume_safe(type(config), k)]
    if refused:
        raise ConfigError(f"resuming run {record.id} may not change {', '.join(refused)} (only lengths, intervals, "
                          "threads and device may change on resume); start a new run for another config")
    run = open_run(runs_root, record.id)
    if changed:
        update_config(run, config, changed)
        log.info("run %s resumed with %s changed", run.id, ", ".join(changed))
    return run

