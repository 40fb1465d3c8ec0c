"""Run directories, provenance, the SQLite registry (statuses, prefixes, two processes) and the `runs` CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import Field
from typer.testing import CliRunner

from cambium.core import runs as runs_mod
from cambium.core.cli import runs_app
from cambium.core.config import ConfigModel, fingerprint, load
from cambium.core.errors import DataError, RunError
from cambium.core.metrics import MetricsWriter
from cambium.core.registry import RunRecord, RunRegistry, SQLiteRegistry
from cambium.core.runs import (
    create_run,
    finish_run,
    get_run,
    list_runs,
    new_run_id,
    open_run,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data/samples/text/tinyshakespeare/input.txt"


class Inner(ConfigModel):
    width: int = Field(8, description="a width")
    name: str = Field("a", description="a name")


class Cfg(ConfigModel):
    lr: float = Field(1e-3, description="learning rate")
    inner: Inner = Field(default_factory=Inner, description="nested table")


def test_run_id_format_and_order() -> None:
    early = new_run_id("moe", "tiny", now=datetime(2026, 11, 22, 3, 15, 0, tzinfo=UTC))
    late = new_run_id("moe", "tiny", now=datetime(2026, 11, 22, 3, 15, 1, tzinfo=UTC))
    assert early.startswith("20261122-031500-moe-tiny-") and len(early.rsplit("-", 1)[1]) == 4
    assert early < late
    assert new_run_id("Moe", "Tiny Run/2").split("-")[2:5] == ["moe", "tiny", "run"]


def test_create_run_writes_config_provenance_and_registry(tmp_path: Path) -> None:
    cfg = Cfg(lr=0.5, inner=Inner(width=3))
    run = create_run(tmp_path, system="moe", name="tiny", config=cfg, seed=7, data_files=[SAMPLE])
    assert run.dir == (tmp_path / run.id).resolve() and run.dir.is_dir()
    assert load(run.config_path, Cfg) == cfg

    prov = json.loads(run.provenance_path.read_text())
    assert prov["seed"] == 7 and prov["system"] == "moe" and prov["run_id"] == run.id
    assert prov["config_fingerprint"] == fingerprint(cfg)
    assert prov["data_files"][0]["sha256"] == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    assert prov["data_files"][0]["bytes"] == SAMPLE.stat().st_size
    assert prov["versions"]["python"].count(".") == 2 and prov["versions"]["torch"]
    assert set(prov["git"]) == {"commit", "dirty"}
    assert prov["command"] == sys.argv

    record = get_run(tmp_path, run.id)
    assert (record.status, record.system, record.name) == ("running", "moe", "tiny")
    assert record.fingerprint == fingerprint(cfg) and record.dir == run.dir.resolve()


def test_git_state_in_a_checkout_and_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f.txt").write_text("one")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "first"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert runs_mod._git_state(repo) == {"commit": head, "dirty": False}
    (repo / "f.txt").write_text("two")
    assert runs_mod._git_state(repo) == {"commit": head, "dirty": True}
    assert runs_mod._git_state(tmp_path / "elsewhere") == {"commit": None, "dirty": None}

    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert runs_mod._git_state(repo) == {"commit": None, "dirty": None}
    run = create_run(tmp_path / "runs", system="s", name="n", config=Cfg(), seed=0)
    assert json.loads(run.provenance_path.read_text())["git"] == {"commit": None, "dirty": None}


def test_bad_inputs_are_rejected_before_writing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.txt"):
        create_run(tmp_path, system="s", name="n", config=Cfg(), seed=0, data_files=[tmp_path / "missing.txt"])
    assert list_runs(tmp_path) == []
    with pytest.raises(RunError, match="run id"):
        create_run(tmp_path, system="s", name="n", config=Cfg(), seed=0, run_id="../escape")
    create_run(tmp_path, system="s", name="n", config=Cfg(), seed=0, run_id="fixed")
    with pytest.raises(RunError, match="already exists"):
        create_run(tmp_path, system="s", name="n", config=Cfg(), seed=0, run_id="fixed")
    with pytest.raises(RunError, match="not one of"):
        finish_run(tmp_path, "fixed", "done")


def test_status_lifecycle_and_resume(tmp_path: Path) -> None:
    cfg = Cfg()
    run = create_run(tmp_path, system="s", name="n", config=cfg, seed=3)
    run.finish("finished", {"loss": 1.5})
    record = get_run(tmp_path, run.id)
    assert record.status == "finished" and record.summary == {"loss": 1.5}
    assert record.updated >= record.created

    again = open_run(tmp_path, run.id, config=cfg)
    assert again.dir == run.dir.resolve() and again.seed == 3
    assert get_run(tmp_path, run.id).status == "running"
    assert len(json.loads(run.provenance_path.read_text())["resumes"]) == 1
    with pytest.raises(RunError, match="fingerprint"):
        open_run(tmp_path, run.id, config=Cfg(lr=2.0))

    with pytest.raises(ValueError), again:
        raise ValueError("boom")
    assert get_run(tmp_path, run.id).status == "failed"
    assert "boom" in get_run(tmp_path, run.id).summary["error"]

    other = create_run(tmp_path, system="s", name="n", config=cfg, seed=3)
    with other:
        pass
    assert get_run(tmp_path, other.id).status == "finished"
    for code, status in ((0, "finished"), (3, "killed")):
        run = create_run(tmp_path, system="s", name="n", config=cfg, seed=3)
        with pytest.raises(SystemExit), run:
            raise SystemExit(code)
        assert get_run(tmp_path, run.id).status == status


def test_list_filter_and_prefix_resolution(tmp_path: Path) -> None:
    assert list_runs(tmp_path / "nothing") == []
    a = create_run(tmp_path, system="moe", name="tiny", config=Cfg(), seed=0, run_id="20260101-000000-moe-aaaa")
    b = create_run(tmp_path, system="moe", name="tiny", config=Cfg(), seed=0, run_id="20260101-000000-moe-aaab")
    c = create_run(tmp_path, system="nested", name="x", config=Cfg(), seed=0, run_id="20260102-000000-nested_x")
    assert [r.id for r in list_runs(tmp_path)] == [a.id, b.id, c.id]
    assert [r.id for r in list_runs(tmp_path, system="nested")] == [c.id]
    assert get_run(tmp_path, "20260101-000000-moe-aaab").id == b.id
    assert get_run(tmp_path, "20260102").id == c.id
    with pytest.raises(RunError, match="ambiguous") as err:
        get_run(tmp_path, "20260101-000000-moe-aaa")
    assert a.id in str(err.value) and b.id in str(err.value)
    with pytest.raises(RunError, match="no run matches 'zzz'"):
        get_run(tmp_path, "zzz")
    # '_' is literal in a prefix, not a LIKE wildcard.
    with pytest.raises(RunError, match="no run matches"):
        get_run(tmp_path, "20260102-000000-nested_y")


def test_a_run_whose_process_died_is_reported_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os
        from pydantic import Field
        from cambium.core.config import ConfigModel
        from cambium.core.runs import create_run
        class C(ConfigModel):
            a: int = Field(1, description="a")
        run = create_run({str(tmp_path)!r}, system="s", name="dies", config=C(), seed=0)
        print(run.id, flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    run_id = out.strip()
    live = create_run(tmp_path, system="s", name="alive", config=Cfg(), seed=0)
    statuses = {r.id: r.status for r in list_runs(tmp_path)}
    assert statuses == {run_id: "killed", live.id: "running"}


def test_two_processes_register_concurrently(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        from pydantic import Field
        from cambium.core.config import ConfigModel
        from cambium.core.runs import create_run
        class C(ConfigModel):
            a: int = Field(1, description="a")
        for i in range(12):
            run = create_run({str(tmp_path)!r}, system="s", name=sys.argv[1], config=C(), seed=i)
            run.finish("finished", {{"i": i}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, name], stderr=subprocess.PIPE, text=True)
             for name in ("p1", "p2")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    records = list_runs(tmp_path)
    assert len(records) == 24 and len({r.id for r in records}) == 24
    assert {r.status for r in records} == {"finished"}
    assert sorted(r.summary["i"] for r in records if r.name == "p1") == list(range(12))
    assert all((tmp_path / r.id / "config.toml").is_file() for r in records)


def test_first_use_waits_for_another_writer_instead_of_failing(tmp_path: Path) -> None:
    """Switching a new file to WAL while another connection writes is refused by SQLite at once (deadlock
    avoidance, no busy handler); the registry retries it until the other transaction commits."""
    path = tmp_path / "experiments.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE unrelated (x)")
    plain = sqlite3.connect(path, timeout=5, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):  # what the registry has to cope with
        plain.execute("PRAGMA journal_mode = WAL")
    plain.close()
    committer = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    committer.start()
    registry = SQLiteRegistry(path, busy_timeout_s=10)
    record = RunRecord(id="r1", system="s", name="n", status="running", created="t", updated="t", fingerprint="f",
                       dir=tmp_path / "r1")
    registry.insert(record)
    committer.join()
    other.close()
    assert registry.get("r1") is not None
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


class MemoryRegistry(RunRegistry):
    """A registry without SQL, showing that callers depend only on the RunRegistry interface."""

    def __init__(self) -> None:
        self.rows: dict[str, RunRecord] = {}

    def insert(self, record: RunRecord) -> None:
        self.rows[record.id] = record

    def update(self, run_id: str, **fields: Any) -> None:
        self.rows[run_id] = RunRecord(**{**self.rows[run_id].__dict__, **fields})

    def get(self, run_id: str) -> RunRecord | None:
        return self.rows.get(run_id)

    def find(self, prefix: str = "", system: str | None = None) -> list[RunRecord]:
        return sorted((r for r in self.rows.values() if r.id.startswith(prefix) and system in (None, r.system)),
                      key=lambda r: r.id)


def test_registry_backend_is_swappable(tmp_path: Path) -> None:
    registry = MemoryRegistry()
    run = create_run(tmp_path, system="s", name="n", config=Cfg(), seed=0, registry=registry)
    finish_run(tmp_path, run.id[:20], "finished", {"x": 1}, registry=registry)
    assert [r.status for r in list_runs(tmp_path, registry=registry)] == ["finished"]
    assert not (tmp_path / "experiments.sqlite").exists()


def _make_run(root: Path, name: str, cfg: Cfg, losses: list[float]) -> str:
    run = create_run(root, system="demo", name=name, config=cfg, seed=0)
    with MetricsWriter(run.metrics_path(), run.id) as writer:
        for step, loss in enumerate(losses, start=1):
            writer.log(step, step * 100, {"loss": loss, f"only_{name}": 1.0})
    run.finish()
    return run.id


def test_cli_ls_show_compare(tmp_path: Path) -> None:
    first = _make_run(tmp_path, "first", Cfg(lr=0.1), [3.0, 2.5, 2.25])
    second = _make_run(tmp_path, "second", Cfg(lr=0.2, inner=Inner(name="b")), [3.0, 2.0])
    cli = CliRunner()

    listing = cli.invoke(runs_app, ["ls", "--runs-dir", str(tmp_path)])
    assert listing.exit_code == 0, listing.output
    for run_id in (first, second):
        assert run_id in listing.output
    first_line = next(line for line in listing.output.splitlines() if first in line)
    assert "finished" in first_line and " 3 " in first_line and "loss=2.25" in first_line
    only_demo = cli.invoke(runs_app, ["ls", "--runs-dir", str(tmp_path), "--system", "other"])
    assert "no runs" in only_demo.output

    shown = cli.invoke(runs_app, ["show", first[:-2], "--runs-dir", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert "lr = 0.1" in shown.output and "2.25" in shown.output and "no checkpoints" in shown.output

    compared = cli.invoke(runs_app, ["compare", first, second, "--runs-dir", str(tmp_path)])
    assert compared.exit_code == 0, compared.output
    lines = compared.output.splitlines()
    assert any("lr" in line and "0.1" in line and "0.2" in line for line in lines)
    assert any("inner.name" in line and " a " in line and " b " in line for line in lines)
    assert not any("inner.width" in line for line in lines)
    loss_line = next(line for line in lines if line.strip("│ ").startswith("loss"))
    assert "2.25 (3)" in loss_line and "2 (2)" in loss_line
    assert not any("only_first" in line for line in lines)

    missing = cli.invoke(runs_app, ["show", "nope", "--runs-dir", str(tmp_path)])
    assert missing.exit_code != 0 and isinstance(missing.exception, RunError)


def test_cli_help_covers_every_option() -> None:
    group = typer.main.get_command(runs_app)
    commands = getattr(group, "commands", {})  # typer >= 0.20 vendors its own click: no isinstance check
    assert sorted(commands) == ["compare", "export", "ls", "show"]
    for command in commands.values():
        assert command.help
        for param in command.params:
            assert getattr(param, "help", None), f"{command.name}: {param.name} has no help text"
    cli = CliRunner()
    for name in ("ls", "show", "compare", "export"):
        result = cli.invoke(runs_app, [name, "--help"])
        assert result.exit_code == 0 and "--runs-dir" in result.output


def test_a_moved_runs_directory_still_resolves(tmp_path: Path) -> None:
    run = create_run(tmp_path / "old", system="s", name="n", config=Cfg(), seed=0)
    shutil.move(tmp_path / "old", tmp_path / "new")
    assert get_run(tmp_path / "new", run.id).dir == (tmp_path / "new" / run.id).resolve()
    assert list_runs(tmp_path / "new")[0].dir == (tmp_path / "new" / run.id).resolve()
    assert open_run(tmp_path / "new", run.id).config_path.is_file()


def test_a_copied_runs_directory_resumes_its_own_copy(tmp_path: Path) -> None:
    run = create_run(tmp_path / "old", system="s", name="n", config=Cfg(), seed=0)
    finish_run(tmp_path / "old", run.id)
    shutil.copytree(tmp_path / "old", tmp_path / "copy")
    reopened = open_run(tmp_path / "copy", run.id)
    assert reopened.dir == (tmp_path / "copy" / run.id).resolve()
    assert get_run(tmp_path / "copy", run.id).dir == reopened.dir
    assert get_run(tmp_path / "old", run.id).dir == (tmp_path / "old" / run.id).resolve()


class FailingRegistry(MemoryRegistry):
    def insert(self, record: RunRecord) -> None:
        raise RunError("registry unavailable")


def test_a_run_that_cannot_be_registered_leaves_no_directory(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="unavailable"):
        create_run(tmp_path, system="s", name="n", config=Cfg(), seed=0, registry=FailingRegistry())
    assert list(tmp_path.iterdir()) == []


def test_cli_show_lists_checkpoints_and_flags_incomplete_ones(tmp_path: Path) -> None:
    import torch

    from cambium.core.checkpoint import save_checkpoint

    run = create_run(tmp_path, system="s", name="n", config=Cfg(), seed=0)
    state = {"model": {"w": torch.zeros(3)}}
    save_checkpoint(run.checkpoint_dir, 4, state)
    broken = save_checkpoint(run.checkpoint_dir, 8, state)
    (broken / "meta.json").unlink()
    result = CliRunner().invoke(runs_app, ["show", run.id, "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.strip("│ ").startswith("4 ") and "complete" in line for line in lines)
    assert any("step_00000008" in line and "incomplete" in line and "meta.json is missing" in line for line in lines)
    assert "no metrics yet" in result.output


def test_a_run_still_alive_elsewhere_cannot_be_reopened(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import time
        from pydantic import Field
        from cambium.core.config import ConfigModel
        from cambium.core.runs import create_run
        class C(ConfigModel):
            a: int = Field(1, description="a")
        run = create_run({str(tmp_path)!r}, system="s", name="busy", config=C(), seed=0)
        print(run.id, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        with pytest.raises(RunError, match=f"still running in process {proc.pid}"):
            open_run(tmp_path, run_id)
    finally:
        proc.kill()
        proc.wait()
    assert open_run(tmp_path, run_id).id == run_id
    assert get_run(tmp_path, run_id).status == "running"


_RESUMER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cambium.core.errors import RunError
    from cambium.core.runs import open_run
    root, run_id, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)
    try:
        run = open_run(root, run_id)
    except RunError as exc:
        print("refused", exc, flush=True)
        sys.exit(3)
    print("resumed", flush=True)
    time.sleep(3)  # hold the run as a trainer would
    run.finish("finished")
""")


def test_two_simultaneous_resumes_of_one_run_one_is_refused_naming_the_holder(tmp_path: Path) -> None:
    run = create_run(tmp_path, system="s", name="n", config=Cfg(), seed=0)
    run.finish("killed")
    run.close()
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _RESUMER, str(tmp_path), run.id, str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        go.touch()  # both race from here
        outs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [0, 3], outs
    winner = next(p for p in procs if p.returncode == 0)
    refusal = next(out for p, (out, _) in zip(procs, outs, strict=True) if p.returncode == 3)
    assert f"still running in process {winner.pid}" in refusal
    assert len(refusal.strip().splitlines()) == 1
    provenance = json.loads((run.dir / "provenance.json").read_text())
    assert [r["pid"] for r in provenance["resumes"]] == [winner.pid]  # the refused one touched nothing


def test_a_run_lock_is_held_until_close_and_reentrant_in_one_process(tmp_path: Path) -> None:
    import fcntl

    run = create_run(tmp_path, system="s", name="n", config=Cfg(), seed=0)
    with open(run.dir / "run.lock") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    again = open_run(tmp_path, run.id)  # the same process may reopen its own run
    again.close()
    probe = textwrap.dedent(f"""
        from cambium.core.errors import RunError
        from cambium.core.runs import open_run
        try:
            open_run({str(tmp_path)!r}, {run.id!r}).close()
            print("opened")
        except RunError as exc:
            print(exc)
    """)

    def other_process() -> str:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout

    import os

    assert f"still running in process {os.getpid()}" in other_process()
    with run:
        pass  # finished, lock released
    assert other_process().strip() == "opened"


def test_a_registry_row_with_bad_json_is_one_run_error_naming_the_file(tmp_path: Path) -> None:
    run = create_run(tmp_path, system="s", name="n", config=Cfg(), seed=0)
    run.finish("finished")
    registry = tmp_path / "experiments.sqlite"
    with sqlite3.connect(registry) as con:
        con.execute("UPDATE runs SET summary = '{not json' WHERE id = ?", (run.id,))
    for read in (lambda: get_run(tmp_path, run.id), lambda: list_runs(tmp_path)):
        with pytest.raises(RunError, match=f"{registry}.*{run.id}.*damaged"):
            read()
    with sqlite3.connect(registry) as con:
        con.execute("UPDATE runs SET summary = '[1, 2]' WHERE id = ?", (run.id,))
    with pytest.raises(RunError, match="not a JSON object"):
        get_run(tmp_path, run.id)
    result = CliRunner().invoke(runs_app, ["ls", "--runs-dir", str(tmp_path)])
    assert result.exit_code != 0 and "damaged" in str(result.exception or result.output)


def test_a_metrics_file_with_an_unexpected_table_is_one_data_error(tmp_path: Path) -> None:
    import duckdb

    from cambium.core.metrics import read_metrics

    path = tmp_path / "metrics.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE metrics (x INTEGER)")
    con.close()
    with pytest.raises(DataError, match=f"{path}.*does not hold cambium's metrics table"):
        read_metrics(path)
    writer = MetricsWriter(path, "r")
    writer.log(1, 1, {"loss": 1.0})
    with pytest.raises(DataError, match="does not hold cambium's metrics table"):
        writer.flush()
