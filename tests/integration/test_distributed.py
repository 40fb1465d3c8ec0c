"""A distributed compile: the trainer's requests go through Redis, compile workers are separate processes that talk only
to Redis, PostgreSQL and the S3 store; a worker killed mid-job loses no blueprint (another claims its requests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from tests.integration.conftest import free_port

from cambium.morph.backends import Endpoints, open_urza
from cambium.morph.compiler import load_kernel
from cambium.morph.contracts import CompilationRequest, CompileSettings, KernelStatus
from cambium.morph.redis_bus import RedisBus
from cambium.morph.worker import GROUP

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_a_killed_compile_worker_loses_no_blueprint(redis_url: str, database_url: str,
                                                    s3_endpoint: str, bucket: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    namespace = f"dist-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "S3_ENDPOINT_URL": s3_endpoint,
           "AWS_ACCESS_KEY_ID": "cambium-test", "AWS_SECRET_ACCESS_KEY": "cambium-test"}
    env.pop("CAMBIUM_API_TOKEN", None)
    ends = Endpoints.from_env(env)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "cambium-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cambium-test")
    urza = open_urza(ends, tmp_path / "trainer", bucket=bucket)
    bus = RedisBus(redis_url, namespace=namespace)
    shapes = [("B", 8), ("B", 12), ("B", 16), ("B", 4, 6)]
    blueprints = [urza.template("residual_mlp" if len(s) == 2 else "low_rank_adapter", s) for s in shapes]
    for i, bp in enumerate(blueprints):
        bus.publish("compilation.blueprint.submitted",
                    CompilationRequest(request_id=f"r{i}", blueprint_id=bp.blueprint_id, settings=CompileSettings()))

    doomed = subprocess.run(
        [sys.executable, "-m", "tests.integration._doomed_worker", "doomed", "2", namespace, bucket,
         str(tmp_path / "doomed")], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert doomed.returncode == -signal.SIGKILL, doomed.stderr
    ready = {m.request_id: m for _, m in bus.read("compilation.kernel.ready", "trainer")}
    assert list(ready) == ["r0"]  # one job finished; it held the other three when it died
    assert bus.pending("compilation.blueprint.submitted", GROUP) == 3

    survivor = subprocess.Popen(
        [sys.executable, "-m", "cambium.cli", "morph", "worker", "--consumer", "survivor", "--min-idle", "0.5",
         "--namespace", namespace, "--bucket", bucket], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while len(ready) < len(blueprints):
            assert survivor.poll() is None and time.monotonic() < deadline, survivor.stdout.read()  # type: ignore[union-attr]
            for _, m in bus.read("compilation.kernel.ready", "trainer", block_s=1.0):
                ready[m.request_id] = m
    finally:
        survivor.send_signal(signal.SIGTERM)
        out, _ = survivor.communicate(timeout=60)
    assert survivor.returncode == 0, out
    assert "compiled 3, failed 0, claimed 3 from dead workers" in out
    assert sorted(ready) == ["r0", "r1", "r2", "r3"]
    assert bus.pending("compilation.blueprint.submitted", GROUP) == 0
    for i, bp in enumerate(blueprints):
        outcome = ready[f"r{i}"]
        assert outcome.status == KernelStatus.READY and outcome.artifact is not None
        assert outcome.artifact.blueprint_id == bp.blueprint_id
        record, payload = urza.kernel(outcome.artifact.artifact_id)  # metadata from PostgreSQL, bytes from S3
        assert record.artifact_id == outcome.artifact.artifact_id
        load_kernel(payload, record)
    assert not (tmp_path / "trainer").exists() and not (tmp_path / "doomed").exists()  # nothing went through files
    bus.close()


def test_training_on_redis_postgres_s3_matches_the_embedded_run_and_resumes_exactly(
    redis_url: str, database_url: str, s3_endpoint: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tiny config trained on the embedded backends, and on Redis + PostgreSQL + S3 stopped after 3 of its 6 epochs
    and resumed: the same report (accuracies, parameters, every seed's timeline, field reports, counters)."""
    import torch
    from tests.morph.test_resume import NOT_COMPARED, _cfg

    from cambium.morph.train import train

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "cambium-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cambium-test")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embedded = train(_cfg(tmp_path / "embedded"), name="embedded", runs_root=tmp_path / "embedded" / "runs",
                         show_progress=False)
        ends = Endpoints(redis_url=redis_url, database_url=database_url, s3_endpoint_url=s3_endpoint)
        cfg, runs = _cfg(tmp_path / "servers"), tmp_path / "servers" / "runs"
        first = train(cfg, name="servers", runs_root=runs, stop_after=3, endpoints=ends, show_progress=False)
        resumed = train(cfg, name="servers", runs_root=runs, resume=first["run_id"], endpoints=ends,
                        show_progress=False)
    finally:
        torch.set_num_threads(before)
    assert not (tmp_path / "servers" / "urza").exists()  # the library lived on the servers
    same = {k: v for k, v in embedded.items() if k not in NOT_COMPARED}
    assert {k: v for k, v in resumed.items() if k not in NOT_COMPARED} == same
    events = RedisBus(redis_url, namespace=f"oona:{first['run_id']}")
    try:
        assert [e.payload["epoch"] for e in events.log("system.events.epoch")] == list(range(6))
    finally:
        events.close()


def test_a_trainer_killed_on_the_servers_resumes_bitwise(redis_url: str, database_url: str,
                                                         s3_endpoint: str, tmp_path: Path) -> None:
    """The core loop's SIGKILL harness on the tiny config with Oona on Redis and Urza on PostgreSQL + S3: killed after a
    random epoch (with whatever the bus held then), resumed from the CLI, every metric row equals the uninterrupted
    run's (which ran on the same servers). The kill inside a checkpoint write is about the run directory, not the
    backends: tests/morph/test_train.py covers it."""
    from cambium.core.testing import check_exact_resume

    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "S3_ENDPOINT_URL": s3_endpoint,
           "AWS_ACCESS_KEY_ID": "cambium-test", "AWS_SECRET_ACCESS_KEY": "cambium-test"}
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "cambium.cli", "morph", "train", "--config", str(REPO / "configs/morph/tiny.toml"),
               "--runs-dir", str(runs), "--set", f"library.root={tmp_path}/urza", "--set", "train.threads=1"]
    report = check_exact_resume(command, runs_root=runs, n_steps=6, seed=5, cwd=REPO, timeout_s=300, env=env,
                                scenarios=("kill-at-step",))
    assert report.ok, report.summary()
    assert not (tmp_path / "urza").exists()


def test_a_run_whose_compile_worker_is_killed_mid_job_loses_nothing(
    redis_url: str, database_url: str, s3_endpoint: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The distributed run: this process trains (Tolaria, `library.compile_in = "workers"`), compile workers are other
    processes sharing only Redis, PostgreSQL and S3 with it, and Tamiyo is a `cambium morph serve` process it asks over
    HTTP. The first worker is killed (SIGKILL) as it starts its first job; a second one, started after, claims what it
    held. The run's report equals the embedded run's."""
    import threading

    import httpx
    import torch
    from tests.morph.test_resume import NOT_COMPARED, TINY

    from cambium.core.config import load
    from cambium.morph.config import CONFIG_MODEL
    from cambium.morph.train import train

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "cambium-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cambium-test")
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "S3_ENDPOINT_URL": s3_endpoint}
    namespace = f"run-{uuid.uuid4().hex[:8]}"
    doomed = subprocess.Popen([sys.executable, "-m", "tests.integration._doomed_worker", "doomed", "1", namespace,
                               "cambium-urza", str(tmp_path / "doomed")], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    survivor: list[subprocess.Popen[str]] = []

    def replace_it() -> None:
        doomed.wait()
        survivor.append(subprocess.Popen(
            [sys.executable, "-m", "cambium.cli", "morph", "worker", "--consumer", "survivor", "--min-idle", "0.5",
             "--namespace", namespace], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))

    replacer = threading.Thread(target=replace_it, daemon=True)
    replacer.start()
    port = free_port()
    tamiyo = subprocess.Popen([sys.executable, "-m", "cambium.cli", "morph", "serve", "--config", str(REPO / TINY),
                               "--port", str(port)], cwd=tmp_path, env={**env, "CAMBIUM_API_TOKEN": "tamiyo-token"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tamiyo_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"{tamiyo_url}/openapi.json", timeout=2)
            break
        except httpx.TransportError:
            assert tamiyo.poll() is None and time.monotonic() < deadline, tamiyo.communicate()[0]
            time.sleep(0.2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workers_cfg = load(TINY, CONFIG_MODEL, [f"library.root={tmp_path}/servers", "library.compile_in=workers",
                                                "library.worker_wait_s=120"])
        distributed = train(workers_cfg, name="distributed", runs_root=tmp_path / "runs", show_progress=False,
                            endpoints=Endpoints(redis_url=redis_url, database_url=database_url,
                                                s3_endpoint_url=s3_endpoint, api_token="tamiyo-token",
                                                tamiyo_url=tamiyo_url), bus_namespace=namespace)
        decided = httpx.get(f"{tamiyo_url}/policy/status", headers={"Authorization": "Bearer tamiyo-token"}).json()
        embedded = train(load(TINY, CONFIG_MODEL, [f"library.root={tmp_path}/embedded"]), name="embedded",
                         runs_root=tmp_path / "runs", show_progress=False)
    finally:
        torch.set_num_threads(before)
        replacer.join(timeout=60)
        for proc in survivor:
            proc.send_signal(signal.SIGTERM)
        if doomed.poll() is None:
            doomed.kill()
        tamiyo.terminate()
        tamiyo.wait(timeout=30)
    out, _ = survivor[0].communicate(timeout=60)
    assert doomed.returncode == -signal.SIGKILL
    assert survivor[0].returncode == 0 and "claimed 0 " not in out, out
    assert {k: v for k, v in distributed.items() if k not in NOT_COMPARED} == {
        k: v for k, v in embedded.items() if k not in NOT_COMPARED}
    assert distributed["seeds"] and not (tmp_path / "servers").exists()
    assert decided["decisions"] == distributed["epochs_done"]  # every boundary's decision came from the service
