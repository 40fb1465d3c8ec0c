"""`cambium runs export`: a finished run's metrics in the formats TensorBoard and MLflow read.

    tensorboard   event files (tensorboardX) under `<out>/<run_id>/`: one scalar per metric row (tag = metric name,
                  step, wall time as logged; tensorboardX turns ':' into '_' in tags) and the resolved config as a
                  text summary.
    mlflow        an MLflow file store (the `mlruns` layout) at `<out>`: one MLflow run in experiment `cambium`
                  named after the run id, tagged `cambium.run_id`/`cambium.system`, the flattened config as params
                  and every metric row with its step and timestamp. MLflow refuses ':' in metric names, so it
                  becomes '_' there. MLflow 3 keeps its file store in maintenance mode: reading it needs
                  MLFLOW_ALLOW_FILE_STORE=true (`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri
                  file:///abs/out`).

Export reads the run and writes only under `<out>` (default `<run_dir>/export/<format>`), so checkpoints, metrics and
exact resume are untouched. A run still running is refused: its metrics are not complete. Exporting the same run into
the same place twice is refused too, rather than doubling every curve.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cambium.core.errors import DataError, RunError
from cambium.core.metrics import MetricRow, read_metrics
from cambium.core.registry import RunRecord
from cambium.core.runs import get_run

__all__ = ["FORMATS", "MLFLOW_FILE_STORE_VAR", "export_run", "flatten"]

FORMATS = ("tensorboard", "mlflow")
MLFLOW_EXPERIMENT = "cambium"
MLFLOW_FILE_STORE_VAR = "MLFLOW_ALLOW_FILE_STORE"
_BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics per call


def export_run(root: str | Path, run: str, to: str, out: str | Path | None = None,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write run `run`'s metrics (and config) as `to` ("tensorboard" or "mlflow") under `out`; returns a summary
    {format, out, rows, names}. `progress(n)` is called with the rows written so far."""
    if to not in FORMATS:
        raise DataError(f"export format {to!r} is not one of {', '.join(FORMATS)}")
    record = get_run(root, run)
    if record.status == "running":
        raise RunError(f"run {record.id} is still running (pid {record.pid} on {record.host}); export it after it "
                       "ends, its metrics are not complete yet")
    path = Path(record.dir) / "metrics.duckdb"
    rows = read_metrics(path) if path.is_file() else []
    target = Path(out) if out is not None else Path(record.dir) / "export" / to
    config = _read_config(record)
    if to == "tensorboard":
        where = _tensorboard(record, rows, config, target, progress)
    else:
        where = _mlflow(record, rows, config, target, progress)
    return {"format": to, "out": str(where), "rows": len(rows), "names": len({r.name for r in rows})}


def _tensorboard(record: RunRecord, rows: list[MetricRow], config: tuple[str, dict[str, Any]], out: Path,
                 progress: Callable[[int], None] | None) -> Path:
    from tensorboardX import SummaryWriter

    logdir = out / record.id
    if logdir.exists() and any(logdir.iterdir()):
        raise RunError(f"{logdir} already holds an export of run {record.id}; delete it or pass another --out")
    logdir.mkdir(parents=True, exist_ok=True)
    with SummaryWriter(logdir=str(logdir), flush_secs=3600) as writer:
        text, _ = config
        first = rows[0].wall_time if rows else None
        writer.add_text("config", "```toml\n" + text + "\n```", global_step=0, walltime=first)
        for i, r in enumerate(rows):
            writer.add_scalar(r.name, r.value, global_step=r.step, walltime=r.wall_time)
            if progress is not None and (i + 1) % 10_000 == 0:
                progress(i + 1)
    return logdir


def _mlflow(record: RunRecord, rows: list[MetricRow], config: tuple[str, dict[str, Any]], out: Path,
            progress: Callable[[int], None] | None) -> Path:
    from mlflow.tracking import MlflowClient

    out.mkdir(parents=True, exist_ok=True)
    with _file_store_allowed():
        client = MlflowClient(tracking_uri=out.resolve().as_uri())
        return _mlflow_write(client, record, rows, config, out, progress)


def _mlflow_write(client: Any, record: RunRecord, rows: list[MetricRow], config: tuple[str, dict[str, Any]],
                  out: Path, progress: Callable[[int], None] | None) -> Path:
    from mlflow.entities import Metric, Param, RunStatus

    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    exp_id = experiment.experiment_id if experiment is not None else client.create_experiment(MLFLOW_EXPERIMENT)
    same = client.search_runs([exp_id], filter_string=f"tags.`cambium.run_id` = '{record.id}'")
    if same:
        raise RunError(f"{out} already holds an export of run {record.id} (MLflow run {same[0].info.run_id}); "
                       "delete it or pass another --out")
    start = int(rows[0].wall_time * 1000) if rows else None
    run = client.create_run(exp_id, start_time=start, run_name=record.id,
                            tags={"cambium.run_id": record.id, "cambium.system": record.system,
                                  "cambium.name": record.name, "cambium.status": record.status})
    _, flat = config
    params = [Param(k[:250], _param_value(v)) for k, v in sorted(flat.items())]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    for i in range(0, len(rows), _BATCH):
        batch = [Metric(r.name.replace(":", "_"), r.value, int(r.wall_time * 1000), r.step)
                 for r in rows[i : i + _BATCH]]
        client.log_batch(run.info.run_id, metrics=batch)
        if progress is not None:
            progress(i + len(batch))
    end = int(rows[-1].wall_time * 1000) if rows else None
    status = {"finished": RunStatus.FINISHED, "failed": RunStatus.FAILED}.get(record.status, RunStatus.KILLED)
    client.set_terminated(run.info.run_id, status=RunStatus.to_string(status), end_time=end)
    return out


@contextmanager
def _file_store_allowed() -> Iterator[None]:
    """MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE=true (it is in maintenance mode, still read by
    `mlflow ui`); set it for the export only, and put back what was there."""
    before = os.environ.get(MLFLOW_FILE_STORE_VAR)
    os.environ[MLFLOW_FILE_STORE_VAR] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MLFLOW_FILE_STORE_VAR, None)
        else:
            os.environ[MLFLOW_FILE_STORE_VAR] = before


def _read_config(record: RunRecord) -> tuple[str, dict[str, Any]]:
    """The run's config.toml as text and flattened to dotted keys ({} when it is missing or unreadable)."""
    path = Path(record.dir) / "config.toml"
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "", {}
    return text, flatten(data)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A parsed TOML document as {dotted key: value} (tables descended, arrays kept as values)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]  # MLflow's limit on a param value
