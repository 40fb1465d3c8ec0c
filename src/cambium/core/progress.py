"""Progress and logging that suit both a terminal and a CI log.

On a terminal (stderr is a TTY) `progress()` draws a rich progress bar with count, rate and ETA, and `setup_logging()`
installs a rich console handler. Elsewhere both write one JSON object per line to stderr:

    {"ts": "2026-01-01T00:00:00.000Z", "level": "INFO", "logger": "cambium.moe.train", "msg": "...", <extra fields>}

A progress context in that mode writes a line with event="progress" at most every `interval_s` seconds (10 by default)
and always a final one with `done: true` and the final count, so long loops leave a few lines, not thousands.

`log_context(**fields)` adds fields to every record logged inside it (per thread and per asyncio task, through a
context variable), e.g. a correlation id from `correlation_id()` for one frame batch or one incident; both formatters
show them.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import orjson
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = [
    "ENV_HOLD_CHECKPOINT", "ENV_HOLD_STEP", "ENV_PROGRESS", "JsonFormatter", "ProgressHandle", "ProgressReporter",
    "correlation_id", "get_logger", "log_context", "progress", "setup_logging",
]

# The exact-resume harness (cambium.core.testing) drives a trainer through these variables; only a CLI entry point
# reads them (ProgressReporter.from_env), the library takes a reporter as an argument.
ENV_PROGRESS = "CAMBIUM_TEST_PROGRESS"
ENV_HOLD_STEP = "CAMBIUM_TEST_HOLD_STEP"
ENV_HOLD_CHECKPOINT = "CAMBIUM_TEST_HOLD_CHECKPOINT"
_HOLD_SECONDS = 120.0

# Attributes every LogRecord has; anything else on a record came from `extra=` and goes into the JSON line.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_MARK = "_cambium_handler"


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dumps(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj, default=str, option=orjson.OPT_SERIALIZE_NUMPY).decode()


_LOG_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("cambium_log_context",
                                                                                     default=None)


def correlation_id() -> str:
    """A new random correlation id (16 hex digits) for `log_context` or an `extra=` field."""
    return secrets.token_hex(8)


_CONTEXT_ATTR = "_cambium_context"
_factory_installed = False


def _install_record_factory() -> None:
    """Stamp the current `log_context` fields on each record when it is created (formatting may happen later or in
    another thread: a queue handler, pytest's capture). Installed once, at the first `log_context`."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        context = _LOG_CONTEXT.get()
        if context:
            setattr(record, _CONTEXT_ATTR, context)
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Within the block, every record logged from this thread / asyncio task also carries `fields` (nested blocks
    add to the outer ones; a record's own `extra=` fields win)."""
    _install_record_factory()
    token = _LOG_CONTEXT.set({**(_LOG_CONTEXT.get() or {}), **fields})
    try:
        yield
    finally:
        _LOG_CONTEXT.reset(token)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    own = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}
    context: dict[str, Any] | None = getattr(record, _CONTEXT_ATTR, None)
    return {**context, **own} if context else own


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, msg, extra fields, exc (if any)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        obj: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            obj.setdefault(key, value)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return _dumps(obj)


class _ExtrasFormatter(logging.Formatter):
    """Message followed by `key=value` for the extra fields (for the rich console handler)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        extras = _extras(record)
        if extras:
            msg += "  " + " ".join(f"{k}={v}" for k, v in extras.items())
        return msg


def _is_tty(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


_consoles: dict[int, Console] = {}


def _console_for(stream: IO[str]) -> Console:
    # One Console per stream so log lines and the progress bar share it and render above the bar.
    key = id(stream)
    if key not in _consoles:
        _consoles[key] = Console(file=stream)
    return _consoles[key]


def setup_logging(
    json_logs: bool | None = None, level: int | str = logging.INFO, *, stream: IO[str] | None = None
) -> logging.Handler:
    """Configure the `cambium` loggers: rich on a terminal, JSON lines otherwise (or as `json_logs` says).

    Calling it again replaces the handler it installed before. Returns the installed handler.
    """
    stream = sys.stderr if stream is None else stream
    use_json = not _is_tty(stream) if json_logs is None else json_logs
    handler: logging.Handler
    if use_json:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
    else:
        handler = RichHandler(console=_console_for(stream), show_path=False, rich_tracebacks=True)
        handler.setFormatter(_ExtrasFormatter())
    setattr(handler, _MARK, True)
    root = logging.getLogger("cambium")
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def get_logger(name: str) -> logging.Logger:
    """A logger under the `cambium` namespace (pass `__name__`; other names are prefixed with `cambium.`)."""
    if name != "cambium" and not name.startswith("cambium."):
        name = f"cambium.{name}"
    return logging.getLogger(name)


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"? {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


class ProgressHandle:
    """What `progress()` yields: call `advance(n)` as work is done; `set(**fields)` attaches values to the report."""

    def __init__(
        self,
        description: str,
        total: float | None,
        unit: str,
        emit: Callable[[ProgressHandle, bool], None],
        clock: Callable[[], float],
    ) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.count = 0.0
        self.fields: dict[str, Any] = {}
        self._emit = emit
        self._clock = clock
        self.started = clock()

    def advance(self, n: float = 1) -> None:
        self.count += n
        self._emit(self, False)

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)

    def elapsed(self) -> float:
        return self._clock() - self.started

    def snapshot(self, done: bool) -> dict[str, Any]:
        elapsed = self.elapsed()
        rate = self.count / elapsed if elapsed > 0 else None
        eta = None
        if self.total is not None and rate:
            eta = max(self.total - self.count, 0.0) / rate
        count: float | int = int(self.count) if float(self.count).is_integer() else self.count
        return {
            "event": "progress", "desc": self.description, "count": count, "total": self.total, "unit": self.unit,
            "rate": None if rate is None else round(rate, 3), "elapsed_s": round(elapsed, 3),
            "eta_s": None if eta is None else round(eta, 1), "done": done, **self.fields,
        }


_live: dict[int, tuple[Progress, list[int]]] = {}


@contextmanager
def _rich_task(handle_args: tuple[str, float | None, str], stream: IO[str]) -> Iterator[tuple[Progress, TaskID]]:
    description, total, unit = handle_args
    key = id(stream)
    if key not in _live:
        bar = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            _RateColumn(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=_console_for(stream),
        )
        bar.start()
        _live[key] = (bar, [0])
    bar, users = _live[key]
    users[0] += 1
    task = bar.add_task(description, total=total, info="")
    try:
        yield bar, task
    finally:
        bar.refresh()
        users[0] -= 1
        if users[0] == 0:
            bar.stop()
            del _live[key]


@contextmanager
def progress(
    description: str,
    total: float | None = None,
    unit: str = "it",
    *,
    stream: IO[str] | None = None,
    interval_s: float = 10.0,
    tty: bool | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[ProgressHandle]:
    """Report progress of a loop: `with progress("train", total=n, unit="step") as p: ... p.advance()`.

    tty: force the terminal (True) or JSON-lines (False) mode; by default decided by `stream.isatty()`.
    interval_s: least time between two JSON lines (the final line is always written).
    """
    stream = sys.stderr if stream is None else stream
    use_tty = _is_tty(stream) if tty is None else tty
    if use_tty:
        with _rich_task((description, total, unit), stream) as (bar, task):

            def emit_rich(h: ProgressHandle, done: bool) -> None:
                info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.fields.items())
                bar.update(task, completed=h.count, info=info)

            handle = ProgressHandle(description, total, unit, emit_rich, clock)
            yield handle
            emit_rich(handle, True)
        return

    last = [clock()]

    def emit_json(h: ProgressHandle, done: bool) -> None:
        now = clock()
        if not done and now - last[0] < interval_s:
            return
        last[0] = now
        line = {"ts": _now_iso(), "level": "INFO", "logger": "cambium.progress", "msg": h.description,
                **h.snapshot(done)}
        stream.write(_dumps(line) + "\n")
        stream.flush()

    handle = ProgressHandle(description, total, unit, emit_json, clock)
    try:
        yield handle
    except BaseException:
        handle.set(error=True)
        emit_json(handle, True)
        raise
    emit_json(handle, True)


class ProgressReporter:
    """The trainer's side of the exact-resume protocol (see cambium.core.testing): run, resumed, step and checkpoint
    events appended to a file, and optional holds where the harness kills the process. With no progress file every
    method does nothing and costs nothing."""

    def __init__(self, path: str | Path | None, *, hold_step: int | None = None,
                 hold_checkpoint: int | None = None) -> None:
        self.path = Path(path) if path else None
        self.hold_step = hold_step
        self.hold_checkpoint = hold_checkpoint
        self._held_checkpoint = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProgressReporter:
        env = os.environ if environ is None else environ
        hold_step = env.get(ENV_HOLD_STEP)
        hold_ckpt = env.get(ENV_HOLD_CHECKPOINT)
        return cls(env.get(ENV_PROGRESS) or None, hold_step=int(hold_step) if hold_step else None,
                   hold_checkpoint=int(hold_ckpt) if hold_ckpt else None)

    def run_started(self, run_id: str) -> None:
        self._emit(f"run {run_id}")

    def resumed(self, step: int) -> None:
        self._emit(f"resumed {step}")

    def step_done(self, step: int) -> None:
        self._emit(f"step {step}")
        if self.hold_step is not None and step == self.hold_step:
            time.sleep(_HOLD_SECONDS)

    def checkpoint_file_callback(self, step: int) -> Callable[[Path], None]:
        """An `on_file_written` callback for `save_checkpoint` of `step`."""

        def written(path: Path) -> None:
            self._emit(f"ckpt-file {step} {path}")
            if self.hold_checkpoint is not None and step >= self.hold_checkpoint and not self._held_checkpoint:
                self._held_checkpoint = True
                time.sleep(_HOLD_SECONDS)

        return written

    def checkpoint_saved(self, step: int) -> None:
        self._emit(f"ckpt-saved {step}")

    def _emit(self, line: str) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
