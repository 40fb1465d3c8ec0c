"""Deterministic symbol-sharded replay (SCR-13): `replay_sharded`, the replay form of `cambium.screener.shards`.

Replay is deterministic: every worker reads the whole recording itself; its engine keeps state
only for its own symbols (`FeatureEngine(owns=...)`) but moves its clock with every event, so every worker closes the
same bars at the same events. Each reports its ticks and a watermark (the last closed bar) every `REPLAY_BATCH`
events; the parent ranks a tick once every watermark has passed it, so the merged ticks are exactly those of one
process: the digest does not depend on the worker count (a test holds 1, 2 and 4 workers equal to `replay`).
"""

from __future__ import annotations

import heapq
import multiprocessing as mp
import multiprocessing.connection as mpc
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from cambium.core.errors import CambiumError, ConfigError, DataError
from cambium.market.events import MarketEvent
from cambium.screener.config import ScreenerConfig
from cambium.screener.contracts import PredictionSnapshot
from cambium.screener.replay import Session
from cambium.screener.shards import ShardMessage, ShardSession, shard_of
from cambium.screener.sources import DecodeStats, iter_events

__all__ = ["replay_sharded"]

REPLAY_BATCH = 4096


def _merged_events(paths: Sequence[str]) -> Iterable[MarketEvent]:
    """The events of recordings merged in receive-time order, as `replay` reads them."""
    sources = [iter_events(Path(p), stats=DecodeStats()) for p in paths]
    return sources[0] if len(sources) == 1 else heapq.merge(*sources, key=lambda e: e.recv_ts)


def _replay_worker(worker: int, n: int, cfg_json: str, conn: Any, paths: list[str]) -> None:
    """A replay worker: reads the recordings itself; after every `REPLAY_BATCH` events it sends its ticks and its
    watermark (every tick up to it is final)."""
    cfg = ScreenerConfig.model_validate_json(cfg_json)
    mine: dict[str, bool] = {}

    def owns(symbol: str) -> bool:
        got = mine.get(symbol)
        if got is None:
            got = mine[symbol] = shard_of(symbol, n) == worker
        return got

    session = ShardSession(cfg, owns=owns)

    def report(final: bool) -> None:
        if final:
            session._ticks(session.engine.flush())
        bar_end = session.engine.bar_end
        # every tick up to the mark is final: the closed bars (none yet, or during a clock resync: nothing)
        mark = 2**62 if final else -(2**62) if bar_end is None else bar_end - cfg.features.cadence_ms
        msgs = [ShardMessage("tick", worker, 0, ts, 0, preds) for ts, preds in session.outbox]
        msgs.append(ShardMessage("mark", worker, 0, mark))
        conn.send_bytes(_BATCH_ENCODER.encode(msgs))
        session.outbox.clear()

    batch = 0
    for ev in _merged_events(paths):
        session.on_event(ev)
        batch += 1
        if batch == REPLAY_BATCH:
            report(False)
            batch = 0
    report(True)
    conn.close()


_BATCH_ENCODER = msgspec.msgpack.Encoder()
_BATCH_DECODER = msgspec.msgpack.Decoder(list[ShardMessage])


def replay_sharded(paths: Sequence[Path], cfg: ScreenerConfig, workers: int) -> tuple[str, int]:
    """Replay recordings (merged in receive-time order, as `replay` does) through `workers` processes, each reading
    them itself, and one ranker; returns (digest, rank events), equal to `replay(paths, cfg)`'s for every count."""
    if not paths:
        raise DataError("replay_sharded needs at least one recording")
    if workers < 1:
        raise ConfigError(f"workers={workers} must be >= 1")
    names = [str(p) for p in paths]
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["cambium.screener.shard_replay"])
    session = Session(cfg)
    pipes, procs = [], []
    cfg_json = cfg.model_dump_json()
    for k in range(workers):
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_replay_worker, args=(k, workers, cfg_json, theirs, names), daemon=True)
        proc.start()
        theirs.close()
        pipes.append(ours)
        procs.append(proc)
    marks = [-(2**62)] * workers
    pending: dict[int, list[PredictionSnapshot]] = {}
    n_events = 0

    def take(k: int) -> None:
        for msg in _BATCH_DECODER.decode(pipes[k].recv_bytes()):
            if msg.kind == "mark":
                marks[k] = msg.ts
            else:
                pending.setdefault(msg.ts, []).extend(msg.predictions)

    def rank(upto: int) -> None:
        nonlocal n_events
        for ts in sorted(t for t in pending if t <= upto):
            merged = sorted(pending.pop(ts), key=lambda p: p.symbol)
            n_events += len(session.on_predictions(ts, merged))

    try:
        while min(marks) < 2**62:
            for conn in mpc.wait([pipes[k] for k in range(workers) if marks[k] < 2**62]):
                take(pipes.index(conn))  # type: ignore[arg-type]
            rank(min(marks))
        rank(2**62)
        n_events += len(session.finish())
    except EOFError:
        raise CambiumError("a replay worker died before it finished (see its error above)") from None
    finally:
        for proc in procs:
            proc.join(10)
            if proc.exitcode is None:
                proc.kill()
    return session.digest, n_events
