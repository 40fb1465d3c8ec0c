"""Logging (JSON lines off a terminal, rich on one) and progress reporting at a bounded rate."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from cambium.core.progress import get_logger, progress, setup_logging


@pytest.fixture(autouse=True)
def restore_cambium_logger() -> Iterator[None]:
    root = logging.getLogger("cambium")
    saved = (list(root.handlers), root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_json_log_lines_parse_with_extra_fields() -> None:
    out = io.StringIO()
    setup_logging(stream=out)  # a StringIO is not a terminal: JSON lines
    log = get_logger("moe.train")
    assert log.name == "cambium.moe.train"
    log.info("step %d done", 7, extra={"step": 7, "loss": 2.5, "group": "dense"})
    log.debug("hidden at INFO")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "step 7 done" and first["level"] == "INFO" and first["logger"] == "cambium.moe.train"
    assert (first["step"], first["loss"], first["group"]) == (7, 2.5, "dense")
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"]


def test_setup_logging_replaces_its_handler_and_sets_level() -> None:
    out1, out2 = io.StringIO(), io.StringIO()
    setup_logging(json_logs=True, stream=out1)
    setup_logging(json_logs=True, level="DEBUG", stream=out2)
    get_logger("cambium.x").debug("d")
    assert out1.getvalue() == ""
    assert json.loads(out2.getvalue())["msg"] == "d"


def test_rich_handler_when_asked() -> None:
    out = io.StringIO()
    setup_logging(json_logs=False, stream=out)
    get_logger("x").warning("careful", extra={"n": 3})
    text = out.getvalue()
    assert "careful" in text and "n=3" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_non_tty_progress_is_rate_limited_and_ends_with_the_count() -> None:
    out, clock = io.StringIO(), FakeClock()
    with progress("tokenize", total=100, unit="doc", stream=out, interval_s=10.0, clock=clock) as p:
        for _ in range(100):
            clock.t += 1.0
            p.advance()
            p.set(loss=0.5)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    # 100 s of work at one line per 10 s, plus the final line.
    assert len(lines) == 11
    assert all(line["event"] == "progress" and line["msg"] == "tokenize" for line in lines)
    assert [line["count"] for line in lines[:-1]] == list(range(10, 101, 10))
    final = lines[-1]
    assert final["done"] is True and final["count"] == 100 and final["total"] == 100 and final["unit"] == "doc"
    assert final["rate"] == pytest.approx(1.0) and final["eta_s"] == 0.0 and final["loss"] == 0.5
    assert all(not line["done"] for line in lines[:-1])


def test_non_tty_progress_without_total_and_on_error() -> None:
    out, clock = io.StringIO(), FakeClock()
    with pytest.raises(RuntimeError), progress("replay", stream=out, clock=clock) as p:
        p.advance(5)
        clock.t += 2.0
        p.advance(2.5)
        raise RuntimeError("stop")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["count"] == 7.5 and lines[0]["total"] is None and lines[0]["eta_s"] is None
    assert lines[0]["error"] is True and lines[0]["done"] is True


def test_tty_progress_runs_nested() -> None:
    out = io.StringIO()
    with progress("outer", total=2, stream=out, tty=True) as outer:
        for _ in range(2):
            with progress("inner", total=3, unit="batch", stream=out, tty=True) as inner:
                for _ in range(3):
                    inner.advance()
            outer.advance()
    assert outer.count == 2 and inner.count == 3
    assert "outer" in out.getvalue()


class TtyIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_detection_picks_rich() -> None:
    out = TtyIO()
    handler = setup_logging(stream=out)
    assert type(handler).__name__ == "RichHandler"
    with progress("load", total=4, stream=out, interval_s=0.0) as p:
        p.advance(4)
    assert "load" in out.getvalue()
    assert all(not line.startswith("{") for line in out.getvalue().splitlines())
