"""Symbol-sharded worker processes feeding one ranker (SCR-13), live (`shard_replay` replays the same way).

Split. `shard_of(symbol, n)` (a hash of the name, mod n) gives each symbol one worker. A worker runs the first half of
the pipeline for its symbols — connector (its own connections), feature engine, model — in a `ShardSession`, whose
ticks are predicted and sent, not ranked. The parent runs the second half once for everyone: it merges each tick's
predictions from every worker (in symbol order, as one process would list them) and runs score → rank → digest →
notifiers through `Session.on_predictions`. Rank events exist only in the parent, so a worker's death can neither
lose nor repeat one: the ranker keeps its state, and the dead worker's symbols keep their last score until the
restarted worker (new generation; anything an older generation still had in flight is ignored) has resynced their
books from REST depth snapshots and predicts again.

Transport (`Channel`): Redis Streams when `REDIS_URL` is set (XADD by the workers to one stream, XREAD by the
parent; `RedisChannel`), else the embedded default, one multiprocessing pipe per worker (`PipeChannel`). Messages are
msgspec `ShardMessage`s, the same bytes on both.

Merge (live). Tick ts is ranked once every live worker has reported a tick ≥ ts, or `features.cadence_ms` of wall time
after its first report (a silent shard must not stall the market); predictions for a tick already ranked are dropped
and counted (`dropped['late_tick']`): those symbols keep their previous score for one tick.

Shard stats (`ShardedRunner.shard_stats()`, one plain dict per worker, what the Prometheus collector and the status
page read; every count is cumulative over the worker's generations unless said otherwise):
    shard           worker index
    symbols         symbols assigned now
    alive           bool: the current generation is running and has reported
    generation      restarts so far (0 for the first process)
    frames          data frames received;  events  market events decoded from them
    ticks           ticks predicted and sent
    snapshots       REST depth snapshots applied;  snapshot_errors  those that failed
    malformed       frames refused by the decoder (all of the worker's connections)
    connects        websocket connections opened;  disconnects  closed
    incidents       dict HTTP status → rate-limit incidents ('429', '418') on the worker's websocket handshakes
    rest_incidents  the same on its REST depth snapshots
    dropped         dict reason → events dropped on purpose: 'shed_depth' (load shedding), 'unlisted' (a delisted
                    symbol), 'late_tick' (predictions that missed their tick's merge; counted by the parent),
                    'dead_worker' (messages from an older generation)
    latency_p95_ms  p95 frame received → worker decision over the last report, the frames that closed a tick left
                    out (their decision is the parent's: `ShardedResult.tick_latency`); None before the first
    cpu_s           CPU seconds the worker process used since its first frame (its start-up left out)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from cambium.core.errors import CambiumError, ConfigError
from cambium.market.config import RestConfig, WsConfig
from cambium.screener.config import ScreenerConfig
from cambium.screener.contracts import FeatureSnapshot, PredictionSnapshot, RankEvent
from cambium.screener.features import FeatureEngine
from cambium.screener.observability import ScreenerMetrics
from cambium.screener.replay import Session
from cambium.screener.shard_transport import PipeChannel, RedisChannel, RedisSender
from cambium.screener.universe import EXCHANGE_INFO_WEIGHT, Universe

__all__ = ["ShardMessage", "ShardSession", "ShardedResult", "ShardedRunner", "shard_of"]

log = logging.getLogger("cambium.screener.shards")

STATS_EVERY_S = 0.5


def shard_of(symbol: str, n: int) -> int:
    """The worker of `symbol` among `n` (stable across runs and machines; blake2b, because CRC's low bits barely
    change between names that differ in one digit)."""
    return int.from_bytes(hashlib.blake2b(symbol.encode(), digest_size=8).digest(), "little") % n


class ShardMessage(msgspec.Struct, frozen=True):
    """What a worker sends: kind 'tick' (ts, predictions, recv_ns of the frame that closed it), 'stats' or 'hello'."""

    kind: str
    worker: int
    generation: int
    ts: int = 0
    recv_ns: int = 0
    predictions: list[PredictionSnapshot] = msgspec.field(default_factory=list)
    stats: dict[str, Any] = msgspec.field(default_factory=dict)
    samples: list[tuple[int, float]] = msgspec.field(default_factory=list)
    """(recv_ns, frame received → worker decision in ms) of each frame since the last report, when asked for."""


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(ShardMessage)


class ShardSession(Session):
    """A worker's session: features and model for its own symbols; each tick's predictions go to `outbox`."""

    def __init__(self, cfg: ScreenerConfig, owns: Any = None) -> None:
        super().__init__(cfg)
        if owns is not None:
            self.engine = FeatureEngine(cfg.features, owns=owns)
        self.outbox: list[tuple[int, list[PredictionSnapshot]]] = []

    def _step(self, ts: int, tick: list[FeatureSnapshot]) -> list[RankEvent]:
        self.outbox.append((ts, [pred for _, pred in self.pipeline.predict(tick)]))
        return []


# --- live worker ----------------------------------------------------------------------------------------------------

def _p95(xs: list[float]) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[int(0.95 * (len(xs) - 1))]


def _live_worker(worker: int, generation: int, symbols: list[str], cfg_json: str, ws_json: str,
                 rest_url: str | None, sink: Any, redis: tuple[str, str] | None, keep_samples: bool) -> None:
    """Body of a live worker process (see the module docstring)."""
    from cambium.market.binance_rest import RestClient
    from cambium.screener.live import LiveResult, run_live
    from cambium.screener.observability import ScreenerMetrics

    # The parent stops a worker with SIGINT; a parent started in the background (`cmd &`) passes SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg = ScreenerConfig.model_validate_json(cfg_json)
    ws = WsConfig.model_validate_json(ws_json)
    out = RedisSender(*redis) if redis is not None else sink
    session = ShardSession(cfg)
    result = LiveResult(0, 0, [])
    conns: list[Any] = []
    latencies: list[float] = []
    samples: list[tuple[int, float]] = []
    sent = {"ticks": 0, "cpu0": -1.0}

    def send(msg: ShardMessage) -> None:
        out.send_bytes(_ENCODER.encode(msg))

    def stats() -> dict[str, Any]:
        shards = [st for c in conns for st in c.stats]
        return {"frames": sum(st.frames for st in shards), "events": result.events, "ticks": sent["ticks"],
                "snapshots": result.snapshots, "snapshot_errors": result.snapshot_errors,
                "malformed": sum(st.malformed for st in shards), "connects": sum(st.connects for st in shards),
                "disconnects": sum(st.disconnects for st in shards), "dropped": dict(result.dropped),
                "incidents": _merge_counts(*(st.incidents for st in shards)),
                "rest_incidents": dict(rest.incident_counts) if rest is not None else {},
                "latency_p95_ms": _p95(latencies),
                "cpu_s": 0.0 if sent["cpu0"] < 0 else time.process_time() - sent["cpu0"]}

    def probe(record: Any, decided: int) -> None:
        if sent["cpu0"] < 0:
            sent["cpu0"] = time.process_time()
        if session.outbox:  # the frame closed a tick: its decision is the parent's rank step, timed there
            for ts, preds in session.outbox:
                send(ShardMessage("tick", worker, generation, ts, record.recv_ns, preds))
                sent["ticks"] += 1
            session.outbox.clear()
        else:
            latency = (decided - record.recv_ns) / 1e6
            latencies.append(latency)
            if keep_samples:
                samples.append((record.recv_ns, latency))

    def report() -> None:
        send(ShardMessage("stats", worker, generation, stats=stats(), samples=list(samples)))
        latencies.clear()
        samples.clear()

    async def main() -> None:
        async def reporter() -> None:
            while True:
                await asyncio.sleep(STATS_EVERY_S)
                report()

        task = asyncio.create_task(reporter())
        try:
            await run_live(cfg, ws, session, ScreenerMetrics(), connector=conns, rest=rest, probe=probe,
                           symbols=tuple(symbols), result=result)
        finally:
            task.cancel()

    rest = RestClient("futures", RestConfig(futures_url=rest_url)) if rest_url else None
    send(ShardMessage("hello", worker, generation))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    report()


# --- live parent ----------------------------------------------------------------------------------------------------

@dataclass
class _Worker:
    index: int
    symbols: list[str]
    process: Any = None
    generation: int = -1
    alive: bool = False
    max_ts: int = -(2**62)
    stats: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)  # counts of the generations before this one
    parent_dropped: dict[str, int] = field(default_factory=dict)  # what the parent dropped of this worker's


@dataclass
class ShardedResult:
    rank_events: list[RankEvent]
    ticks: int
    restarts: int
    shards: list[dict[str, Any]]
    dropped: dict[str, int]
    universe_reads: int = 0
    tick_latency: list[tuple[int, float]] = field(default_factory=list)
    """(recv_ns, ms): the frame that closed a tick, received in its worker → the parent's rank decision."""
    frame_latency: list[tuple[int, float]] = field(default_factory=list)
    """(recv_ns, ms): every other frame, received → its worker's decision (with `keep_samples`)."""


_COUNTS = ("dropped", "incidents", "rest_incidents")  # dicts of counts, kept across a worker's restarts
_ADDITIVE = ("frames", "events", "ticks", "snapshots", "snapshot_errors", "malformed", "connects", "disconnects",
             "cpu_s")


class ShardedRunner:
    """The parent of a sharded live run: spawns the workers, merges and ranks, restarts the dead, follows the
    universe. `session` is the parent's Session (its pipeline ranks; its engine is unused)."""

    def __init__(self, cfg: ScreenerConfig, ws: WsConfig, session: Session, *, workers: int,
                 rest_url: str | None = None, redis_url: str | None = None, namespace: str | None = None,
                 metrics: ScreenerMetrics | None = None, keep_samples: bool = False,
                 start_method: Literal["forkserver", "fork"] = "forkserver") -> None:
        """`start_method` "forkserver" (default: workers forked from a clean server process, safe with the status
        page's threads) or "fork" (no start-up cost; for a caller without threads whose main module is costly to
        import, like the benchmark)."""
        if workers < 1:
            raise ConfigError(f"live.workers={workers}: the sharded runner needs at least one worker")
        self.cfg = cfg
        self.ws = ws
        self.session = session
        self.metrics = metrics
        self.keep_samples = keep_samples
        self.n = workers
        self.rest_url = rest_url
        self.redis_url = redis_url
        self.ctx: Any = mp.get_context(start_method)
        if start_method == "forkserver":
            self.ctx.set_forkserver_preload(["cambium.screener.shards", "cambium.screener.live"])
        self.namespace = namespace or f"cambium:screener:{os.getpid()}"
        self.channel: PipeChannel | RedisChannel = (RedisChannel(redis_url, self.namespace) if redis_url
                                                    else PipeChannel())
        self.workers = [_Worker(i, []) for i in range(workers)]
        self.pending: dict[int, dict[int, list[PredictionSnapshot]]] = {}
        self.first_seen: dict[int, tuple[float, int]] = {}
        self.dropped: dict[str, int] = {}
        self.result = ShardedResult([], 0, 0, [], self.dropped)
        self.universe: Universe | None = None
        self._cfg_json = cfg.model_dump_json()
        self._ws_json = ws.model_dump_json()

    # workers
    def assign(self, symbols: Sequence[str]) -> list[int]:
        """Give each worker its symbols; returns the workers whose set changed."""
        shares: list[list[str]] = [[] for _ in range(self.n)]
        for s in sorted(symbols):
            shares[shard_of(s, self.n)].append(s)
        changed = [i for i, w in enumerate(self.workers) if w.symbols != shares[i]]
        for i in changed:
            self.workers[i].symbols = shares[i]
        return changed

    def start(self, i: int) -> None:
        w = self.workers[i]
        self.stop_worker(i)
        w.base = {k: w.base.get(k, 0) + w.stats.get(k, 0) for k in _ADDITIVE}
        for key in _COUNTS:
            w.base[key] = _merge_counts(w.base.get(key, {}), w.stats.get(key, {}))
        w.stats = {}
        w.generation += 1
        w.alive = False
        if not w.symbols:
            return
        sink = self.channel.open(i) if isinstance(self.channel, PipeChannel) else None
        redis = (self.redis_url, self.channel.key) if isinstance(self.channel, RedisChannel) else None
        w.process = self.ctx.Process(target=_live_worker, name=f"screener-shard-{i}", daemon=True, args=(
            i, w.generation, w.symbols, self._cfg_json, self._ws_json, self.rest_url, sink, redis, self.keep_samples))
        w.process.start()
        if sink is not None:
            sink.close()

    def stop_worker(self, i: int) -> None:
        p = self.workers[i].process
        if p is not None and p.exitcode is None:
            p.terminate()
            p.join(5)
            if p.exitcode is None:
                p.kill()
                p.join(5)
        self.workers[i].process = None

    def _stop_all(self, grace_s: float = 5.0) -> None:
        """Ask every worker to stop (SIGINT: it closes its connections and sends its last report), take what they
        send while they stop, then end the stragglers."""
        for w in self.workers:
            if w.process is not None and w.process.exitcode is None and w.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.process.pid, signal.SIGINT)
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            for data in self.channel.receive(0.05):
                self._take(data)
            if all(w.process is None or w.process.exitcode is not None for w in self.workers):
                break
        for data in self.channel.receive(0.05):
            self._take(data)
        for i in range(self.n):
            self.stop_worker(i)

    def shard_stats(self) -> list[dict[str, Any]]:
        out = []
        for w in self.workers:
            d: dict[str, Any] = {k: w.base.get(k, 0) + w.stats.get(k, 0) for k in _ADDITIVE}
            d["dropped"] = _merge_counts(w.base.get("dropped", {}), w.stats.get("dropped", {}),
                                         w.parent_dropped)
            for key in ("incidents", "rest_incidents"):
                d[key] = _merge_counts(w.base.get(key, {}), w.stats.get(key, {}))
            d.update(shard=w.index, symbols=len(w.symbols), alive=w.alive, generation=max(0, w.generation),
                     latency_p95_ms=w.stats.get("latency_p95_ms"))
            out.append(d)
        return out

    def _drop(self, reason: str, n: int = 1, worker: _Worker | None = None) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        if worker is not None:
            worker.parent_dropped[reason] = worker.parent_dropped.get(reason, 0) + n

    # merge
    def _take(self, data: bytes) -> None:
        try:
            msg = _DECODER.decode(data)
        except msgspec.DecodeError as exc:
            log.warning("shard transport: undecodable message skipped: %s", exc)
            self._drop("undecodable")
            return
        if not 0 <= msg.worker < self.n:
            self._drop("undecodable")
            return
        w = self.workers[msg.worker]
        if msg.generation != w.generation:
            self._drop("dead_worker", 1, w)
            return
        w.alive = True
        if msg.kind == "stats":
            w.stats = msg.stats
            self.result.frame_latency.extend(msg.samples)
        elif msg.kind == "tick":
            if self.session._last_tick is not None and msg.ts <= self.session._last_tick:
                self._drop("late_tick", len(msg.predictions), w)
                return
            w.max_ts = max(w.max_ts, msg.ts)
            self.pending.setdefault(msg.ts, {})[msg.worker] = msg.predictions
            self.first_seen.setdefault(msg.ts, (time.monotonic(), msg.recv_ns))

    def _merge_ready(self, force: bool = False) -> None:
        wait_s = self.cfg.features.cadence_ms / 1000
        now = time.monotonic()
        while self.pending:
            ts = min(self.pending)
            live = [w for w in self.workers if w.alive and w.symbols]
            complete = all(w.max_ts >= ts for w in live)
            if not (complete or force or now - self.first_seen[ts][0] >= wait_s):
                return
            parts = self.pending.pop(ts)
            _, recv_ns = self.first_seen.pop(ts)
            merged = sorted((p for preds in parts.values() for p in preds), key=lambda p: p.symbol)
            events = self.session.on_predictions(ts, merged)
            decided = time.time_ns()
            self.result.tick_latency.append((recv_ns, (decided - recv_ns) / 1e6))
            if self.metrics is not None:  # the frames that closed a tick: their latency includes the merge and rank
                self.metrics.observe_frame(recv_ns, ts, decided)
            self.result.ticks += 1
            self.result.rank_events.extend(events)

    def _check_workers(self) -> None:
        for w in self.workers:
            p = w.process
            if p is None or p.exitcode is None:
                continue
            if self.result.restarts >= self.cfg.live.worker_restarts:
                raise CambiumError(f"shard worker {w.index} died (exit code {p.exitcode}) and "
                                   f"live.worker_restarts={self.cfg.live.worker_restarts} restarts are used up")
            log.warning("shard worker %d (generation %d) died with exit code %s: restarting it; its %d symbols' "
                        "books resync from REST snapshots", w.index, w.generation, p.exitcode, len(w.symbols))
            self.result.restarts += 1
            w.process = None
            self.start(w.index)

    def _follow_universe(self, due: float) -> float:
        if self.universe is None or time.monotonic() < due:
            return due
        change = self.universe.refresh()
        self.result.universe_reads += 1
        if change:
            log.info("universe: +%d -%d symbols", len(change.added), len(change.removed))
            for i in self.assign(self.universe.symbols):
                self.start(i)
        return time.monotonic() + self.cfg.live.universe.refresh_s

    def run(self, *, duration_s: float | None = None, symbols: Sequence[str] | None = None,
            until: Any = None) -> ShardedResult:
        """Run until `duration_s`, or `until(runner)` returns true (checked every loop), or KeyboardInterrupt."""
        if symbols is None:
            symbols = self._symbols()
        for i in self.assign(symbols):
            self.start(i)
        end = None if duration_s is None else time.monotonic() + duration_s
        due = time.monotonic() + self.cfg.live.universe.refresh_s
        try:
            while end is None or time.monotonic() < end:
                for data in self.channel.receive(0.02):
                    self._take(data)
                self._merge_ready()
                self._check_workers()
                due = self._follow_universe(due)
                if until is not None and until(self):
                    break
        finally:
            self._stop_all()
            self._merge_ready(force=True)
            self.result.rank_events.extend(self.session.finish())
            self.channel.close()
        self.result.shards = self.shard_stats()
        return self.result

    def _symbols(self) -> tuple[str, ...]:
        live = self.cfg.live
        if live.symbols != "all":
            return tuple(live.symbols)
        from cambium.market.binance_rest import RestClient

        client = RestClient("futures", RestConfig(futures_url=self.rest_url) if self.rest_url else None)
        self.universe = Universe(live.universe, lambda: client.get("/exchangeInfo", weight=EXCHANGE_INFO_WEIGHT))
        self.universe.bootstrap()
        return self.universe.symbols


def _merge_counts(*counts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out
