"""`cambium doctor`: measurements are real positive numbers, peaks are stored and re-read, the command runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from cambium.core import doctor
from cambium.core.errors import DeviceError, RunError


def test_measurements_are_positive_and_finite_at_tiny_size() -> None:
    gflops = doctor.measure_matmul_peak("cpu", n=64, runs=2)
    gbs = doctor.measure_memory_bandwidth("cpu", megabytes=1, runs=2)
    for value in (gflops, gbs):
        assert math.isfinite(value) and value > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_measurement_without_cuda_is_a_device_error() -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        doctor.measure_matmul_peak("cuda", n=8)


def test_fingerprint_and_facts() -> None:
    facts = doctor.machine_facts("cpu")
    assert facts["torch"] == torch.__version__ and facts["torch_threads"] == torch.get_num_threads()
    assert facts["cpu_logical"] >= 1 and facts["ram_gb"] > 0
    fp = doctor.machine_fingerprint("cpu")
    assert len(fp) == 16 and fp == doctor.machine_fingerprint("cpu")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if old != 1 else 2)
        assert doctor.machine_fingerprint("cpu") != fp  # thread count changes the peak, hence the key
    finally:
        torch.set_num_threads(old)


def test_peak_json_is_written_and_reread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    peak = doctor.load_or_measure_peak(tmp_path, "cpu", n=64, runs=2, copy_mb=1)
    path = tmp_path / doctor.PEAKS_FILE
    stored = json.loads(path.read_text())
    assert list(stored) == [peak.fingerprint]
    assert stored[peak.fingerprint]["matmul_gflops"] == peak.matmul_gflops > 0
    assert stored[peak.fingerprint]["bandwidth_gbs"] == peak.bandwidth_gbs > 0

    def no_measuring(*args: object, **kwargs: object) -> float:
        raise AssertionError("a stored peak must be re-read, not measured again")

    monkeypatch.setattr(doctor, "measure_matmul_peak", no_measuring)
    monkeypatch.setattr(doctor, "measure_memory_bandwidth", no_measuring)
    again = doctor.load_or_measure_peak(tmp_path, "cpu", n=64)
    assert again == peak
    assert again.mfu(peak.matmul_gflops * 1e9 / 4) == pytest.approx(0.25)
    monkeypatch.undo()
    other_size = doctor.load_or_measure_peak(tmp_path, "cpu", n=32, runs=1, copy_mb=1)
    assert other_size.matmul_n == 32 and other_size.measured_at >= peak.measured_at


def test_corrupt_peaks_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / doctor.PEAKS_FILE).write_text("{not json")
    with pytest.raises(RunError, match="delete the file"):
        doctor.load_or_measure_peak(tmp_path, "cpu", n=16)


def test_servers_and_packages_are_reported() -> None:
    servers = doctor.find_servers()
    assert set(servers) == {"redis-server", "pg_ctl", "initdb"}
    assert all(p is None or Path(p).exists() for p in servers.values())
    pkgs = doctor.optional_packages()
    assert set(pkgs) == set(doctor.OPTIONAL_PACKAGES)


def test_command_runs_quick_as_json_and_table(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("doctor")(doctor.doctor_command)
    app.command("other")(lambda: None)  # a group with two commands keeps "doctor" as a sub-command name
    runner = CliRunner()
    result = runner.invoke(app, ["doctor", "--quick", "--json", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["versions"]["torch"] == torch.__version__
    assert report["measured"]["cpu"]["matmul_gflops"] > 0 and report["measured"]["cpu"]["stored"] is False
    assert report["torch_threads"] == torch.get_num_threads()
    assert not (tmp_path / doctor.PEAKS_FILE).exists()  # quick figures are not stored as the peak
    table = runner.invoke(app, ["doctor", "--quick", "--runs-dir", str(tmp_path)])
    assert table.exit_code == 0, table.output
    assert "peak cpu" in table.stdout and "GFLOP/s" in table.stdout


def test_matmul_peak_benchmark_writes_the_convention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = Path(__file__).resolve().parents[2]
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from bench import matmul_peak

    matmul_peak.main(["--quick", "--results-dir", str(tmp_path)])
    records = json.loads((tmp_path / "matmul_peak.json").read_text())
    assert [r["case"] for r in records] == ["matmul_n256", "matmul_n512", "copy_16MB"]
    keys = {"case", "metric", "value", "unit", "reference", "reference_value", "ratio", "machine"}
    for rec in records:
        assert set(rec) == keys and rec["reference"] == "numpy"
        assert rec["value"] > 0 and rec["reference_value"] > 0
        assert rec["ratio"] == pytest.approx(rec["value"] / rec["reference_value"])
        assert rec["machine"]["torch"] == torch.__version__
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(" ratio " in line for line in lines)
    assert lines[0].split()[-1] == f"{records[0]['ratio']:.3f}"
