"""`screener live --runs-dir`: the live run is registered, writes status.json while it runs and when it stops, and is
finished (or failed) when live mode stops; `cambium dashboard` reads that file."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cambium.core.config import load
from cambium.core.runs import list_runs
from cambium.dashboard.queries import screener_status
from cambium.market.binance import route_usdm
from cambium.market.captures import iter_hftbacktest
from cambium.market.config import WsConfig
from cambium.market.replay_server import ReplayServer
from cambium.screener.cli import app, run_with_status
from cambium.screener.config import ScreenerConfig

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "screener" / "sample-replay.toml"
CAPTURES = [REPO / f"data/samples/market/ws/binance_usdm_hftbacktest/{s}_20240808.gz" for s in ("btcusdt", "ethusdt")]


def test_live_run_writes_status_json_for_the_dashboard(tmp_path: Path) -> None:
    records = list(itertools.islice(heapq.merge(*(iter_hftbacktest(p) for p in CAPTURES), key=lambda r: r.recv_ns),
                                    40_000))
    # As in test_live.py: a lowered entry bar and a small clip so symbols get listed in the calm first minutes, and
    # 20 s of clock skew tolerance at 20× recorded speed. status.json is rewritten every 0.2 s here.
    cfg = load(CONFIG, ScreenerConfig, ["ranker.enter_threshold=0.002", "ranker.exit_threshold=0.001",
                                        "features.clip_notional=1000", "features.max_skew_ms=20000",
                                        "live.status_every_s=0.2"])
    runs = tmp_path / "runs"
    during: list[dict[str, Any]] = []  # the documents status.json held while the registry said "running"
    done = threading.Event()

    def watch(url: str) -> None:
        def loop() -> None:
            while not done.is_set():
                live = [r for r in list_runs(runs, "screener") if r.status == "running"]
                if live and (doc := screener_status(live[0].dir)) is not None:
                    during.append(doc)
                done.wait(0.1)
        threading.Thread(target=loop, daemon=True).start()

    async def run() -> dict[str, object]:
        async with ReplayServer(records, speed=20.0, serves=lambda ep, s: route_usdm(s) == ep) as srv:
            ws = WsConfig(futures_public_url=srv.url("public"), futures_market_url=srv.url("market"))
            try:
                return await asyncio.to_thread(run_with_status, cfg, ws, max_events=len(srv.frames), duration_s=120,
                                               on_started=watch, runs_dir=runs)
            finally:
                done.set()

    status = asyncio.run(run())
    (record,) = list_runs(runs, "screener")
    assert (record.name, record.status) == ("live", "finished")
    assert record.summary["p95_latency_ms"] == status["p95_latency_ms"]
    final = screener_status(record.dir)
    assert final is not None
    assert final == json.loads((record.dir / "status.json").read_text())
    # the file's last write is the document the run ended with (the returned one adds the /metrics text)
    assert final == {k: v for k, v in status.items() if k != "metrics"}
    assert isinstance(final["p95_latency_ms"], float)
    top = final["top"]
    assert isinstance(top, list) and top, "no symbol was listed at the end of the run"
    assert {row["symbol"] for row in top} <= {"BTCUSDT", "ETHUSDT"}
    assert [row["rank"] for row in top] == list(range(1, len(top) + 1))
    # written while the run went on, not only at its start and end: the watcher saw counts between the two
    seen = [int(d["snapshots"]) for d in during]
    assert seen == sorted(seen) and max(seen) <= final["snapshots"], seen
    assert len({n for n in seen if 0 < n < final["snapshots"]}) >= 2, seen


@pytest.mark.parametrize(("raised", "status"), [(ValueError("boom"), "failed"), (KeyboardInterrupt(), "finished")])
def test_live_run_is_failed_on_an_exception_and_finished_on_ctrl_c(
    tmp_path: Path, raised: BaseException, status: str
) -> None:
    """An exception fails the run; Ctrl-C is how live mode stops without --duration, so the run ends finished."""
    cfg = load(CONFIG, ScreenerConfig)

    def stop(url: str) -> None:
        raise raised

    with pytest.raises(type(raised)):
        run_with_status(cfg, WsConfig(), on_started=stop, runs_dir=tmp_path)
    (record,) = list_runs(tmp_path, "screener")
    assert (record.name, record.status) == ("live", status)
    if status == "failed":
        assert "boom" in record.summary["error"]
    assert not (record.dir / "status.json").exists()  # the run stopped before the live path started


def test_without_runs_dir_nothing_is_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests and callers that pass no runs_dir keep the old behaviour: no run, no files."""
    monkeypatch.chdir(tmp_path)
    cfg = load(CONFIG, ScreenerConfig)

    def stop(url: str) -> None:
        raise ValueError("stop here")

    with pytest.raises(ValueError, match="stop here"):
        run_with_status(cfg, WsConfig(), on_started=stop)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "runs_dir"), [([], Path("runs")), (["--runs-dir", "elsewhere"], Path("elsewhere"))])
def test_screener_live_passes_its_runs_dir(args: list[str], runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`screener live` hands --runs-dir (default runs, like the other commands) to the live path; the live path
    itself is run against the local replay server above, the real exchange is out of reach in tests."""
    import cambium.screener.cli as cli

    calls: list[dict[str, object]] = []

    def record(cfg: ScreenerConfig, ws: WsConfig, **kwargs: object) -> dict[str, object]:
        calls.append(kwargs)
        return {}

    monkeypatch.setattr(cli, "run_with_status", record)
    result = CliRunner().invoke(app, ["live", "--duration", "1", *args])
    assert result.exit_code == 0, result.output
    assert calls == [{"duration_s": 1.0, "runs_dir": runs_dir}]
