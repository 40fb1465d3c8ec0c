"""MOR-9/MOR-10 entry points: `cambium morph serve` (refuses a non-loopback bind without a token; serves the API with
bearer auth) and `cambium morph check-services`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cambium.core.errors import ConfigError
from cambium.morph.api import check_bind
from cambium.morph.cli import app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_binds_without_a_token(host: str) -> None:
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org", ""])
def test_other_binds_need_a_token(host: str) -> None:
    with pytest.raises(ConfigError, match="without CAMBIUM_API_TOKEN"):
        check_bind(host, None)
    check_bind(host, "secret")


def test_check_services_prints_each_backend_and_fails_on_a_down_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("REDIS_URL", "DATABASE_URL", "S3_ENDPOINT_URL", "CAMBIUM_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["check-services"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", "oona"], ["ok", "urza"], ["ok", "urza"], ["ok", "api"]]
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    result = CliRunner().invoke(app, ["check-services"])
    assert result.exit_code == 1 and result.output.startswith("DOWN oona")


def test_serve_answers_with_the_token_and_401_without(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "S3_ENDPOINT_URL")}
    env["CAMBIUM_API_TOKEN"] = "serve-token"
    proc = subprocess.Popen([sys.executable, "-m", "cambium.cli", "morph", "serve", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                spec = httpx.get(f"{base}/openapi.json", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.2)
        assert "/policy/load" in spec.json()["paths"]
        assert httpx.get(f"{base}/policy/version").status_code == 401
        r = httpx.get(f"{base}/policy/version", headers={"Authorization": "Bearer serve-token"})
        assert r.status_code == 200 and r.json()["kind"] == "heuristic"
        r = httpx.get(f"{base}/policy/status", headers={"Authorization": "Bearer serve-token"})
        assert r.json()["replay_buffer"] == 0  # read from the library's SQLite file
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert (tmp_path / "runs" / "urza" / "urza.sqlite").is_file()


def test_a_tamiyo_service_that_is_down_is_one_clear_error(tmp_path: Path) -> None:
    from cambium.morph.backends import Endpoints, check_services
    from cambium.morph.contracts import SystemStatePacket
    from cambium.morph.errors import BackendError
    from cambium.morph.services import TamiyoClient

    url = f"http://127.0.0.1:{free_port()}"
    client = TamiyoClient(url, "t", timeout_s=2.0)
    with pytest.raises(BackendError, match=r"Tamiyo service at http://127\.0\.0\.1:\d+ is unreachable"):
        client.decide(SystemStatePacket(epoch=1, step=1, train_loss=1.0))
    client.close()
    rows = {r.service: r for r in check_services(Endpoints(tamiyo_url=url), tmp_path)}
    assert not rows["tamiyo"].ok and "unreachable" in rows["tamiyo"].detail
