"""`cambium screener`: replay, train, live, record, demo."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from cambium.core.config import load, load_data
from cambium.core.errors import DataError
from cambium.market.config import WsConfig
from cambium.screener.config import ScreenerConfig

if TYPE_CHECKING:
    from cambium.screener.observability import ScreenerMetrics
    from cambium.screener.replay import Session
    from cambium.screener.train import TrainResult

app = typer.Typer(help="Live crypto in-play screener: replay recordings deterministically, or watch Binance live.",
                  no_args_is_help=True)
console = Console()

ConfigOpt = typer.Option(None, "--config", "-c", help="Screener TOML config (default: built-in defaults).")
SetOpt = typer.Option([], "--set", help="Override a config value: section.key=value (repeatable).")
SAMPLE_CONFIG = Path("configs/screener/sample-replay.toml")
SAMPLE_CAPTURES = [Path(f"data/samples/market/ws/binance_usdm_hftbacktest/{s}_20240808.gz")
                   for s in ("btcusdt", "ethusdt")]


def _config(path: Path | None, overrides: list[str]) -> ScreenerConfig:
    return load(path, ScreenerConfig, overrides) if path is not None else load_data({}, ScreenerConfig, overrides)


@app.command("replay")
def replay_command(
    recordings: list[Path] = typer.Argument(..., help="Recording directories or hftbacktest capture files "
                                            "(plain or .gz); several are merged in receive-time order."),
    config: Path | None = ConfigOpt,
    set_: list[str] = SetOpt,
    expected: Path | None = typer.Option(None, help="JSON file with the expected digest; exit 1 if it differs."),
    write_expected: Path | None = typer.Option(None, help="Write the digest and counts to this JSON file."),
    store: Path | None = typer.Option(None, help="Also write snapshots and rank events as Parquet here."),
) -> None:
    """Run the full pipeline over recordings at full speed and print the chained sha256 digest of its RankEvents."""
    from cambium.screener.replay import read_expected, replay
    from cambium.screener.replay import write_expected as write
    from cambium.screener.storage import ScreenerStore

    cfg = _config(config, set_)
    want = read_expected(expected) if expected is not None else None
    sink = ScreenerStore(cfg.storage, store) if store is not None else None
    result = replay(recordings, cfg, store=sink)
    s = result.summary()
    refused = "".join(f", {n} refused ({reason})" for reason, n in result.malformed_events.items() if n)
    console.print(f"{s['frames']:,} frames, {s['events']:,} events ({s['malformed']} malformed, "
                  f"{s['late_events']} late{refused}), {s['snapshots']:,} snapshots, {s['rank_events']} rank events")
    print(result.digest)
    why = result.why_no_events(cfg)
    if why is not None:
        console.print(why)
    if write_expected is not None:
        write(write_expected, result, cfg, recordings)
    if want is not None and want["digest"] != result.digest:
        console.print(f"[red]digest differs from {expected}: expected {want['digest']}[/red]")
        raise typer.Exit(1)


@app.command("train")
def train_command(
    config: Path | None = ConfigOpt,
    set_: list[str] = SetOpt,
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Run registry root (the run and its report)."),
) -> None:
    """Fit LightGBM per horizon/profile (+ p_toxic) with purged CV, isotonic and Platt calibration; write the
    artifacts (train.out_dir) and a held-out report against the heuristic and a logistic regression."""
    from cambium.screener.train import train

    cfg = _config(config, set_)
    _print_train(train(cfg, runs_dir), cfg)


def _print_train(result: TrainResult, cfg: ScreenerConfig) -> None:
    active = f"lightgbm + {cfg.train.calibration}"
    for r in result.reports:
        m, h = r.metrics[active], r.metrics["heuristic"]
        d, lo, hi = r.auc_diff["heuristic"]
        console.print(f"{r.key:>16}: AUC {m['auc']:.4f} (heuristic {h['auc']:.4f}, Δ {d:+.4f} [{lo:+.4f}, {hi:+.4f}]) "
                      f"ECE {m['ece']:.4f} on {r.n_test:,} held-out rows")
    if result.unlabelled:
        console.print(f"not labellable from {cfg.train.source}: {', '.join(result.unlabelled)} (the heuristic "
                      "predicts them)")
    for key, why in result.skipped.items():
        console.print(f"{key:>16}: not trained, the heuristic predicts it: {why}")
    console.print(f"artifacts {result.out_dir} (use: --set model.artifacts_dir={result.out_dir}); "
                  f"report {result.report}")


@app.command("live")
def live_command(
    config: Path | None = ConfigOpt,
    set_: list[str] = SetOpt,
    duration: float | None = typer.Option(None, help="Stop after this many seconds (default: until Ctrl-C)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Run registry root: the live run is registered "
                                  "there and writes status.json (read by `cambium dashboard`)."),
    symbols: str | None = typer.Option(None, help='"all" (every USDⓈ-M perpetual exchangeInfo lists, the default) '
                                       "or a comma-separated list; overrides live.symbols."),
    workers: int | None = typer.Option(None, help="Worker processes sharing the symbols (0: one process); "
                                       "overrides live.workers."),
    local: str | None = typer.Option(None, help="Address of `cambium market serve` (ws://127.0.0.1:PORT): its "
                                     "websocket endpoints and REST (exchangeInfo, depth) instead of Binance."),
) -> None:
    """Watch Binance USDⓈ-M live (read-only): rich table, status page with /metrics, notifiers from the config."""
    overrides = list(set_)
    if symbols is not None:
        overrides.append('live.symbols="all"' if symbols.strip() == "all" else
                         "live.symbols=[" + ",".join(f'"{s.strip().upper()}"' for s in symbols.split(",")) + "]")
    if workers is not None:
        overrides.append(f"live.workers={workers}")
    cfg = _config(config, overrides)
    ws, extra = WsConfig(), dict[str, Any]()
    if local is not None:
        base = local.rstrip("/")
        if not base.startswith("ws://"):
            raise typer.BadParameter(f"--local {local!r} must be a ws:// address (what `market serve` prints)")
        ws = WsConfig(futures_public_url=f"{base}/public", futures_market_url=f"{base}/market")
        extra["rest_url"] = "http://" + base.removeprefix("ws://")
    with contextlib.suppress(KeyboardInterrupt):
        run_with_status(cfg, ws, duration_s=duration, runs_dir=runs_dir, **extra)


def run_with_status(
    cfg: ScreenerConfig, ws: WsConfig, *, duration_s: float | None = None, max_events: int | None = None,
    on_started: Callable[[str], None] | None = None, runs_dir: Path | None = None, rest_url: str | None = None,
) -> dict[str, object]:
    """Live path + status page + notifiers; returns the last /api/status document (plus the /metrics text).
    `on_started(url)` is called once the status page listens.

    With `runs_dir` the live run is registered there (system "screener", name "live") and writes the /api/status
    document to `status.json` in its run directory every `live.status_every_s` seconds and once when it stops (what
    `cambium dashboard` shows); it is marked finished when live mode stops, Ctrl-C included, and failed if it raises.
    """
    from cambium.core.runs import create_run

    if runs_dir is None:
        return _run_with_status(cfg, ws, duration_s, max_events, on_started, None, rest_url)
    # seed 0: nothing in live mode is seeded (its input is the feed; the connector's back-off jitter is unseeded)
    run = create_run(runs_dir, system="screener", name="live", config=cfg, seed=0)
    console.print(f"run {run.id} ({run.dir})")
    try:
        status = _run_with_status(cfg, ws, duration_s, max_events, on_started, run.dir / "status.json", rest_url)
    except KeyboardInterrupt:  # how live mode is stopped without --duration: the run ended as asked
        run.finish("finished", {"stopped": "interrupted"})
        raise
    except BaseException as exc:
        run.finish("failed", {"error": repr(exc)})
        raise
    else:
        run.finish("finished", {"p95_latency_ms": status["p95_latency_ms"], "snapshots": status["snapshots"]})
    finally:
        run.close()
    return status


def _run_with_status(
    cfg: ScreenerConfig, ws: WsConfig, duration_s: float | None, max_events: int | None,
    on_started: Callable[[str], None] | None, status_path: Path | None, rest_url: str | None = None,
) -> dict[str, object]:
    import httpx

    from cambium.market.connector import Connector, ShardStats
    from cambium.screener.live import MalformedCollector, run_live
    from cambium.screener.observability import ScreenerMetrics, StatusFile, StatusServer, status_app, status_document
    from cambium.screener.pipeline import build_notifiers
    from cambium.screener.replay import Session

    notifiers = build_notifiers(cfg.notify, os.environ, cfg.ranker.top_k)
    session = Session(cfg, notifiers=notifiers)
    metrics = ScreenerMetrics()
    metrics.registry.register(MalformedCollector(session))
    holder: list[Connector] = []

    def shards() -> list[ShardStats]:
        return [st for conn in holder for st in conn.stats]

    app_ = status_app(session, metrics, shards)
    status_file = None if status_path is None else StatusFile(
        status_path, lambda: status_document(session, metrics, shards), cfg.live.status_every_s)
    server = StatusServer(app_, cfg.live.status_port)
    url = server.start()
    console.print(f"status page {url}/ (JSON {url}/api/status, Prometheus {url}/metrics)")
    try:
        if on_started is not None:
            on_started(url)
        if status_file is not None:
            status_file.start()
        try:
            if cfg.live.workers:
                summary = _run_sharded(cfg, ws, session, metrics, duration_s, max_events, rest_url)
            else:
                from cambium.market.binance_rest import RestClient
                from cambium.market.config import RestConfig

                rest = None if rest_url is None else RestClient("futures", RestConfig(futures_url=rest_url))
                result = asyncio.run(run_live(cfg, ws, session, metrics, connector=holder, duration_s=duration_s,
                                              max_events=max_events, rest=rest))
                summary = f"{result.events:,} events, {result.rank_events} rank events"
        finally:
            if status_file is not None:
                status_file.stop()
        status = httpx.get(f"{url}/api/status", timeout=10).json()
        status["metrics"] = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        server.stop()
    console.print(f"{summary}; p95 frame→decision {status['p95_latency_ms']} ms")
    return status


def _run_sharded(cfg: ScreenerConfig, ws: WsConfig, session: Session, metrics: ScreenerMetrics,
                 duration_s: float | None, max_events: int | None, rest_url: str | None) -> str:
    """`live.workers` worker processes feeding this process's ranker (cambium.screener.shards)."""
    from cambium.screener.shards import ShardedRunner

    runner = ShardedRunner(cfg, ws, session, workers=cfg.live.workers, rest_url=rest_url,
                           redis_url=os.environ.get("REDIS_URL") or None, metrics=metrics)
    metrics.watch(workers=runner.shard_stats)  # the workers' frames, drops and restarts on /metrics

    def enough(r: ShardedRunner) -> bool:
        return max_events is not None and sum(s["events"] for s in r.shard_stats()) >= max_events

    res = runner.run(duration_s=duration_s, until=enough)
    events = sum(s["events"] for s in res.shards)
    return (f"{events:,} events over {cfg.live.workers} workers ({res.restarts} restarts, dropped {res.dropped}), "
            f"{len(res.rank_events)} rank events, {len(session.pipeline.ranker.scores())} symbols scored")


@app.command("record")
def record_command(
    out: Path = typer.Argument(..., help="Directory of the new recording."),
    config: Path | None = ConfigOpt,
    set_: list[str] = SetOpt,
    duration: float | None = typer.Option(None, help="Stop after this many seconds (default: until Ctrl-C)."),
) -> None:
    """Record the screener's live streams (config live.symbols × features.streams; "all": exchangeInfo's symbols now)
    for later `replay`."""
    from cambium.market.cli import record_command as market_record

    cfg = _config(config, set_)
    symbols = None
    if cfg.live.symbols == "all":  # the universe as live mode would watch it now (one exchangeInfo read)
        from cambium.market.binance_rest import RestClient
        from cambium.screener.universe import EXCHANGE_INFO_WEIGHT, Universe

        with RestClient("futures") as client:
            symbols = Universe(cfg.live.universe,
                               lambda: client.get("/exchangeInfo", weight=EXCHANGE_INFO_WEIGHT)).bootstrap()
    market_record(out, streams=",".join(cfg.live.streams(cfg.features.streams, symbols)), market="futures",
                  duration=duration, max_frames=None, config=None, overrides=[])


def demo(runs_dir: Path = Path("runs"), speed: float = 30.0) -> Path:
    """Serve the committed BTC/ETH captures through the local replay websocket server and run the live path on them:
    rich table, status page and Prometheus metrics, all offline, registered in `runs_dir` as a screener live run (its
    status.json is what `cambium dashboard` shows); then the deterministic replay digest.

    The replay's feature snapshots, predictions and rank events go to `<runs_dir>/screener_demo/store` (Parquet,
    replaced on each run) and its digest and counts to `<runs_dir>/screener_demo/replay.json`; returns that directory.
    """
    from cambium.market.binance import route_usdm
    from cambium.market.captures import iter_hftbacktest
    from cambium.market.replay_server import ReplayServer
    from cambium.screener.replay import read_expected, replay, write_expected
    from cambium.screener.storage import ScreenerStore

    for path in [SAMPLE_CONFIG, *SAMPLE_CAPTURES]:
        if not path.is_file():
            raise DataError(f"{path} not found: run the demo from the repository root")
    # Paced at `speed`× recorded time, one second of wall-clock lag between the two connections is `speed` seconds of
    # exchange time: the clock's skew tolerance scales with it.
    cfg = load(SAMPLE_CONFIG, ScreenerConfig,
               ["notify.terminal.enabled=true", f"features.max_skew_ms={int(speed * 1000)}"])
    records = list(heapq.merge(*(iter_hftbacktest(p) for p in SAMPLE_CAPTURES), key=lambda r: r.recv_ns))

    async def serve_and_watch() -> dict[str, object]:
        async with ReplayServer(records, speed=speed, serves=lambda ep, s: route_usdm(s) == ep) as srv:
            ws = WsConfig(futures_public_url=srv.url("public"), futures_market_url=srv.url("market"))
            return await asyncio.to_thread(run_with_status, cfg, ws, max_events=len(srv.frames),
                                           duration_s=(records[-1].recv_ns - records[0].recv_ns) / 1e9 / speed + 20,
                                           runs_dir=runs_dir)

    status = asyncio.run(serve_and_watch())
    rows: list[dict[str, Any]] = status["top"]  # type: ignore[assignment]
    top = ", ".join(f"{r['rank']}. {r['symbol']} {r['score']:.3f}" for r in rows)
    console.print(f"top-K at the end of the live run: {top or '(empty)'}")
    out = Path(runs_dir) / "screener_demo"
    # The store numbers its files after those already there: a rerun replaces the last demo's rows, never adds to them.
    shutil.rmtree(out / "store", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    replay_cfg = load(SAMPLE_CONFIG, ScreenerConfig)
    result = replay(SAMPLE_CAPTURES, replay_cfg, store=ScreenerStore(replay_cfg.storage, out / "store"))
    write_expected(out / "replay.json", result, replay_cfg, SAMPLE_CAPTURES)
    want = read_expected(SAMPLE_CONFIG.with_suffix(".expected.json"))
    verdict = "matches" if want["digest"] == result.digest else "DIFFERS FROM"
    console.print(f"replay digest {result.digest} ({result.rank_events} rank events) {verdict} the committed one")
    console.print(f"replay snapshots, predictions and rank events: {out / 'store'} (Parquet, DuckDB-readable)")
    train_demo(runs_dir, out)
    return out


def train_demo(runs_dir: Path, out: Path) -> None:
    """`screener train` in seconds: the committed BTC 1 m klines (2 m / 5 m models, shortened: 3 folds, 60 trees)
    and the committed captures (every horizon through the feature engine, where six minutes hold enough rows); then
    the captures replayed with the kline models, under the default ranker thresholds and the sample's."""
    from cambium.screener.replay import replay
    from cambium.screener.train import train

    quick = ["train.cv_folds=3", "train.lightgbm.n_estimators=60", "train.bootstrap=50"]
    klines_cfg = load(Path("configs/screener/default.toml"), ScreenerConfig,
                      [*quick, f"train.out_dir={out / 'artifacts-klines'}"])
    console.print("screener train on the committed BTCUSDT 1 m klines (shortened: 3 folds, 60 trees)")
    klines = train(klines_cfg, runs_dir, name="demo-klines")
    _print_train(klines, klines_cfg)
    ticks_cfg = load(Path("configs/screener/train-ticks.toml"), ScreenerConfig,
                     [f"train.out_dir={out / 'artifacts-ticks'}"])
    console.print("screener train on the committed BTCUSDT/ETHUSDT captures (through the feature engine)")
    _print_train(train(ticks_cfg, runs_dir, name="demo-ticks"), ticks_cfg)
    for name, cfg in (("default", load_data({}, ScreenerConfig, [f"model.artifacts_dir={klines.out_dir}"])),
                      (str(SAMPLE_CONFIG), load(SAMPLE_CONFIG, ScreenerConfig,
                                                [f"model.artifacts_dir={klines.out_dir}"]))):
        result = replay(SAMPLE_CAPTURES, cfg)
        console.print(f"replay of the captures with the kline models and the {name} thresholds "
                      f"({result.counts.get('snapshots', 0)} predictions): {result.rank_events} rank events")
        why = result.why_no_events(cfg)
        if why is not None:
            console.print(why)


@app.command("demo")
def demo_command(
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Directory that receives the demo's files "
                                  "(screener_demo/: the replay's Parquet store and digest) and its registered runs."),
    speed: float = typer.Option(30.0, "--speed", min=0.1, help="Pace of the served captures (× recorded speed)."),
) -> None:
    """The live path offline: the committed captures through the local replay websocket server (rich table, status
    page, metrics), then the deterministic replay digest, stored with its rows under --runs-dir."""
    demo(runs_dir, speed)
