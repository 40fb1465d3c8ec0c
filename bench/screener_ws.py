"""Websocket client cost through the market connector: websockets vs picows, each on asyncio's and on uvloop's loop.

Run: `python -m bench.screener_ws [--quick] [--rounds N] [--frames N]` (about 2-3 minutes; --quick well under one).

The committed USDⓈ-M captures (2024-08-08 BTCUSDT + ETHUSDT, stream frames only) are served as fast as the client
reads by the local replay websocket server, in a process of its own started afresh for every run (the exchange is not
in the screener's process, and each run gets the whole feed from its first frame). The bench process runs a
`Connector` with `connect=` set to the client under test (the injection the connector has for this) and drains its
deliveries until every served frame arrived. Per run:

- `frames_per_s`: frames received / wall time from the first frame to the last (the server, on the other core, can
  bound this one on a 2-core machine);
- `cpu_us_per_frame`: CPU time of the bench process (`time.process_time`: user + system, every thread) over the run /
  frames: what a frame costs the screener's process in websocket library + asyncio + connector + `decode_binance`;
- `client_cpu_us_per_frame`: the same minus `decode_binance` alone on the same frames (timed in this process), i.e.
  what the websocket client, the event loop and the connector's bookkeeping cost.

The rounds alternate the clients (round-robin), each client's best and median over the rounds are kept; ratios are
against `websockets` (asyncio loop, the connector's default) measured in the same run: > 1 means that many times
more frames/s, or that many times less CPU per frame. The 1-minute load average at the start and end is recorded:
the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import itertools
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from bench.common import machine, make_record, parse_args, write_results
from cambium.market.binance import binance_usdm_venue, decode_binance, route_usdm
from cambium.market.captures import iter_hftbacktest
from cambium.market.config import WsConfig
from cambium.market.connector import Connector
from cambium.market.recorder import Record
from cambium.market.replay_server import ReplayServer
from cambium.market.ws_picows import connect as picows_connect

REPO = Path(__file__).resolve().parents[1]
CAPTURES = [REPO / f"data/samples/market/ws/binance_usdm_hftbacktest/{s}_20240808.gz" for s in ("btcusdt", "ethusdt")]
CLIENTS = ("websockets", "websockets+uvloop", "picows", "picows+uvloop")


def stream_frames(n: int) -> list[Record]:
    """The first `n` stream frames of the merged captures, in receive order (inline REST snapshots left out)."""
    merged = heapq.merge(*(iter_hftbacktest(p) for p in CAPTURES), key=lambda r: r.recv_ns)
    return list(itertools.islice((r for r in merged if r.frame.startswith('{"stream"')), n))


def _serve(n: int, ports: Any, done: Any) -> None:
    async def run() -> None:
        async with ReplayServer(stream_frames(n), serves=lambda ep, s: route_usdm(s) == ep) as srv:
            ports.put(srv.port)
            while not done.is_set():
                await asyncio.sleep(0.05)

    asyncio.run(run())


def _client(name: str) -> tuple[Callable[..., Any] | None, Callable[[], asyncio.AbstractEventLoop] | None]:
    connect = picows_connect if name.startswith("picows") else None  # None: the connector's default, websockets
    loop = uvloop.new_event_loop if name.endswith("+uvloop") else None
    return connect, loop


def one_run(name: str, n: int, streams: list[str]) -> dict[str, float]:
    """Serve `n` frames from a fresh server process and drain them through a Connector on client `name`."""
    ctx = mp.get_context("spawn")
    ports, done = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(n, ports, done), daemon=True)
    server.start()
    try:
        url = f"ws://127.0.0.1:{ports.get(timeout=120)}"
        cfg = WsConfig(futures_public_url=f"{url}/public", futures_market_url=f"{url}/market", ping_interval_s=None)
        connect, loop_factory = _client(name)

        async def drain() -> dict[str, float]:
            conn = Connector(binance_usdm_venue(cfg), streams, cfg, connect=connect)
            got = 0
            gc.collect()
            cpu0 = time.process_time()
            first = last = 0.0
            async with conn:
                async for _rec, _events in conn.deliveries():
                    got += 1
                    if got == 1:
                        first = time.perf_counter()
                    if got == n:
                        last = time.perf_counter()
                        break
            cpu = time.process_time() - cpu0
            return {"frames": got, "frames_per_s": (n - 1) / (last - first), "cpu_us_per_frame": cpu / n * 1e6}

        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(asyncio.wait_for(drain(), 300))
    finally:
        done.set()
        server.join(10)
        if server.is_alive():
            server.kill()


def decode_us_per_frame(frames: list[Record], rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        t0 = time.process_time()
        for r in frames:
            decode_binance(r.frame, r.recv_ns, "binance_usdm")
        best = min(best, time.process_time() - t0)
    return best / len(frames) * 1e6


def main() -> None:
    def options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rounds", type=int, default=None, help="runs per client (default 5, --quick 2)")
        p.add_argument("--frames", type=int, default=None, help="frames per run (default 120000, --quick 20000)")

    args = parse_args(__doc__.splitlines()[0], extra=options)
    n = args.frames or (20_000 if args.quick else 120_000)
    rounds = args.rounds or (2 if args.quick else 5)
    frames = stream_frames(n)
    n = len(frames)
    streams = sorted({r.frame[11: r.frame.index('"', 11)] for r in frames})
    load_start = os.getloadavg()[0]
    decode_us = decode_us_per_frame(frames)
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in CLIENTS}
    for k in range(rounds):
        for name in CLIENTS:
            run = one_run(name, n, streams)
            runs[name].append(run)
            print(f"round {k + 1}/{rounds} {name:<18} {run['frames_per_s']:>9,.0f} frames/s "
                  f"{run['cpu_us_per_frame']:6.1f} µs CPU/frame", flush=True)
    facts = machine()
    facts.update(load_avg_1m_start=round(load_start, 2), frames=n, rounds=rounds,
                 decode_us_per_frame=round(decode_us, 2))
    summary: dict[str, dict[str, float]] = {}
    for name, rs in runs.items():
        fps = [r["frames_per_s"] for r in rs]
        cpu = [r["cpu_us_per_frame"] for r in rs]
        summary[name] = {"fps_best": max(fps), "fps_median": statistics.median(fps), "cpu_best": min(cpu),
                         "cpu_median": statistics.median(cpu)}
    base = summary["websockets"]
    out = []
    for name, s in summary.items():
        facts_c = {**facts, "runs": runs[name]}
        for stat in ("best", "median"):
            out.append(make_record(f"{name}_{stat}", "frames_per_s", s[f"fps_{stat}"], "frames/s",
                                   f"websockets_{stat}", base[f"fps_{stat}"], higher_is_better=True,
                                   machine_facts=facts_c))
            out.append(make_record(f"{name}_{stat}", "cpu_us_per_frame", s[f"cpu_{stat}"], "µs",
                                   f"websockets_{stat}", base[f"cpu_{stat}"], higher_is_better=False,
                                   machine_facts=facts_c))
            out.append(make_record(f"{name}_{stat}", "client_cpu_us_per_frame", s[f"cpu_{stat}"] - decode_us, "µs",
                                   f"websockets_{stat}", base[f"cpu_{stat}"] - decode_us, higher_is_better=False,
                                   machine_facts=facts_c))
    print(f"decode_binance alone: {decode_us:.2f} µs/frame; load avg 1 min {load_start:.2f} → "
          f"{os.getloadavg()[0]:.2f}")
    write_results("screener_ws", out, args.results_dir)


if __name__ == "__main__":
    main()
