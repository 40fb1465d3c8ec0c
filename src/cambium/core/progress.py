"""Progress and logging that suit both a terminal and a CI log.

On a terminal (stderr is a TTY) `progress()` draws a rich progress bar with count, rate and ETA, and `setup_logging()`
installs a rich console handler. Elsewhere both write one JSON object per line to stderr:

    {"ts": "2026-01-01T00:00:00.000Z", "level": "INFO", "logger": "cambium.moe.train", "msg": "...", <extra fields>}

A progress context in that mode writes a line with event="progress" at most every `interval_s` seconds (10 by default)
and always a final one with `done: true` and the final count, so long loops leave a few lines, not thousands.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

__all__ = ["JsonFormatter", "ProgressHandle", "get_logger", "progress", "setup_logging"]

# Attributes every LogRecord has; anything else on a record came from `extra=` and goes into the JSON line.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_MARK = "_cambium_handler"


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dumps(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj, default=str, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


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
