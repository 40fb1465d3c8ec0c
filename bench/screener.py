"""Screener throughput and live latency on the committed USDⓈ-M captures (2024-08-08 BTCUSDT + ETHUSDT).

Run: `python -m bench.screener [--quick]`.
- `replay_events_per_s`: frames through decode → features → model → score → rank (the replay path, in memory), against
  orjson parsing alone of the same frames, in the same run: the ratio is the share of the physical limit of this
  design (every frame must at least be parsed) that the whole pipeline reaches.
- `decode_events_per_s`: frames through `decode_binance` only (parse + typed wire struct + MarketEvent).
- `replay_synced_events_per_s`: as `replay_events_per_s`, but with the captures' inline REST depth snapshots kept, so
  the L2 book syncs and applies every depth diff (what `cambium screener replay` does); the other rows leave them out,
  so the book stays unsynced and buffers its diffs, as in live mode today.
- `live_p95_ms_<N>sym`: p95 of frame received → rank decision on the live path (local replay websocket server →
  connector → session) with the captures replicated across N symbol names, paced at recorded speed; the reference is
  the p95 of the same frames processed in-process with no transport (what the pipeline alone costs per frame).
Each timed section starts after a full garbage collection, so the objects the bench itself built (the frames) are not
collected on the pipeline's clock; collections the pipeline causes are timed.
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from bench.common import machine, make_record, parse_args, write_results
from cambium.core.config import load
from cambium.market.binance import decode_binance, route_usdm
from cambium.market.captures import iter_hftbacktest
from cambium.market.config import WsConfig
from cambium.market.recorder import Record
from cambium.market.replay_server import ReplayServer
from cambium.screener.config import ScreenerConfig
from cambium.screener.live import run_live
from cambium.screener.observability import ScreenerMetrics
from cambium.screener.replay import Session
from cambium.screener.sources import DecodeStats, decode_record

CAPTURES = [Path(f"data/samples/market/ws/binance_usdm_hftbacktest/{s}_20240808.gz") for s in ("btcusdt", "ethusdt")]
CONFIG = Path("configs/screener/sample-replay.toml")


def all_records(limit: int | None = None) -> list[tuple[Record, str]]:
    """The first `limit` frames of the merged captures, inline REST snapshots included, with the file's symbol."""
    tagged = [((r, p.name.split("_")[0].upper()) for r in iter_hftbacktest(p)) for p in CAPTURES]
    return list(itertools.islice(heapq.merge(*tagged, key=lambda rs: rs[0].recv_ns), limit))


def records(limit: int | None = None) -> list[Record]:
    return [r for r, _ in all_records(limit) if r.frame.startswith('{"stream"')]


def replay_synced(tagged: list[tuple[Record, str]], cfg: ScreenerConfig) -> None:
    session, stats = Session(cfg), DecodeStats()
    for r, symbol in tagged:
        for ev in decode_record(r, symbol, "binance_usdm", stats):
            session.on_event(ev)
    session.finish()


def throughput(recs: list[Record], tagged: list[tuple[Record, str]], cfg: ScreenerConfig, facts: dict[str, Any],
               rounds: int) -> list[dict[str, Any]]:
    frames = [r.frame for r in recs]
    best = {"parse": float("inf"), "decode": float("inf"), "pipeline": float("inf"), "synced": float("inf"),
            "parse_synced": float("inf")}

    def timed(name: str, fn: Callable[[], None]) -> None:
        gc.collect()
        t = time.perf_counter()
        fn()
        best[name] = min(best[name], time.perf_counter() - t)

    def pipeline() -> None:
        session = Session(cfg)
        for r in recs:
            for ev in decode_binance(r.frame, r.recv_ns, "binance_usdm"):  # type: ignore[union-attr]
                session.on_event(ev)
        session.finish()

    def parse() -> None:
        for f in frames:
            orjson.loads(f)

    def parse_synced() -> None:
        for r, _ in tagged:
            orjson.loads(r.frame)

    def decode() -> None:
        for r in recs:
            decode_binance(r.frame, r.recv_ns, "binance_usdm")

    for _ in range(rounds):
        timed("parse", parse)
        timed("decode", decode)
        timed("pipeline", pipeline)
        timed("parse_synced", parse_synced)
        timed("synced", lambda: replay_synced(tagged, cfg))
    rate = {k: len(frames) / v for k, v in best.items()}
    rate["synced"], rate["parse_synced"] = len(tagged) / best["synced"], len(tagged) / best["parse_synced"]
    return [
        make_record("replay_events_per_s", "parse→features→model→score→rank", rate["pipeline"], "events/s",
                    "orjson parse only", rate["parse"], higher_is_better=True, machine_facts=facts),
        make_record("decode_events_per_s", "decode_binance", rate["decode"], "events/s", "orjson parse only",
                    rate["parse"], higher_is_better=True, machine_facts=facts),
        make_record("replay_synced_events_per_s", "parse→features (synced L2 book)→model→score→rank",
                    rate["synced"], "events/s", "orjson parse only", rate["parse_synced"], higher_is_better=True,
                    machine_facts=facts),
    ]


def replicate(recs: list[Record], n_symbols: int) -> list[Record]:
    """The frames renamed to n_symbols symbols (BTC's to the even ones, ETH's to the odd ones)."""
    out = []
    for r in recs:
        base = "btcusdt" if r.frame.startswith('{"stream":"btcusdt') else "ethusdt"
        for k in range(0 if base == "btcusdt" else 1, n_symbols, 2):
            name = f"s{k:03d}usdt"
            frame = r.frame.replace(base, name, 1).replace(base.upper(), name.upper(), 1)
            out.append(Record(r.recv_ns, r.mono_ns, 0, frame))
    return out


def live_p95(recs: list[Record], n_symbols: int, cfg: ScreenerConfig) -> tuple[float, float]:
    reps = replicate(recs, n_symbols)
    symbols = tuple(f"S{k:03d}USDT" for k in range(n_symbols))
    live_cfg = cfg.model_copy(update={"live": cfg.live.model_copy(update={"symbols": symbols})})
    metrics = ScreenerMetrics()

    async def run() -> None:
        async with ReplayServer(reps, speed=1.0, serves=lambda ep, s: route_usdm(s) == ep) as srv:
            ws = WsConfig(futures_public_url=srv.url("public"), futures_market_url=srv.url("market"))
            span = (reps[-1].mono_ns - reps[0].mono_ns) / 1e9
            await run_live(live_cfg, ws, Session(live_cfg), metrics, max_events=len(srv.frames), duration_s=span + 30)

    asyncio.run(run())
    live = metrics.p95_latency_s() or float("nan")
    session, lat = Session(live_cfg), []
    for r in reps:
        t = time.perf_counter_ns()
        for ev in decode_binance(r.frame, r.recv_ns, "binance_usdm"):  # type: ignore[union-attr]
            session.on_event(ev)
        lat.append((time.perf_counter_ns() - t) / 1e9)
    lat.sort()
    return live * 1e3, lat[int(0.95 * (len(lat) - 1))] * 1e3


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("screener throughput and live latency on the committed captures", argv)
    facts = machine("cpu")
    cfg = load(CONFIG, ScreenerConfig)
    tagged = all_records(30_000 if args.quick else None)
    recs = [r for r, _ in tagged if r.frame.startswith('{"stream"')]
    out = throughput(recs, tagged, cfg, facts, rounds=1 if args.quick else 3)
    seconds = 5 if args.quick else 20
    head = [r for r in recs if r.recv_ns - recs[0].recv_ns < seconds * 1e9]
    for n in (20, 200, 400):
        live, inproc = live_p95(head, n, cfg)
        out.append(make_record(f"live_p95_ms_{n}sym", "frame received → rank decision, p95", live, "ms",
                               "in-process pipeline p95 (no transport)", inproc, higher_is_better=False,
                               machine_facts=facts))
    write_results("screener", out, args.results_dir)


if __name__ == "__main__":
    main()
