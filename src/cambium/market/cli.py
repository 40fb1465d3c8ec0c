"""`cambium market ...`: thin commands over the candle store, downloader, recorder and replay server."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from cambium.core.config import load, load_data
from cambium.core.errors import CambiumError
from cambium.market.candles import find_gaps
from cambium.market.config import CONFIG_MODEL, MarketConfig
from cambium.market.importers import FORMATS, read_kline_file
from cambium.market.store import MARKETS, CandleStore

app = typer.Typer(help="Market data: candle store, Binance downloader, recorder and replay.", no_args_is_help=True)
console = Console(soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config (root model cambium.market.config.MarketConfig).")
SetOpt = typer.Option([], "--set", help="Override a config value, e.g. --set store.root=/data/market.")


def _config(path: Path | None, overrides: list[str]) -> MarketConfig:
    if path is None:
        return load_data({}, CONFIG_MODEL, overrides)
    return load(path, CONFIG_MODEL, overrides)


def _market_of(path: Path, market: str | None) -> str:
    if market:
        return market
    return "spot" if any("spot" in part for part in path.parts) else "futures"


@app.command("import")
def import_command(
    paths: list[Path] = typer.Argument(..., help="Kline files (.csv, .csv.gz, .json) in any supported format."),
    market: str | None = typer.Option(None, help="futures or spot; default: 'spot' if the path says so."),
    symbol: str | None = typer.Option(None, help="Symbol; default from the file name."),
    interval: str | None = typer.Option(None, help="Interval (1m, 1h, ...); default from the timestamps."),
    fmt: str | None = typer.Option(None, "--format", help=f"One of {', '.join(FORMATS)}; default: detected."),
    config: Path | None = ConfigOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """Validate kline files and store them in the Parquet candle store (merging with what is there)."""
    cfg = _config(config, overrides)
    for path in paths:
        got = read_kline_file(path, symbol=symbol, interval=interval, fmt=fmt)
        store = CandleStore(cfg.store.root, _market_of(path, market))
        info = store.write(got.symbol, got.interval, got.table, merge=True)
        gaps = store.gaps(got.symbol, got.interval)
        console.print(
            f"{path}: {got.fmt} → {info.market}/{info.interval}/{info.symbol}: {info.rows} rows, {gaps.describe()}"
        )


@app.command("validate")
def validate_command(
    paths: list[Path] = typer.Argument(None, help="Kline files to check; default: every stored partition."),
    market: str | None = typer.Option(None, help="Only this market when checking the store."),
    config: Path | None = ConfigOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """Check files or the whole store against every candle rule; report gaps. Exit 1 if anything is invalid."""
    cfg = _config(config, overrides)
    failures = 0
    if paths:
        for path in paths:
            try:
                got = read_kline_file(path)
                gaps = find_gaps(got.table.column("open_time").to_numpy(), got.interval)
                console.print(f"ok {path}: {got.table.num_rows} rows, {gaps.describe()}")
            except CambiumError as exc:
                failures += 1
                console.print(f"[red]invalid[/red] {exc}")
    else:
        for m in [market] if market else list(MARKETS):
            store = CandleStore(cfg.store.root, m)
            for info in store.ls():
                try:
                    gaps = store.gaps(info.symbol, info.interval)
                    console.print(f"ok {m}/{info.interval}/{info.symbol}: {info.rows} rows, {gaps.describe()}")
                except CambiumError as exc:
                    failures += 1
                    console.print(f"[red]invalid[/red] {exc}")
    if failures:
        raise typer.Exit(1)


@app.command("ls")
def ls_command(
    market: str | None = typer.Option(None, help="Only this market."),
    config: Path | None = ConfigOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """List the stored partitions: market, interval, symbol, rows and time span."""
    from datetime import UTC, datetime

    cfg = _config(config, overrides)
    table = Table("market", "interval", "symbol", "rows", "first (UTC)", "last (UTC)")

    def fmt_ms(ms: int | None) -> str:
        return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")

    for m in [market] if market else list(MARKETS):
        for info in CandleStore(cfg.store.root, m).ls():
            table.add_row(m, info.interval, info.symbol, str(info.rows), fmt_ms(info.first_open_time),
                          fmt_ms(info.last_open_time))
    console.print(table)


def _parse_day(text: str) -> int:
    from datetime import UTC, datetime

    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        if text.isdigit():
            return int(text)
        raise CambiumError(f"date {text!r} is neither YYYY-MM-DD nor epoch ms") from None
    return int(day.timestamp() * 1000)


@app.command("download")
def download_command(
    market: str = typer.Option("futures", help="futures (USDⓈ-M) or spot."),
    symbols: str = typer.Option("", help="Comma-separated symbols, e.g. BTCUSDT,ETHUSDT."),
    top: int = typer.Option(0, help="Instead of --symbols: the N symbols with the largest 24 h quote volume."),
    interval: str = typer.Option("1h", help="Kline interval."),
    since: str = typer.Option("2023-01-01", help="First day (UTC, YYYY-MM-DD) or epoch ms; resumes after it."),
    until: str | None = typer.Option(None, help="Last open time (UTC day or epoch ms); default: now."),
    config: Path | None = ConfigOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """Download closed klines into the candle store, resuming from the last stored candle of each symbol."""
    from cambium.core.progress import progress
    from cambium.market.binance_rest import RestClient
    from cambium.market.candles import interval_ms
    from cambium.market.downloader import download_klines

    cfg = _config(config, overrides)
    store = CandleStore(cfg.store.root, market)
    since_ms = _parse_day(since)
    until_ms = _parse_day(until) if until else None
    incidents = Path(cfg.store.root) / "_incidents.jsonl"
    with RestClient(market, cfg.rest, incident_log=incidents) as client:
        client.exchange_info()
        names = client.top_by_quote_volume(top) if top else [s.strip().upper() for s in symbols.split(",") if s]
        if not names:
            raise CambiumError("no symbols: pass --symbols BTCUSDT,ETHUSDT or --top N")
        import time

        step = interval_ms(interval)
        end = until_ms if until_ms is not None else int(time.time() * 1000)
        total = 0
        for s in names:
            last = store.last_open_time(s, interval)
            first = since_ms if last is None else last + step
            total += max(0, (end - first) // step)
        with progress(f"download {market} {interval} ({len(names)} symbols)", total=total, unit="candles") as bar:
            report = download_klines(client, store, names, interval, since_ms, until_ms=until_ms, bar=bar)
    for s, n in report.candles.items():
        console.print(f"{s}: {n} new candles")
    console.print(f"{report.pages} pages, {report.requests} requests, {len(report.incidents)} incidents")


@app.command("archive")
def archive_command(
    kind: str = typer.Option(..., help="aggTrades, bookTicker (futures only) or klines."),
    symbols: str = typer.Option(..., help="Comma-separated symbols, e.g. BTCUSDT,ETHUSDT."),
    start: str = typer.Option(..., help="First UTC day, YYYY-MM-DD."),
    end: str = typer.Option(..., help="Last UTC day, YYYY-MM-DD (inclusive)."),
    out: Path = typer.Option(Path("data/archive"), help="Directory receiving <market>/<kind>/<SYMBOL>/*.csv.gz."),
    market: str = typer.Option("futures", help="futures (USDⓈ-M) or spot."),
    interval: str = typer.Option("1m", help="Kline interval (kind klines)."),
    base_url: str = typer.Option("https://data.binance.vision", help="Archive root (tests point it at 127.0.0.1)."),
    timeout: float = typer.Option(60.0, min=1.0, help="Per-request timeout, seconds."),
    retries: int = typer.Option(4, min=0, help="Retries of a request after a connection error, 5xx or 429."),
) -> None:
    """Download Binance's public daily archives, verify each zip's sha256 and keep its CSV (gzip); days already
    on disk are skipped, days the archive lacks are listed."""
    import httpx

    from cambium.core.progress import progress
    from cambium.market.archive import days, download_archive

    names = [s.strip().upper() for s in symbols.split(",") if s.strip()]
    if not names:
        raise CambiumError("no symbols: pass --symbols BTCUSDT,ETHUSDT")
    day_list = days(start, end)
    with httpx.Client(timeout=timeout, follow_redirects=True) as client, \
            progress(f"archive {market} {kind}", total=len(names) * len(day_list), unit="day") as bar:
        report = download_archive(client, out, market, kind, names, day_list, interval=interval, base_url=base_url,
                                  on_day=lambda _: bar.advance(), retries=retries)
    console.print(f"{len(report.written)} days written, {len(report.skipped)} already there, "
                  f"{len(report.missing)} not in the archive under {out} ({report.retried} requests retried)")
    for url in report.missing:
        console.print(f"  missing: {url}")


@app.command("import-capture")
def import_capture_command(
    path: Path = typer.Argument(..., help="A capture file: hftbacktest '<ns> <json>' lines or cryptofeed *.ws.*."),
    out: Path = typer.Argument(..., help="Directory of the new recording (must be empty or absent)."),
    kind: str = typer.Option("hftbacktest", help="hftbacktest or cryptofeed."),
) -> None:
    """Convert a third-party websocket capture into a cambium recording, frames byte for byte."""
    from cambium.market.captures import import_capture

    report = import_capture(path, out, kind=kind)
    console.print(f"{path} → {out}: {report.frames} frames, {report.skipped} lines skipped {report.skipped_lines}")


@app.command("replay")
def replay_command(
    recording: Path = typer.Argument(..., help="Recording directory (with manifest.json)."),
    speed: float | None = typer.Option(None, help="Recorded speed × this factor; default: as fast as possible."),
    venue: str = typer.Option("futures", help="futures or spot: how to decode the frames."),
) -> None:
    """Read a recording back (sha256-checked) and decode it: frames, events per type, malformed frames."""
    from collections import Counter

    from cambium.market.binance import ControlReply, MalformedFrame, binance_spot_venue, binance_usdm_venue
    from cambium.market.recorder import replay

    v = binance_usdm_venue() if venue == "futures" else binance_spot_venue()
    kinds: Counter[str] = Counter()
    frames = malformed = 0
    for rec in replay(recording, speed=speed):
        frames += 1
        try:
            out = v.decode(rec.frame, rec.recv_ns)
        except MalformedFrame:
            malformed += 1
            continue
        if not isinstance(out, ControlReply):
            kinds.update(ev.type for ev in out)
    detail = ", ".join(f"{k}={n}" for k, n in sorted(kinds.items()))
    console.print(f"{recording}: {frames} frames, events {detail}, {malformed} not decodable")


@app.command("serve")
def serve_command(
    recording: Path = typer.Argument(..., help="Recording directory to serve."),
    port: int = typer.Option(0, help="Port on 127.0.0.1 (0 = any free port, printed)."),
    speed: float | None = typer.Option(None, help="Recorded speed × this factor; default: as fast as possible."),
    drop_after: int | None = typer.Option(None, help="Close each connection after this many frames."),
    malformed_every: int | None = typer.Option(None, help="Send a malformed frame after every k-th frame."),
    refuse_next: int = typer.Option(0, help="Refuse this many connection attempts first (HTTP 503)."),
    control_error_every: int | None = typer.Option(None, help="Answer every k-th control message with an error."),
    universe: int | None = typer.Option(None, help="Replicate the recording over this many synthetic symbols "
                                        "S000USDT… and serve their exchangeInfo and depth snapshots on /fapi/v1/."),
    traffic: str = typer.Option("market", help="With --universe: 'market' (activity of a real cross-section) or "
                                "'stress' (every symbol as busy as the recorded ones)."),
) -> None:
    """Serve a recording as Binance combined streams on 127.0.0.1 (endpoints /public, /market, /) until Ctrl-C."""
    import asyncio

    from cambium.market.binance import route_usdm
    from cambium.market.recorder import read_recording
    from cambium.market.replay_server import Faults, ReplayServer

    records = list(read_recording(recording))
    rest: dict[str, Any] = {}
    if universe is not None:
        from cambium.market import synthetic

        names = [synthetic.synthetic_name(k) for k in range(universe)]
        snaps: dict[str, str] = {}  # no REST snapshot in a recording: built from the first book tickers
        rest = {"exchange_info": synthetic.exchange_info(names),
                "depth": synthetic.depth_bodies(records, snaps, universe)}
        records = synthetic.replicate(records, universe, traffic)
    faults = Faults(drop_after=drop_after, malformed_every=malformed_every, refuse_next=refuse_next,
                    control_error_every=control_error_every)

    def serves(endpoint: str, stream: str) -> bool:
        return endpoint == "" or route_usdm(stream) == endpoint

    async def run() -> None:
        async with ReplayServer(records, faults=faults, speed=speed, serves=serves, port=port, **rest) as srv:
            console.print(f"serving {len(srv.frames)} frames of {recording} on {srv.address} "
                          f"(/public/stream, /market/stream, /stream); {srv.stats.unservable} recorded frames "
                          "are not stream messages and are not served")
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


@app.command("record")
def record_command(
    out: Path = typer.Argument(..., help="Directory of the new recording."),
    streams: str = typer.Option(..., help="Comma-separated stream names, e.g. btcusdt@aggTrade,btcusdt@bookTicker."),
    market: str = typer.Option("futures", help="futures (USDⓈ-M) or spot."),
    duration: float | None = typer.Option(None, help="Stop after this many seconds (default: until Ctrl-C)."),
    max_frames: int | None = typer.Option(None, help="Stop after this many frames."),
    config: Path | None = ConfigOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """Record live websocket frames (with receive stamps and shard ids) into hourly gzip JSONL + manifest."""
    import asyncio
    import time

    from cambium.market.binance import binance_spot_venue, binance_usdm_venue
    from cambium.market.connector import Connector
    from cambium.market.recorder import Recorder

    cfg = _config(config, overrides)
    venue = binance_usdm_venue(cfg.ws) if market == "futures" else binance_spot_venue(cfg.ws)
    names = [s.strip() for s in streams.split(",") if s.strip()]

    async def run() -> Connector:
        conn = Connector(venue, names, cfg.ws)
        n = 0
        with Recorder(out, meta={"venue": venue.name, "streams": names}) as rec:
            async with conn:
                async def pump() -> None:
                    nonlocal n
                    flushed = time.monotonic()
                    async for record, _ in conn.deliveries():
                        rec.write(record)
                        n += 1
                        if time.monotonic() - flushed > 1.0:  # a crash loses at most ~1 s (see recorder.recover)
                            rec.flush()
                            flushed = time.monotonic()
                        if max_frames is not None and n >= max_frames:
                            return

                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(pump(), duration)
                except asyncio.CancelledError:
                    rec.close()  # Ctrl-C is how a recording without --duration ends: what came in is complete
                    raise
        return conn

    try:
        conn = asyncio.run(run())
    except KeyboardInterrupt:
        console.print("interrupted; the recording is closed and its manifest written")
        return
    for st in conn.stats:
        console.print(f"shard {st.shard} {st.endpoint} ({st.streams} streams): {st.frames} frames, "
                      f"{st.malformed} malformed, {st.connects} connects, {st.stale_reconnects} stale")


def demo(runs_dir: Path = Path("runs")) -> None:
    """Committed candles into the store, the BTCUSDT capture into a recording, then replayed live under faults."""
    from cambium.market.demo import run_demo

    out = Path(runs_dir) / "market_demo"
    res = run_demo(out)
    for p in res.partitions:
        console.print(f"store {p.market}/{p.interval}/{p.symbol}: {p.rows} candles")
    console.print(f"recording {out / 'recording'}: {res.recorded_frames} frames (sha256 manifest)")
    for st in res.shards:
        console.print(f"shard {st.shard} {st.endpoint}: {st.frames} frames, {st.malformed} malformed skipped, "
                      f"{st.connects} connections")
    console.print(f"served {res.served_frames} frames and {res.malformed_sent} malformed ones through random "
                  f"disconnects; received {res.received_frames}, lost {res.lost_frames}")


@app.command("demo")
def demo_command(
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Directory that receives the demo's files."),
) -> None:
    """Committed candles into the store, the BTCUSDT capture into a recording, then replayed live under faults."""
    demo(runs_dir)
