"""`cambium runs export`: a finished run's metrics read back by TensorBoard's record format and MLflow's own client
equal the rows in metrics.duckdb; a running run is refused; the run's own files are untouched."""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from cambium.cli import app
from cambium.core.errors import DataError, RunError
from cambium.core.export import MLFLOW_FILE_STORE_VAR, export_run
from cambium.core.metrics import MetricsWriter, read_metrics
from cambium.core.runs import create_run


class _Model(BaseModel):
    width: int = 8
    name: str = "export"


class _Cfg(BaseModel):
    lr: float = 0.01
    model: _Model = _Model()


def _finished_run(root: Path) -> str:
    run = create_run(root, system="moe", name="export", config=_Cfg(), seed=0)
    with MetricsWriter(run.metrics_path(), run.id) as w:
        for step in range(1, 51):
            values = {"loss": 3.0 / step, "lr/expert": 1e-3, "time:wall": float(step)}
            if step % 10 == 0:
                values["val/loss"] = math.nan if step == 30 else 2.0 / step
            w.log(step, step * 64, values)
    run.finish(summary={"loss": 3.0 / 50})
    run.close()
    return run.id


def _tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and "export" not in p.parts and p.name != "run.lock"}


def _masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path: Path) -> list[object]:
    """TFRecord framing (length, masked CRC32C of it, payload, masked CRC32C of it), each payload an Event proto."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        (length_crc,) = struct.unpack_from("<I", data, at + 8)
        assert length_crc == _masked_crc(data[at : at + 8])
        payload = data[at + 12 : at + 12 + length]
        (payload_crc,) = struct.unpack_from("<I", data, at + 12 + length)
        assert payload_crc == _masked_crc(payload)
        events.append(Event.FromString(payload))
        at += 16 + length
    return events


def test_tensorboard_event_files_hold_every_row(tmp_path: Path) -> None:
    run_id = _finished_run(tmp_path)
    run_dir = tmp_path / run_id
    before = _tree_digest(run_dir)
    done = export_run(tmp_path, run_id, "tensorboard")
    assert Path(done["out"]) == run_dir / "export" / "tensorboard" / run_id
    rows = read_metrics(run_dir / "metrics.duckdb")
    assert done["rows"] == len(rows) == 50 * 3 + 5
    files = list(Path(done["out"]).glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars = [(v.tag, e.step, v.simple_value, e.wall_time) for e in _read_events(files[0])
               if e.HasField("summary") for v in e.summary.value if v.HasField("simple_value")]
    expected = [(r.name.replace(":", "_"), r.step, r.value, r.wall_time) for r in rows]  # TensorBoard's tag rule
    assert len(scalars) == len(expected)
    for (tag, step, value, wall), (name, s, v, w) in zip(sorted(scalars), sorted(expected), strict=True):
        assert (tag, step) == (name, s) and wall == pytest.approx(w)
        assert (math.isnan(value) and math.isnan(v)) or value == pytest.approx(v, rel=1e-6)  # float32 in events
    texts = [v for e in _read_events(files[0]) if e.HasField("summary") for v in e.summary.value
             if v.tag.startswith("config")]
    assert texts and b"lr = 0.01" in texts[0].tensor.string_val[0]
    assert _tree_digest(run_dir) == before  # the run itself is untouched: resume sees what it left
    with pytest.raises(RunError, match="already holds an export"):
        export_run(tmp_path, run_id, "tensorboard")


def test_mlflow_file_store_reads_back_with_mlflows_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    run_id = _finished_run(tmp_path / "runs")
    store = tmp_path / "mlruns"
    done = export_run(tmp_path / "runs", run_id, "mlflow", store)
    assert done["out"] == str(store)
    monkeypatch.setenv(MLFLOW_FILE_STORE_VAR, "true")
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("cambium")
    assert experiment is not None
    [found] = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run_id and found.data.tags["cambium.system"] == "moe"
    assert found.info.status == "FINISHED"
    assert found.data.params["lr"] == "0.01" and found.data.params["model.width"] == "8"
    rows = read_metrics(tmp_path / "runs" / run_id / "metrics.duckdb")
    for name in ("loss", "lr/expert", "val/loss", "time:wall"):
        history = sorted(client.get_metric_history(found.info.run_id, name.replace(":", "_")), key=lambda m: m.step)
        want = [r for r in rows if r.name == name]
        assert [m.step for m in history] == [r.step for r in want]
        for m, r in zip(history, want, strict=True):
            assert (math.isnan(m.value) and math.isnan(r.value)) or m.value == r.value
            assert m.timestamp == int(r.wall_time * 1000)
    with pytest.raises(RunError, match="already holds an export"):
        export_run(tmp_path / "runs", run_id, "mlflow", store)


def test_a_running_run_and_an_unknown_format_are_refused(tmp_path: Path) -> None:
    run = create_run(tmp_path, system="moe", name="live", config=_Cfg(), seed=0)
    try:
        with pytest.raises(RunError, match="still running"):
            export_run(tmp_path, run.id, "tensorboard")
        assert not (run.dir / "export").exists()
    finally:
        run.close()
    with pytest.raises(DataError, match="not one of tensorboard, mlflow"):
        export_run(tmp_path, run.id, "csv")


def test_cli_exports_and_says_how_to_view(tmp_path: Path) -> None:
    run_id = _finished_run(tmp_path)
    result = CliRunner().invoke(app, ["runs", "export", run_id[:20], "--to", "tensorboard", "--runs-dir",
                                      str(tmp_path), "--out", str(tmp_path / "tb")])
    assert result.exit_code == 0, result.output
    assert "exported 155 rows of 4 metrics" in result.output and "tensorboard --logdir" in result.output
    assert list((tmp_path / "tb" / run_id).glob("events.out.tfevents.*"))
