"""`cambium dashboard` from the command line: it serves the runs directory on loopback, and refuses a missing one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
from pydantic import BaseModel
from typer.testing import CliRunner

from cambium.cli import app
from cambium.core.errors import ConfigError
from cambium.core.runs import create_run

from .conftest import free_port


class _Cfg(BaseModel):
    name: str = "cli"


def test_a_missing_runs_dir_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["dashboard", "--runs-dir", str(tmp_path / "nope")])
    assert isinstance(result.exception, ConfigError) and "is not a directory" in str(result.exception)


def test_the_command_serves_the_runs_directory(tmp_path: Path) -> None:
    run = create_run(tmp_path, system="nested", name="cli", config=_Cfg(), seed=0)
    run.finish()
    run.close()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cambium.cli", "dashboard", "--runs-dir", str(tmp_path), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=2).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.2)
        assert [r["id"] for r in body["runs"]] == [run.id]
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
