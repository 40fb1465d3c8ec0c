"""The server-side aggregation the dashboard draws from: DuckDB's downsampled curves and expert matrices equal the
plain-Python reference over every row, for any rows (non-finite values and repeated steps included)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.core.errors import DataError
from cambium.core.metrics import MetricRow, MetricsWriter, read_metrics
from cambium.core.registry import RunRecord
from cambium.dashboard import queries

VALUES = st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf]))
ROWS = st.lists(st.tuples(st.integers(0, 5000), st.sampled_from(["loss", "lr", "val/loss"]), VALUES),
                min_size=0, max_size=300)


def _write(run_dir: Path, rows: list[tuple[int, str, float]]) -> list[MetricRow]:
    with MetricsWriter(run_dir / "metrics.duckdb", "r", flush_rows=10_000) as w:
        for step, name, value in rows:
            w.log(step, step, {name: value})
    return read_metrics(run_dir / "metrics.duckdb") if rows else []


def _same(a: list[float | None], b: list[float | None]) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9,
                                                                                        abs_tol=1e-6))
        for x, y in zip(a, b, strict=True))


@given(rows=ROWS, points=st.integers(1, 400), since=st.one_of(st.none(), st.integers(-1, 5000)))
@settings(max_examples=25, deadline=None)
def test_series_equals_the_python_reference(rows: list[tuple[int, str, float]], points: int,
                                            since: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        stored = _write(run_dir, rows)
        fast = queries.series(run_dir, ["loss", "lr", "val/loss", "absent"], points, since) if rows else {}
        for name in ("loss", "lr", "val/loss"):
            ref = queries.series_reference(stored, name, points, since)
            got = fast.get(name, queries.Series([], [], [], []))
            assert got.step == ref.step
            assert len(got.step) <= points
            assert _same(got.value, ref.value) and _same(got.low, ref.low) and _same(got.high, ref.high)
        assert "absent" not in fast


def test_a_long_run_comes_back_at_the_requested_width(tmp_path: Path) -> None:
    _write(tmp_path, [(s, "loss", 10.0 / s) for s in range(1, 20_001)])
    s = queries.series(tmp_path, ["loss"], 500)["loss"]
    assert len(s.step) == 500 and s.step[-1] == 20_000 and s.step[0] == 40
    assert s.value[0] == pytest.approx(sum(10.0 / k for k in range(1, 41)) / 40)
    assert s.low[0] == pytest.approx(10.0 / 40) and s.high[0] == pytest.approx(10.0)


def test_expert_matrices_equal_the_python_reference(tmp_path: Path) -> None:
    rows = []
    for step in range(3, 301, 3):
        for e in range(6):
            rows += [(step, f"moe/l2/load/e{e}", (e + 1) * step % 7 / 10), (step, f"moe/l2/bias/e{e}", e - step),
                     (step, f"moe/l11/load/e{e}", -e)]
    rows.append((9, "moe/l2/load/e10x", 1.0))  # not an expert row: ignored
    _write(tmp_path, rows)
    found = queries.expert_matrices(tmp_path, "load", 20)
    assert set(found) == {2, 11}
    m = found[2]
    assert m.experts == list(range(6)) and len(m.steps) == 20
    steps = list(range(3, 301, 3))
    for j, last in enumerate(m.steps):
        members = [s for s in steps if (s - 3) * 20 // (300 - 3 + 1) == j]
        assert last == max(members)
        for e in range(6):
            assert m.z[e][j] == pytest.approx(sum((e + 1) * s % 7 / 10 for s in members) / len(members))
    assert found[11].z == [[-e] * 20 for e in range(6)]
    assert set(queries.expert_matrices(tmp_path, "load", 20, layer=11)) == {11}
    assert queries.expert_matrices(tmp_path, "bias", 1000)[2].z[5][-1] == 5 - 300
    assert queries.expert_layers(n for _, n, _ in rows) == {"bias": [2], "load": [2, 11]}
    with pytest.raises(DataError, match="kind"):
        queries.expert_matrices(tmp_path, "weights", 10)


@pytest.mark.parametrize("path", ["../x.png", "a/../../x.png", "/etc/passwd", "", "x\x00.png", "config.toml",
                                  "..", ".", "a" * 300 + "/x.png"])
def test_run_file_refuses_anything_but_an_image_inside_the_run(tmp_path: Path, path: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("a = 1\n")
    (tmp_path / "x.png").write_bytes(b"png")
    record = RunRecord("run", "moe", "n", "finished", "", "", "", run_dir)
    with pytest.raises(DataError):
        queries.run_file(record, path)


def test_reading_while_another_process_writes(tmp_path: Path) -> None:
    """The training process flushes between the dashboard's queries: both go on, neither fails nor loses rows."""
    import subprocess
    import sys

    script = ("import sys\nfrom cambium.core.metrics import MetricsWriter\n"
              "w = MetricsWriter(sys.argv[1], 'r', flush_rows=1)\n"
              "for s in range(1, 121):\n    w.log(s, s, {'loss': 1.0 / s})\nw.close()\n")
    path = tmp_path / "metrics.duckdb"
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)])
    seen = 0
    try:
        while proc.poll() is None:
            if path.is_file():
                got = queries.series(tmp_path, ["loss"], 1000).get("loss")
                if got is not None:
                    assert got.step == list(range(1, len(got.step) + 1))  # a prefix: whole flushes only
                    seen = max(seen, len(got.step))
    finally:
        assert proc.wait(timeout=120) == 0
    assert queries.series(tmp_path, ["loss"], 1000)["loss"].step == list(range(1, 121))
    assert seen > 0
