"""Screener throughput and live latency on the committed USDⓈ-M captures (2024-08-08 BTCUSDT + ETHUSDT).

Run: `python -m bench.screener [--quick]` (the full table takes about 6-8 minutes on 2 cores).
- `replay_events_per_s`: frames through decode → features → model → score → rank (the replay path, in memory), against
  orjson parsing alone of the same frames, in the same run: the ratio is the share of the physical limit of this
  design (every frame must at least be parsed) that the whole pipeline reaches.
- `decode_events_per_s`: frames through `decode_binance` only (parse + typed wire struct + MarketEvent).
- `replay_synced_events_per_s`: as `replay_events_per_s`, but with the captures' inline REST depth snapshots kept, so
  the L2 book syncs and applies every depth diff (what `cambium screener replay` does); the other rows leave them out,
  so the book stays unsynced and buffers its diffs, as in live mode today.
- `live_recv_p95_ms_<N>sym[_stress]_w<K>`: p95 over every frame after a 1 s warm-up of frame received (the
  connector's stamp) → decision, on the live path: the local replay websocket server, in a process of its own as the
  exchange would be, paces the captures' first 6 s (3 s with --quick) at recorded speed over N synthetic symbols
  (`cambium.market.synthetic.replicate`). Traffic "market" (no suffix): each symbol's frame rate follows its activity
  in the real 300-pair USDⓈ-M cross-section; "stress" (`_stress`): every symbol as busy as BTC/ETH in the capture.
  K = 1: one process does everything (`live.workers = 0`, today's default path); K = 2, 4: K worker processes
  (connector, features, model for their share of the symbols, `cambium.screener.shards`) and the ranker in the
  parent; a frame's decision is its worker's, or for a frame that closed a tick, the parent's rank step. The reference
  is the p95 of the same frames processed in-process with no transport. `live_send_p95_ms_*_w1`: server send →
  decision (K = 1 only: the bench process sees every decision).
- `cpu_us_per_frame_<stage>` (540 symbols of market traffic): CPU per frame of decode, features, model + score +
  rank (timed offline on the same frames), and of the rest of the live process (websocket library, asyncio, the
  connector: its CPU time per frame in the K = 1 run minus those three); `cpu_us_per_frame_workers_w<K>` /
  `_parent_w<K>`: the worker processes' and the parent's CPU per frame in the K-worker runs.
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
import time
from collections import Counter
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
from cambium.market.synthetic import ACTIVITY, replicate
from cambium.screener.config import ScreenerConfig
from cambium.screener.live import run_live
from cambium.screener.observability import ScreenerMetrics
from cambium.screener.replay import Session
from cambium.screener.shards import ShardedRunner
from cambium.screener.sources import DecodeStats, decode_record

CAPTURES = [Path(f"data/samples/market/ws/binance_usdm_hftbacktest/{s}_20240808.gz") for s in ("btcusdt", "ethusdt")]
CONFIG = Path("configs/screener/sample-replay.toml")
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


def _start_server(reps: list[Record]) -> tuple[Any, WsConfig, Any, Any]:
    """The replay server in a process of its own (fork: no re-import of this module and torch per case); returns
    (process, the client's WsConfig, the stop event, the queue of its send stamps)."""
    ctx = mp.get_context("fork")
    ports, sends_q, done = ctx.Queue(), ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(reps, ports, done, sends_q), daemon=True)
    server.start()
    url = f"ws://127.0.0.1:{ports.get(timeout=120)}"
    return server, WsConfig(futures_public_url=f"{url}/public", futures_market_url=f"{url}/market"), done, sends_q


def live_latency(reps: list[Record], cfg: ScreenerConfig) -> dict[str, float]:
    """p95 of frame received → decision and of server send → decision over every frame after the warm-up, with the
    server in another process pacing the frames at recorded speed."""
    server, ws, done, sends_q = _start_server(reps)
    decided: list[tuple[Record, int]] = []
    cpu: list[float] = []  # process CPU time at the first and the latest decision (start-up left out)

    def probe(rec: Record, t: int) -> None:
        decided.append((rec, t))
        if not cpu:
            cpu.append(time.process_time())
        elif len(decided) % 256 == 0:
            cpu[1:] = [time.process_time()]

    span = (reps[-1].mono_ns - reps[0].mono_ns) / 1e9
    gc.collect()
    asyncio.run(run_live(cfg, ws, Session(cfg), ScreenerMetrics(), max_events=len(reps), duration_s=span + 5,
                         probe=probe))
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
            "frames_timed": len(timed), "offered_frames_per_s": len(reps) / span, "span_s": span,
            "cpu_us_per_frame": (cpu[-1] - cpu[0]) / max(1, (len(decided) // 256) * 256 - 1) * 1e6}


def sharded_latency(reps: list[Record], cfg: ScreenerConfig, workers: int) -> dict[str, float]:
    """As `live_latency` with `workers` worker processes and the ranker in this process: p95 of frame received →
    decision (the worker's, or the parent's rank step for a frame that closed a tick), and the CPU per frame of the
    workers and of the parent."""
    server, ws, done, sends_q = _start_server(reps)
    span = (reps[-1].mono_ns - reps[0].mono_ns) / 1e9
    session = Session(cfg)
    runner = ShardedRunner(cfg, ws, session, workers=workers, keep_samples=True, start_method="fork")

    started: list[float] = []

    def served(r: ShardedRunner) -> bool:
        """Every frame decided, or the server's span plus 5 s since the workers are up (as the one-process case)."""
        if not started and all(w.alive for w in r.workers if w.symbols):
            started.append(time.monotonic())
        late = bool(started) and time.monotonic() - started[0] > span + 5
        return late or sum(st["frames"] for st in r.shard_stats()) >= len(reps)

    gc.collect()
    cpu0 = time.process_time()
    res = runner.run(duration_s=span + 30, symbols=list(cfg.live.symbols), until=served)  # start-up included
    parent_cpu = time.process_time() - cpu0
    done.set()
    sends = sends_q.get(timeout=120)
    server.join(timeout=30)
    warm = min(t for _, t in sends) + WARMUP_NS
    lat = [ms for recv, ms in [*res.frame_latency, *res.tick_latency] if recv >= warm]
    frames = max(1, sum(st["frames"] for st in res.shards))
    return {"recv_p95_ms": p95(lat), "frames_offered": len(reps), "frames_sent": len(sends),
            "frames_decided": sum(st["frames"] for st in res.shards), "frames_timed": len(lat),
            "offered_frames_per_s": len(reps) / span, "span_s": span,
            "worker_cpu_us_per_frame": sum(st["cpu_s"] for st in res.shards) / frames * 1e6,
            "parent_cpu_us_per_frame": parent_cpu / frames * 1e6,
            "dropped": sum(sum(st["dropped"].values()) for st in res.shards)}


def stage_cpu(reps: list[Record], cfg: ScreenerConfig) -> dict[str, float]:
    """CPU µs per frame of decode, features and model + score + rank over `reps`, in-process with no transport."""
    decoded = []
    gc.collect()
    t = time.process_time()
    for r in reps:
        decoded.append(decode_binance(r.frame, r.recv_ns, "binance_usdm"))
    decode_s = time.process_time() - t
    session = Session(cfg)
    stepped = [0.0]
    step = session.pipeline.step

    def timed_step(ts: int, snaps: Any) -> Any:
        t0 = time.process_time()
        out = step(ts, snaps)
        stepped[0] += time.process_time() - t0
        return out

    session.pipeline.step = timed_step  # type: ignore[method-assign]
    gc.collect()
    t = time.process_time()
    for events in decoded:
        for ev in events:  # type: ignore[union-attr]
            session.on_event(ev)
    total_s = time.process_time() - t
    n = len(reps)
    return {"decode": decode_s / n * 1e6, "features": (total_s - stepped[0]) / n * 1e6,
            "model_score_rank": stepped[0] / n * 1e6}


def live_rows(head: list[Record], cfg: ScreenerConfig, facts: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    """Every case once (on a shared machine the noise shows in the runs of neighbouring sizes: rerun for medians)."""
    out = []
    cases = ((("market", (100, 540)), ("stress", (50,))) if quick else
             (("market", (100, 200, 400, 540)), ("stress", (50, 100, 200))))
    worker_counts = (1, 2) if quick else (1, 2, 4)
    keys = ("frames_offered", "frames_sent", "frames_decided", "frames_timed", "offered_frames_per_s", "span_s")
    for traffic, sizes in cases:
        for n in sizes:
            reps = replicate(head, n, traffic)
            case_cfg = live_config(reps, cfg)
            inproc = inproc_p95_ms(reps, case_cfg)
            suffix = "" if traffic == "market" else "_stress"
            for k in worker_counts:
                if k == 1:
                    run = live_latency(reps, case_cfg)
                    pairs = (("recv", "frame received → decision"), ("send", "server send → decision"))
                else:
                    run = sharded_latency(reps, case_cfg.model_copy(update={"live": case_cfg.live.model_copy(
                        update={"workers": k})}), k)
                    pairs = (("recv", "frame received → decision"),)
                for key, what in pairs:
                    rec = make_record(f"live_{key}_p95_ms_{n}sym{suffix}_w{k}", f"{what}, p95 ({traffic} traffic, "
                                      f"{'one process' if k == 1 else f'{k} workers + ranker'})",
                                      run[f"{key}_p95_ms"], "ms", "in-process pipeline p95 (no transport)", inproc,
                                      higher_is_better=False, machine_facts=facts)
                    out.append({**rec, "traffic": traffic, "symbols": n, "workers": k,
                                **{x: run[x] for x in keys}, **{x: run[x] for x in run if x.endswith("per_frame")}})
                print(f"{traffic:6s} {n:4d} sym  w{k}: p95 {run['recv_p95_ms']:.2f} ms  "
                      f"({run['frames_decided']}/{run['frames_offered']} frames)", flush=True)
                if traffic == "market" and n == max(sizes):
                    out += cpu_rows(reps, case_cfg, run, k, facts)
    return out


def cpu_rows(reps: list[Record], cfg: ScreenerConfig, run: dict[str, Any], workers: int,
             facts: dict[str, Any]) -> list[dict[str, Any]]:
    """The CPU per frame by stage of the largest market case (see the module docstring)."""
    if workers == 1:
        stages = stage_cpu(reps, cfg)
        total = run["cpu_us_per_frame"]
        stages["transport_asyncio_rest"] = max(0.0, total - sum(stages.values()))
        return [make_record(f"cpu_us_per_frame_{stage}", f"CPU per frame: {stage} ({len(reps)} frames, "
                            f"{live_symbols(reps)} symbols, market traffic)", us, "µs",
                            "whole live process CPU per frame", total, higher_is_better=False, machine_facts=facts)
                for stage, us in stages.items()]
    return [make_record(f"cpu_us_per_frame_{who}_w{workers}", f"CPU per frame of the {who} ({workers} workers)",
                        run[f"{who[:-1] if who == 'workers' else who}_cpu_us_per_frame"], "µs",
                        "—", None, higher_is_better=False, machine_facts=facts) for who in ("workers", "parent")]


def live_symbols(reps: list[Record]) -> int:
    return len({r.frame[11 : r.frame.index("@")] for r in reps})


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
    out = throughput(recs, tagged, cfg, facts, rounds=1 if args.quick else 2)
    seconds = 3 if args.quick else 6
    head = [r for r in recs if r.recv_ns - recs[0].recv_ns < seconds * 1e9]
    out += live_rows(head, cfg, facts, args.quick)
    write_results("screener", out, args.results_dir)


if __name__ == "__main__":
    main()
