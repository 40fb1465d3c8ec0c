"""SCR-10: Prometheus metrics of the live path and a status page (FastAPI) with shard health and the current top-K.

Metrics live in a registry of their own (not the process-global one), so several sessions can coexist in a process.
Shard counters are copied from the connector's `ShardStats` each time the page or `/metrics` is read.

The page listens on 127.0.0.1 only, but a browser visiting a hostile site can still be pointed at it through DNS
rebinding (a name the attacker controls that resolves to 127.0.0.1): such requests carry the attacker's name in `Host`,
so only the loopback names are accepted and any other `Host` gets a 400.
"""

from __future__ import annotations

import html
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cambium.core.files import atomic_write
from cambium.market.connector import ShardStats
from cambium.screener.replay import Session

__all__ = ["LOOPBACK_HOSTS", "ScreenerMetrics", "StatusFile", "StatusServer", "status_app", "status_document"]

STATUS_HOST = "127.0.0.1"
LOOPBACK_HOSTS = (STATUS_HOST, "localhost")

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ScreenerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Gauge("cambium_screener_messages_total", "Data frames received per shard", ["shard"],
                              registry=r)
        self.message_rate = Gauge("cambium_screener_messages_per_second", "Data frames per second per shard "
                                  "(since the previous read)", ["shard"], registry=r)
        self.reconnects = Gauge("cambium_screener_reconnects_total", "Reconnections per shard (connects − 1)",
                                ["shard"], registry=r)
        self.malformed = Gauge("cambium_screener_malformed_frames_total", "Malformed frames counted and skipped, by "
                               "reason (json, envelope, event, payload, utf8)", ["shard", "reason"], registry=r)
        self.incidents = Counter("cambium_screener_incidents_total", "Rate-limit incidents (HTTP 429 / 418)",
                                 ["kind"], registry=r)
        self.dropped = Gauge("cambium_screener_dropped_events_total", "Events dropped by full notifier queues",
                             registry=r)
        self.lag = Histogram("cambium_screener_event_lag_seconds", "Receive time minus exchange event time",
                             buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=r)
        self.stale = Gauge("cambium_screener_stale_ms", "Time since the last update at the latest snapshot",
                           ["symbol", "stream"], registry=r)
        self.latency = Histogram("cambium_screener_e2e_latency_seconds", "Frame received → rank decision",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self._recent: deque[float] = deque(maxlen=10_000)
        self._last_frames: dict[int, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def observe_frame(self, recv_ns: int, event_ms: int, decided_ns: int) -> None:
        """One frame: received at `recv_ns`, its (latest) exchange event time `event_ms`, decided at `decided_ns`."""
        latency = max(0.0, (decided_ns - recv_ns) / 1e9)
        self.lag.observe(max(0.0, recv_ns / 1e9 - event_ms / 1e3))
        self.latency.observe(latency)
        with self._lock:
            self._recent.append(latency)

    def p95_latency_s(self) -> float | None:
        with self._lock:
            recent = sorted(self._recent)
        return recent[int(0.95 * (len(recent) - 1))] if recent else None

    def update_shards(self, stats: Sequence[ShardStats]) -> None:
        now = time.monotonic()
        for st in stats:
            label = str(st.shard)
            self.messages.labels(label).set(st.frames)
            self.reconnects.labels(label).set(max(0, st.connects - 1))
            for reason, n in st.malformed_by_reason.items():
                self.malformed.labels(label, reason).set(n)
            prev = self._last_frames.get(st.shard)
            if prev is not None and now > prev[1]:
                self.message_rate.labels(label).set((st.frames - prev[0]) / (now - prev[1]))
            self._last_frames[st.shard] = (st.frames, now)

    def update_staleness(self, session: Session) -> None:
        for symbol, snap in session.latest.items():
            self.stale.labels(symbol, "book").set(snap.data_health.stale_book_ms)
            self.stale.labels(symbol, "trades").set(snap.data_health.stale_trades_ms)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def status_app(
    session: Session, metrics: ScreenerMetrics, shards: Callable[[], Sequence[ShardStats]], *,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
) -> Any:
    """The FastAPI app: `/` an HTML page, `/api/status` the same as JSON, `/metrics` the Prometheus text, and
    `/openapi.json` their schema. Requests whose `Host` (port aside) is not in `allowed_hosts` get a 400."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, Response
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="cambium screener", docs_url=None, redoc_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    def snapshot() -> dict[str, Any]:
        return status_document(session, metrics, shards)

    @app.get("/api/status")
    def api_status() -> dict[str, Any]:
        return snapshot()

    # `response_model=None`: under postponed annotations the return type is the string "Response", which FastAPI
    # resolves in this module's globals, where the lazily imported name is missing; it used to stay an unresolved
    # forward reference that made every `/openapi.json` answer 500.
    @app.get("/metrics", response_class=Response, response_model=None)
    def prometheus() -> Response:
        snapshot()
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        s = snapshot()
        top = "".join(f"<tr><td>{r['rank']}</td><td>{r['symbol']}</td><td>{r['score']:.4f}</td>"
                      f"<td>{_why_html(r['explanation'])}</td></tr>" for r in s["top"])
        shard_rows = "".join(f"<tr><td>{h['shard']}</td><td>{h['endpoint']}</td><td>{h['streams']}</td>"
                             f"<td>{h['frames']}</td><td>{h['connects']}</td><td>{h['malformed']}</td></tr>"
                             for h in s["shards"])
        return (
            "<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='2'>"
            "<title>cambium screener</title><style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 10px}"
            "table{border-collapse:collapse;margin-bottom:1.5em}tr:nth-child(even){background:#eee}</style></head>"
            f"<body><h1>cambium screener</h1><p>snapshots {s['snapshots']} · p95 frame→decision "
            f"{s['p95_latency_ms']} ms</p><h2>Top-K</h2><table id='top'><tr><th>rank</th><th>symbol</th>"
            f"<th>score</th><th>last alert</th></tr>{top}</table><h2>Shards</h2><table id='shards'><tr><th>shard"
            f"</th><th>endpoint</th><th>streams</th><th>frames</th><th>connects</th><th>malformed</th></tr>{shard_rows}</table>"
            "</body></html>"
        )

    return app


def status_document(session: Session, metrics: ScreenerMetrics,
                    shards: Callable[[], Sequence[ShardStats]]) -> dict[str, Any]:
    """The document of `/api/status` (also the run directory's `status.json`): the top-K with the last ALERT
    explanation of each symbol, shard health, snapshot count, digest and the p95 frame→decision latency (ms)."""
    stats = shards()
    metrics.update_shards(stats)
    metrics.update_staleness(session)
    ranked = session.pipeline.ranker.ranked()
    return {
        "top": [{"rank": i + 1, "symbol": s, "score": round(score, 6), "explanation": _explanation(session, s)}
                for i, (s, score) in enumerate(ranked)],
        "shards": [{"shard": st.shard, "endpoint": st.endpoint, "streams": st.streams, "frames": st.frames,
                    "connects": st.connects, "malformed": st.malformed, "stale_reconnects": st.stale_reconnects}
                   for st in stats],
        "snapshots": session.snapshots,
        "digest": session.digest,
        "p95_latency_ms": None if (p := metrics.p95_latency_s()) is None else round(p * 1e3, 3),
    }


def _explanation(session: Session, symbol: str) -> dict[str, str] | None:
    """The symbol's latest ALERT explanation (`Pipeline.explanations`), or None."""
    out = session.pipeline.explanations.get(symbol)
    return None if out is None else {"headline": out.headline, "subtext": out.subtext}


def _why_html(explanation: dict[str, str] | None) -> str:
    if explanation is None:
        return ""
    return f"<b>{html.escape(explanation['headline'])}</b><br>{html.escape(explanation['subtext'])}"


class StatusServer:
    """uvicorn serving `status_app` on 127.0.0.1 (`STATUS_HOST`) in a background thread."""

    def __init__(self, app: Any, port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=STATUS_HOST, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="screener-status", daemon=True)

    def start(self, timeout: float = 10.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the status server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{STATUS_HOST}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class StatusFile:
    """Writes `document()` as JSON to `path` (`atomic_write`: a reader, the dashboard, sees a whole document or the
    previous one) at `start`, every `every_s` seconds from a background thread, and once more at `stop`."""

    def __init__(self, path: Path, document: Callable[[], dict[str, Any]], every_s: float) -> None:
        self.path = path
        self.document = document
        self.every_s = every_s
        self.writes = 0
        self._stop = threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._loop, name="screener-status-file", daemon=True)

    def write(self) -> None:
        atomic_write(self.path, json.dumps(self.document(), sort_keys=True) + "\n")
        self.writes += 1

    def start(self) -> None:
        self.write()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.write()
            except RuntimeError:
                continue  # the live path added a symbol while the document was read: the next tick writes it
            except Exception as exc:  # e.g. the disk is full: `stop` raises it in the caller
                self._error = exc
                return

    def stop(self) -> None:
        """Stop the thread and write the final document; raise what stopped the periodic writes, if anything did."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._error is not None:
            raise self._error
        self.write()
