"""MetricsWriter batching, the one schema, truncation on resume, validation, and readers in other processes."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from cambium.core.errors import DataError, RunError
from cambium.core.metrics import MetricsWriter, last_step, latest_values, read_metrics


def _count(path: Path) -> int:
    return len(read_metrics(path)) if path.exists() else 0


def test_schema_roundtrip_and_order(tmp_path: Path) -> None:
    path = tmp_path / "metrics.duckdb"
    with MetricsWriter(path, "run-a") as w:
        w.log(2, 200, {"loss": 1.5, "acc": 0.25})
        w.log(1, 100, {"loss": 2.0, "lr": np.float32(0.5), "grad": torch.tensor(3.0)})
    rows = read_metrics(path)
    assert [(r.step, r.name) for r in rows] == [(1, "grad"), (1, "loss"), (1, "lr"), (2, "acc"), (2, "loss")]
    assert [r.value for r in rows] == [3.0, 2.0, 0.5, 0.25, 1.5]
    assert {r.run_id for r in rows} == {"run-a"} and rows[0].tokens_or_events == 100
    assert all(r.wall_time > 1.7e9 for r in rows)
    con = duckdb.connect(str(path), read_only=True)
    columns = con.execute("SELECT column_name, data_type FROM information_schema.columns "
                          "WHERE table_name = 'metrics' ORDER BY ordinal_position").fetchall()
    con.close()
    assert columns == [("run_id", "VARCHAR"), ("step", "BIGINT"), ("tokens_or_events", "BIGINT"),
                       ("name", "VARCHAR"), ("value", "DOUBLE"), ("wall_time", "DOUBLE")]
    assert [r.name for r in read_metrics(path, names=["loss"])] == ["loss", "loss"]
    assert read_metrics(path, run_id="other") == []
    assert latest_values(path) == {"acc": (2, 0.25), "grad": (1, 3.0), "loss": (2, 1.5), "lr": (1, 0.5)}
    assert last_step(path) == 2


def test_non_finite_values_are_observations(tmp_path: Path) -> None:
    path = tmp_path / "m.duckdb"
    with MetricsWriter(path, "r") as w:
        w.log(1, 0, {"nan": float("nan"), "inf": math.inf, "ninf": -math.inf})
    values = {r.name: r.value for r in read_metrics(path)}
    assert math.isnan(values["nan"]) and values["inf"] == math.inf and values["ninf"] == -math.inf


def test_batches_by_rows_and_by_time(tmp_path: Path) -> None:
    path = tmp_path / "rows.duckdb"
    w = MetricsWriter(path, "r", flush_rows=4, flush_seconds=1e9)
    w.log(1, 1, {"a": 1.0, "b": 2.0})
    assert not path.exists()
    w.log(2, 2, {"a": 1.0, "b": 2.0})
    assert _count(path) == 4
    w.log(3, 3, {"a": 1.0})
    assert _count(path) == 4
    w.flush()
    assert _count(path) == 5 and w.rows_written == 5
    w.close()
    with pytest.raises(RunError, match="closed"):
        w.log(4, 4, {"a": 1.0})

    timed = MetricsWriter(tmp_path / "time.duckdb", "r", flush_rows=10**6, flush_seconds=0.0)
    timed.log(1, 1, {"a": 1.0})
    assert _count(tmp_path / "time.duckdb") == 1
    timed.close()


def test_truncate_after_on_disk_and_in_buffer(tmp_path: Path) -> None:
    path = tmp_path / "m.duckdb"
    w = MetricsWriter(path, "r", flush_rows=10**6)
    for step in range(1, 11):
        w.log(step, step * 10, {"loss": float(step)})
    w.flush()
    other = MetricsWriter(path, "other-run")
    other.log(9, 0, {"loss": 0.0})
    other.close()
    w.log(11, 110, {"loss": 11.0})
    assert w.truncate_after(6) == 4
    w.log(7, 70, {"loss": -7.0})
    w.close()
    mine = read_metrics(path, run_id="r")
    assert [(r.step, r.value) for r in mine] == [(s, float(s)) for s in range(1, 7)] + [(7, -7.0)]
    assert len(read_metrics(path, run_id="other-run")) == 1
    assert MetricsWriter(tmp_path / "fresh.duckdb", "r").truncate_after(0) == 0


@pytest.mark.parametrize("name", ["", "1abc", "a b", "x;drop", "é", "a" * 129])
def test_bad_names_rejected(tmp_path: Path, name: str) -> None:
    w = MetricsWriter(tmp_path / "m.duckdb", "r")
    with pytest.raises(DataError, match="metric name"):
        w.log(1, 1, {name: 1.0})


def test_bad_values_and_counts_rejected(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path / "m.duckdb", "r")
    with pytest.raises(DataError, match="not a number"):
        w.log(1, 1, {"loss": "high"})
    with pytest.raises(DataError, match="step=-1"):
        w.log(-1, 1, {"loss": 1.0})
    with pytest.raises(DataError, match=r"tokens_or_events=1\.5"):
        w.log(1, 1.5, {"loss": 1.0})
    w.log(np.int64(3), torch.tensor(7), {"ok/name.with-parts:x": 1.0})
    w.close()
    assert [(r.step, r.tokens_or_events) for r in read_metrics(tmp_path / "m.duckdb")] == [(3, 7)]
    with pytest.raises(DataError, match="does not exist"):
        read_metrics(tmp_path / "absent.duckdb")


_HOLD_READER = textwrap.dedent("""
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1], read_only=True)
    n = con.execute("SELECT count(*) FROM metrics").fetchone()[0]
    print(n, flush=True)
    time.sleep(float(sys.argv[2]))
    con.close()
""")


def test_other_process_reads_between_flushes_and_writer_waits_for_it(tmp_path: Path) -> None:
    path = tmp_path / "m.duckdb"
    w = MetricsWriter(path, "r", flush_rows=2, lock_timeout_s=60)
    w.log(1, 1, {"a": 1.0, "b": 2.0})
    # The writer is alive but holds no connection, so another process can open the file.
    reader = subprocess.Popen([sys.executable, "-c", _HOLD_READER, str(path), "1.5"], stdout=subprocess.PIPE,
                              text=True)
    assert reader.stdout is not None
    assert reader.stdout.readline().strip() == "2"
    # While the reader holds the file a periodic flush is deferred (counted, rows kept) ...
    w.log(2, 2, {"a": 3.0, "b": 4.0})
    assert w.deferred_flushes == 1
    # ... and an explicit flush waits for the reader to let go.
    w.flush()
    reader.wait(timeout=60)
    assert reader.returncode == 0
    w.close()
    assert [r.value for r in read_metrics(path)] == [1.0, 2.0, 3.0, 4.0]


def test_per_rank_files(tmp_path: Path) -> None:
    from pydantic import Field

    from cambium.core.config import ConfigModel
    from cambium.core.runs import create_run

    class C(ConfigModel):
        a: int = Field(1, description="a")

    run = create_run(tmp_path, system="s", name="n", config=C(), seed=0)
    assert run.metrics_path().name == "metrics.duckdb"
    assert run.metrics_path(rank=3).name == "metrics.rank3.duckdb"
    for rank in (0, 1):
        with MetricsWriter(run.metrics_path(rank), run.id) as w:
            w.log(1, 1, {"rank": float(rank)})
    assert read_metrics(run.metrics_path(1))[0].value == 1.0
