"""Screener throughput and live latency on the committed USDⓈ-M captures (2024-08-08 BTCUSDT + ETHUSDT).

Run: `python -m bench.screener [--quick]`.
- `replay_events_per_s`: frames through decode → features → model → score → rank (the replay path, in memory), against
  orjson parsing alone of the same frames, in the same run: the ratio is the share of the physical limit of this
  design (every frame must at least be parsed) that the whole pipeline reaches.
- `decode_events_per_s`: frames through `decode_binance` only (parse + typed wire struct + MarketEvent).
- `replay_synced_events_per_s`: as `replay_events_per_s`, but with the captures' inline REST depth snapshots kept, so
  the L2 book syncs and applies every depth diff (what `cambium screener replay` does); the other rows leave them out,
  so the book stays unsynced and buffers its diffs, as in live mode today.
- `live_recv_p95_ms_<N>sym` / `live_send_p95_ms_<N>sym`: p95 over every frame after a 1 s warm-up of frame received
  (the connector's stamp) → rank decision, and of server send → rank decision (loopback transport, kernel and
  websocket buffers included), on the live path: the local replay websocket server, in a process of its own as the
  exchange would be, paces the captures' first 20 s (5 s with --quick) at recorded speed to `cambium.screener.live`
  over N symbols. Traffic "market" (no suffix): each symbol's frame rate follows its activity in the real 300-pair
  USDⓈ-M cross-section (`replicate`, `activity_shares`); "stress" (`_stress`): every symbol as busy as BTC/ETH in
  the capture. The reference is the p95 of the same frames processed in-process with no transport.
Each timed section starts after a full garbage collection, so the objects the bench itself built (the frames) are not
collected on the pipeline's clock; collections the pipeline causes are timed.
"""

from __future__ import annotations

import asyncio
import csv
import gc
import gzip
import heapq
import itertools
import multiprocessing as mp
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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
ACTIVITY = Path("data/samples/market/activity/usdm_trades_30d.csv")
WARMUP_NS = 1_000_000_000


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


def activity_shares(n_symbols: int) -> list[float]:
    """Activity of n_symbols symbols relative to BTCUSDT (trades in 30 days), read off the 300-pair USDⓈ-M
    cross-section at evenly spaced quantiles, busiest first: a typical market of that many symbols."""
    rows = list(csv.DictReader(ACTIVITY.read_text(encoding="utf-8").splitlines()))
    btc = next(int(r["trades"]) for r in rows if r["symbol"] == "BTCUSDT")
    shares = np.array([int(r["trades"]) / btc for r in rows])
    return [float(np.quantile(shares, 1 - (k + 0.5) / n_symbols)) for k in range(n_symbols)]


def replicate(recs: list[Record], n_symbols: int, traffic: str) -> list[Record]:
    """The frames renamed to n_symbols symbols (BTC's to the even ones, ETH's to the odd ones).

    traffic "stress": every symbol gets every frame of its base, as busy as BTC/ETH in the capture's busiest minutes.
    traffic "market": symbol k gets each frame of its base with probability min(1, share_k) (`activity_shares`, seeded
    per symbol), so its frame rate follows its activity; a depth diff it keeps is as large as BTC's/ETH's.
    """
    shares = activity_shares(n_symbols) if traffic == "market" else [1.0] * n_symbols
    rngs = [random.Random(k) for k in range(n_symbols)]
    out = []
    for r in recs:
        base = "btcusdt" if r.frame.startswith('{"stream":"btcusdt') else "ethusdt"
        for k in range(0 if base == "btcusdt" else 1, n_symbols, 2):
            if shares[k] < 1.0 and rngs[k].random() >= shares[k]:
                continue
            name = f"s{k:03d}usdt"
            frame = r.frame.replace(base, name, 1).replace(base.upper(), name.upper(), 1)
            out.append(Record(r.recv_ns, r.mono_ns, 0, frame))
    return out


def _serve(frames: list[Record], ports: Any, done: Any, sends: Any) -> None:
    """The replay server in a process of its own (the exchange is not in the screener's process)."""

    async def run() -> None:
        async with ReplayServer(frames, speed=1.0, serves=lambda ep, s: route_usdm(s) == ep, log_sends=True) as srv:
            gc.collect()
            gc.freeze()  # the exchange's own collection pauses are not the screener's
            ports.put(srv.port)
            while not done.is_set():
                await asyncio.sleep(0.1)
            sends.put(srv.stats.sends)

    asyncio.run(run())


def live_config(reps: list[Record], cfg: ScreenerConfig) -> ScreenerConfig:
    """`cfg` subscribed to every symbol the frames name."""
    symbols = tuple(sorted({r.frame[11 : r.frame.index("@")].upper() for r in reps}))
    return cfg.model_copy(update={"live": cfg.live.model_copy(update={"symbols": symbols})})


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[int(0.95 * (len(xs) - 1))] if xs else float("nan")


def inproc_p95_ms(reps: list[Record], cfg: ScreenerConfig) -> float:
    """p95 of the same frames decoded and taken by a session in-process, with no transport."""
    session, inproc = Session(cfg), []
    for r in reps:
        t0 = time.perf_counter_ns()
        for ev in decode_binance(r.frame, r.recv_ns, "binance_usdm"):  # type: ignore[union-attr]
            session.on_event(ev)
        inproc.append((time.perf_counter_ns() - t0) / 1e6)
    return p95(inproc)


def live_latency(reps: list[Record], cfg: ScreenerConfig) -> dict[str, float]:
    """p95 of frame received → decision and of server send → decision over every frame after the warm-up, with the
    server in another process pacing the frames at recorded speed."""
    ctx = mp.get_context("spawn")
    ports, sends_q, done = ctx.Queue(), ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(reps, ports, done, sends_q), daemon=True)
    server.start()
    url = f"ws://127.0.0.1:{ports.get(timeout=120)}"
    ws = WsConfig(futures_public_url=f"{url}/public", futures_market_url=f"{url}/market")
    decided: list[tuple[Record, int]] = []
    span = (reps[-1].mono_ns - reps[0].mono_ns) / 1e9
    gc.collect()
    asyncio.run(run_live(cfg, ws, Session(cfg), ScreenerMetrics(), max_events=len(reps), duration_s=span + 30,
                         probe=lambda rec, t: decided.append((rec, t))))
    done.set()
    sends = sends_q.get(timeout=120)
    server.join(timeout=30)
    sent_ns = {reps[i].frame: t for i, t in sends}
    # Warm-up: the first second after the first send is left out. While the subscriptions are still going out the
    # replay server sends a newly subscribed stream's frames from the start of the recording at once, a burst that
    # a live exchange (which sends only what happens after the SUBSCRIBE) never produces.
    warm = min(t for _, t in sends) + WARMUP_NS
    timed = [(rec, t, sent_ns[rec.frame]) for rec, t in decided if sent_ns.get(rec.frame, 0) >= warm]
    return {"recv_p95_ms": p95([(t - rec.recv_ns) / 1e6 for rec, t, _ in timed]),
            "send_p95_ms": p95([(t - sent) / 1e6 for _, t, sent in timed]),
            "frames_offered": len(reps), "frames_sent": len(sends), "frames_decided": len(decided),
            "frames_timed": len(timed), "offered_frames_per_s": len(reps) / span, "span_s": span}


def live_rows(head: list[Record], cfg: ScreenerConfig, facts: dict[str, Any], repeats: int) -> list[dict[str, Any]]:
    """Each case run `repeats` times; the row holds the median p95 and every run's p95 (`runs`)."""
    out = []
    for traffic, sizes in (("market", (20, 200, 400)), ("stress", (20, 50, 100))):
        for n in sizes:
            reps = replicate(head, n, traffic)
            case_cfg = live_config(reps, cfg)
            runs = [live_latency(reps, case_cfg) for _ in range(repeats)]
            inproc = inproc_p95_ms(reps, case_cfg)
            suffix = "" if traffic == "market" else "_stress"
            for key, what in (("recv", "frame received → rank decision"), ("send", "server send → rank decision")):
                p95s = [r[f"{key}_p95_ms"] for r in runs]
                rec = make_record(f"live_{key}_p95_ms_{n}sym{suffix}", f"{what}, p95 ({traffic} traffic), median of "
                                  f"{repeats}", float(np.median(p95s)), "ms", "in-process pipeline p95 (no transport)",
                                  inproc, higher_is_better=False, machine_facts=facts)
                out.append({**rec, "traffic": traffic, "symbols": n, "runs": p95s, **{k: runs[0][k] for k in (
                    "frames_offered", "frames_sent", "frames_decided", "frames_timed", "offered_frames_per_s",
                    "span_s")}})
    return out


def derive_activity(src: Path, out: Path, days: int = 30) -> None:
    """Write ACTIVITY from the 1 h USDⓈ-M klines collection (one `<SYMBOL>.csv.gz` per pair): each pair's trades and
    quote volume over the `days` × 24 hourly bars ending at the latest bar common to most pairs."""
    tables = {}
    for path in sorted(src.glob("*.csv.gz")):
        with gzip.open(path, "rt") as f:
            tables[path.name.split(".")[0]] = list(csv.DictReader(f))
    end = Counter(int(rows[-1]["timestamp"]) for rows in tables.values() if rows).most_common(1)[0][0]
    start = end - days * 24 * 3600 * 1000
    with out.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["symbol", "trades", "quote_volume", "bars", "first_bar_ms", "last_bar_ms"])
        for symbol, rows in tables.items():
            window = [r for r in rows if start < int(r["timestamp"]) <= end]
            if window:
                w.writerow([symbol, sum(int(r["trades"]) for r in window),
                            f"{sum(float(r['quote_volume']) for r in window):.2f}", len(window),
                            window[0]["timestamp"], window[-1]["timestamp"]])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("screener throughput and live latency on the committed captures", argv,
                      lambda p: p.add_argument("--derive-activity", type=Path, metavar="KLINES_1H_DIR",
                                               help=f"rewrite {ACTIVITY} from a 1 h klines collection and exit"))
    if args.derive_activity is not None:
        ACTIVITY.parent.mkdir(parents=True, exist_ok=True)
        derive_activity(args.derive_activity, ACTIVITY)
        return
    facts = machine("cpu")
    cfg = load(CONFIG, ScreenerConfig)
    tagged = all_records(30_000 if args.quick else None)
    recs = [r for r, _ in tagged if r.frame.startswith('{"stream"')]
    out = throughput(recs, tagged, cfg, facts, rounds=1 if args.quick else 3)
    seconds = 5 if args.quick else 20
    head = [r for r in recs if r.recv_ns - recs[0].recv_ns < seconds * 1e9]
    out += live_rows(head, cfg, facts, repeats=1 if args.quick else 3)
    write_results("screener", out, args.results_dir)


if __name__ == "__main__":
    main()
