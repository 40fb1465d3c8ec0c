"""What the dashboard reads: runs from the registry, metric curves and expert-load matrices aggregated in DuckDB, and
the files systems leave in their run directories.

Curves are downsampled on the server so a 100k-step run costs a page what a 1k-step one does: the steps of a metric
are cut into `points` equal-width buckets and each bucket becomes one point (its last step, the mean of its finite
values, and their min and max for the band). A metric with at most `points` rows comes back exactly. `series_reference`
is the same definition in plain Python over every row; tests compare the two.

Non-finite values (a diverged loss) are left out of the aggregates, and a bucket with none finite has value None, so
the JSON stays valid and the chart shows a gap.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from cambium.core.errors import DataError, RunError
from cambium.core.metrics import MetricRow, validate_name
from cambium.core.registry import RunRecord

__all__ = [
    "IMAGE_SUFFIXES",
    "ExpertMatrix",
    "Series",
    "artifacts",
    "expert_layers",
    "expert_matrices",
    "metric_names",
    "morph_seeds",
    "run_digest",
    "run_file",
    "screener_status",
    "series",
    "series_reference",
]

IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                  ".webp": "image/webp"}
_EXPERT_RE = re.compile(r"^moe/l(\d+)/(load|bias)/e(\d+)$")
_LOCK_WORDS = ("lock", "conflicting", "being used", "already open")
T = TypeVar("T")


@dataclass(frozen=True)
class Series:
    """One downsampled curve: per point the last step of its bucket, the mean and the min/max of its values."""

    step: list[int]
    value: list[float | None]
    low: list[float | None]
    high: list[float | None]

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "value": self.value, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class ExpertMatrix:
    """`z[e][j]`: the mean of `moe/l{layer}/{kind}/e{e}` over the steps of bucket j (last step `steps[j]`)."""

    steps: list[int]
    experts: list[int]
    z: list[list[float | None]]


def metrics_file(run_dir: Path) -> Path | None:
    """The run's metrics file (rank 0 writes every row of a data-parallel run), or None before the first flush."""
    path = run_dir / "metrics.duckdb"
    return path if path.is_file() else None


class _Attached:
    """One in-memory DuckDB per process; each query attaches the run's file read-only and detaches it after.

    Attaching costs well under a millisecond where opening a database costs ~15 ms, and a page makes several
    queries. Nothing stays attached between queries: the training process must be able to take the file for its next
    flush. One file is attached by one query at a time (DuckDB refuses a file attached twice), different files in
    parallel, each query on a cursor of its own thread."""

    def __init__(self) -> None:
        self._db: duckdb.DuckDBPyConnection | None = None
        self._guard = threading.Lock()
        self._files: dict[str, threading.Lock] = {}
        self._count = 0

    def run(self, path: Path, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        with self._guard:
            if self._db is None:
                self._db = duckdb.connect(":memory:")
            file_lock = self._files.setdefault(str(path), threading.Lock())
            self._count += 1
            alias = f"run{self._count}"
            cur = self._db.cursor()
        quoted = str(path).replace("'", "''")
        try:
            with file_lock:
                cur.execute(f"ATTACH '{quoted}' AS {alias} (READ_ONLY)")
                try:
                    cur.execute(f"USE {alias}")
                    return work(cur)
                finally:
                    cur.execute("USE memory")
                    cur.execute(f"DETACH {alias}")
        finally:
            cur.close()


_ATTACHED = _Attached()


def _query(path: Path, work: Callable[[duckdb.DuckDBPyConnection], T], timeout: float = 5.0) -> T:
    """Run `work` on the run's metrics file (read-only), retrying while the training process holds it for a flush."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return _ATTACHED.run(path, work)
        except duckdb.CatalogException as exc:
            raise DataError(f"metrics file {str(path)!r} has no metrics table: {exc}") from None
        except duckdb.Error as exc:
            text = str(exc).lower()
            if not any(w in text for w in _LOCK_WORDS):
                raise DataError(f"cannot read metrics file {str(path)!r}: {exc}") from None
            if time.monotonic() >= deadline:
                raise RunError(f"metrics file {str(path)!r} stayed locked for {timeout:.0f} s; try again") from None
            time.sleep(delay)
            delay = min(2 * delay, 0.2)


def metric_names(run_dir: Path) -> dict[str, dict[str, int]]:
    """name -> {rows, first, last} (steps) for every metric of the run."""
    path = metrics_file(run_dir)
    if path is None:
        return {}
    rows = _query(path, lambda con: con.execute(
        "SELECT name, count(*), min(step), max(step) FROM metrics GROUP BY name ORDER BY name").fetchall())
    return {n: {"rows": int(c), "first": int(a), "last": int(b)} for n, c, a, b in rows}


def run_digest(run_dir: Path, headline: Sequence[str]) -> dict[str, Any]:
    """The highest step, the row count and the latest value of each `headline` metric the run has (one query)."""
    path = metrics_file(run_dir)
    if path is None:
        return {"steps": None, "rows": 0, "latest": {}}
    wanted = [validate_name(n) for n in headline]
    marks = ", ".join("?" for _ in wanted) or "NULL"

    def work(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
        steps, rows = con.execute("SELECT max(step), count(*) FROM metrics").fetchone() or (None, 0)
        latest = con.execute(
            f"SELECT name, arg_max(value, step) FROM metrics WHERE name IN ({marks}) GROUP BY name", wanted
        ).fetchall()
        return {"steps": None if steps is None else int(steps), "rows": int(rows),
                "latest": {n: _finite(v) for n, v in latest}}

    return _query(path, work)


def series(run_dir: Path, names: Iterable[str], points: int, since: int | None = None) -> dict[str, Series]:
    """Each of `names` downsampled to at most `points` points over its steps (> `since` when given).

    Names the run does not have are absent from the result."""
    wanted = sorted({validate_name(n) for n in names})
    path = metrics_file(run_dir)
    if path is None or not wanted or points < 1:
        return {}
    marks = ", ".join("?" for _ in wanted)
    sql = f"""
        WITH src AS (
            SELECT name, step, CASE WHEN isfinite(value) THEN value END AS v FROM metrics
            WHERE name IN ({marks}) AND step > ?),
        span AS (SELECT name, min(step) AS lo, max(step) AS hi, count(*) AS n FROM src GROUP BY name),
        bucketed AS (
            SELECT src.name, src.step, src.v,
                   CASE WHEN span.n <= ? THEN src.step
                        ELSE ((src.step - span.lo) * ?) // (span.hi - span.lo + 1) END AS b
            FROM src JOIN span USING (name))
        SELECT name, max(step), avg(v), min(v), max(v) FROM bucketed GROUP BY name, b ORDER BY name, max(step)"""
    params = [*wanted, -1 if since is None else since, points, points]
    rows = _query(path, lambda con: con.execute(sql, params).fetchall())
    out: dict[str, Series] = {}
    for name, step, mean, low, high in rows:
        s = out.setdefault(name, Series([], [], [], []))
        s.step.append(int(step))
        s.value.append(_finite(mean))
        s.low.append(_finite(low))
        s.high.append(_finite(high))
    return out


def series_reference(rows: Sequence[MetricRow], name: str, points: int, since: int | None = None) -> Series:
    """`series` for one name, in plain Python over every row: the slow reference the tests hold DuckDB's to."""
    data = [(r.step, r.value) for r in rows if r.name == name and (since is None or r.step > since)]
    out = Series([], [], [], [])
    if not data:
        return out
    lo, hi, n = min(s for s, _ in data), max(s for s, _ in data), len(data)
    buckets: dict[int, list[tuple[int, float]]] = {}
    for step, value in data:
        b = step if n <= points else (step - lo) * points // (hi - lo + 1)
        buckets.setdefault(b, []).append((step, value))
    for _, members in sorted(buckets.items(), key=lambda kv: max(s for s, _ in kv[1])):
        finite = [v for _, v in members if math.isfinite(v)]
        out.step.append(max(s for s, _ in members))
        out.value.append(sum(finite) / len(finite) if finite else None)
        out.low.append(min(finite) if finite else None)
        out.high.append(max(finite) if finite else None)
    return out


def expert_layers(names: Iterable[str]) -> dict[str, list[int]]:
    """kind ("load", "bias") -> the MoE layers that have per-expert rows of it, from the run's metric names."""
    found: dict[str, set[int]] = {}
    for name in names:
        m = _EXPERT_RE.match(name)
        if m:
            found.setdefault(m.group(2), set()).add(int(m.group(1)))
    return {kind: sorted(layers) for kind, layers in sorted(found.items())}


def expert_matrices(run_dir: Path, kind: str, points: int, layer: int | None = None) -> dict[int, ExpertMatrix]:
    """layer -> the per-expert `kind` ("load" or "bias") values of that MoE layer over steps, downsampled to at most
    `points` step buckets (shared by every layer: the trainer logs them together); only `layer` when given.

    One query for every layer, so a page with a heatmap per layer opens the metrics file once."""
    if kind not in ("load", "bias"):
        raise DataError(f"expert matrix kind {kind!r} must be 'load' or 'bias'")
    path = metrics_file(run_dir)
    if path is None or points < 1:
        return {}
    pattern = rf"^moe/l({int(layer) if layer is not None else '[0-9]{1,6}'})/{kind}/e([0-9]{{1,6}})$"
    sql = """
        WITH src AS (
            SELECT CAST(regexp_extract(name, ?, 1) AS BIGINT) AS l, CAST(regexp_extract(name, ?, 2) AS BIGINT) AS e,
                   step, CASE WHEN isfinite(value) THEN value END AS v
            FROM metrics WHERE starts_with(name, 'moe/l') AND regexp_full_match(name, ?)),
        span AS (SELECT min(step) AS lo, max(step) AS hi, count(DISTINCT step) AS n FROM src),
        bucketed AS (
            SELECT l, e, step, v, CASE WHEN span.n <= ? THEN step
                                       ELSE ((step - span.lo) * ?) // (span.hi - span.lo + 1) END AS b
            FROM src, span)
        SELECT l, e, b, max(step), avg(v) FROM bucketed GROUP BY l, e, b ORDER BY l, e, b"""
    rows = _query(path, lambda con: con.execute(sql, [pattern, pattern, pattern, points, points]).fetchall())
    out: dict[int, ExpertMatrix] = {}
    for lay in sorted({int(r[0]) for r in rows}):
        mine = [r for r in rows if r[0] == lay]
        buckets = sorted({int(b) for _, _, b, _, _ in mine})
        experts = sorted({int(e) for _, e, _, _, _ in mine})
        col = {b: j for j, b in enumerate(buckets)}
        row = {e: i for i, e in enumerate(experts)}
        last = [0] * len(buckets)
        z: list[list[float | None]] = [[None] * len(buckets) for _ in experts]
        for _, e, b, step, mean in mine:
            j = col[int(b)]
            last[j] = max(last[j], int(step))
            z[row[int(e)]][j] = _finite(mean)
        out[lay] = ExpertMatrix(last, experts, z)
    return out


def morph_seeds(run_dir: Path) -> dict[str, Any] | None:
    """Seed timelines from a morph run's report.json: per seed its final state and its state spans over epochs."""
    report = _read_json(run_dir / "report.json")
    if not isinstance(report, dict) or not isinstance(report.get("seeds"), dict):
        return None
    end = int(report.get("epochs_done") or 0)
    seeds = []
    for loc, info in sorted(report["seeds"].items()):
        if not isinstance(info, dict):
            continue
        spans, state, since = [], "DORMANT", 0
        for change in info.get("timeline") or []:
            if not isinstance(change, dict):
                continue
            epoch = int(change.get("epoch", since))
            spans.append({"state": state, "start": since, "end": epoch})
            state, since = str(change.get("target", state)), epoch
        spans.append({"state": state, "start": since, "end": max(end, since)})
        seeds.append({"seed": str(loc), "state": str(info.get("state", state)), "spans": spans,
                      "changes": info.get("timeline") or []})
    return {"epochs_done": end, "seeds": seeds,
            "test_acc": report.get("test_acc"), "params": report.get("params"),
            "host_params": report.get("host_params")}


def artifacts(run_dir: Path) -> dict[str, Any]:
    """Evaluation tables (nested eval*.json, worldmodel report/probe.json) and the report images of a run."""
    tables: list[dict[str, Any]] = []
    for path in sorted(run_dir.glob("eval*.json")):
        data = _read_json(path)
        if isinstance(data, dict):
            tables.append({"file": path.name, "columns": ["metric", "value"],
                           "rows": [[k, _cell(v)] for k, v in sorted(data.items())]})
    probe = _read_json(run_dir / "report" / "probe.json")
    if isinstance(probe, dict) and isinstance(probe.get("results"), list):
        columns = ["features", "dim", "r2", "accuracy", "ridge_alpha", "logistic_l2"]
        rows = [[_cell(r.get(c)) for c in columns] for r in probe["results"] if isinstance(r, dict)]
        rows.append(["majority direction", None, None, _cell(probe.get("majority_accuracy")), None, None])
        tables.append({"file": "report/probe.json", "columns": columns, "rows": rows})
    return {"tables": tables, "images": _images(run_dir)}


def screener_status(run_dir: Path) -> dict[str, Any] | None:
    """A live screener's `status.json` in its run directory (the document of its /api/status), if one is there."""
    data = _read_json(run_dir / "status.json")
    return data if isinstance(data, dict) else None


def run_file(record: RunRecord, relative: str) -> Path:
    """The image `relative` inside the run's directory; DataError for anything else (traversal, links out, other
    kinds of file), so no route serves a file from outside a run directory."""
    root = Path(record.dir).resolve()
    if not relative or "\x00" in relative or relative.startswith(("/", "\\")):
        raise DataError(f"file path {relative!r} is not a path inside run {record.id}")
    try:
        target = (root / relative).resolve()
    except (OSError, ValueError, RuntimeError):
        raise DataError(f"file path {relative!r} is not a path inside run {record.id}") from None
    if not target.is_relative_to(root) or target == root:
        raise DataError(f"file path {relative!r} leaves the directory of run {record.id}")
    if target.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"file {relative!r}: only images ({', '.join(sorted(IMAGE_SUFFIXES))}) are served")
    try:
        found = target.is_file()
    except OSError:  # a name too long for the file system, say
        raise DataError(f"file path {relative!r} is not a path inside run {record.id}") from None
    if not found:
        raise FileNotFoundError(relative)
    return target


def _images(run_dir: Path, depth: int = 3, limit: int = 50) -> list[str]:
    """Image files up to `depth` directories down, checkpoints skipped (they can hold thousands of files)."""
    found: list[str] = []
    for top, dirs, files in os.walk(run_dir):
        rel = Path(top).relative_to(run_dir)
        dirs[:] = sorted(d for d in dirs if d != "checkpoints" and len(rel.parts) < depth)
        found += [str(rel / f) for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        if len(found) >= limit:
            break
    return sorted(found)[:limit]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int | str) or value is None:
        return value
    return json.dumps(value)
