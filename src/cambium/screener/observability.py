"""SCR-10: Prometheus metrics of the live path and a status page (FastAPI) with shard health and the current top-K.

Metrics live in a registry of their own (not the process-global one), so several sessions can coexist in a process,
and `/metrics` is prometheus_client's own ASGI app (`make_asgi_app`) on that registry. Two kinds of series:

- observed on the hot path: `cambium_screener_e2e_latency_seconds` (frame received → rank decision) and
  `cambium_screener_event_lag_seconds` (receive minus exchange time), histograms fed once per frame;
- read at scrape time by `ScreenerCollector` from the counters their producers keep anyway (the connector's
  `ShardStats`, the REST client's incident counts, the notifiers' counts, the session's latest snapshots): counters
  are exported as counters (they only grow while their producer lives; a restarted producer starts again at 0,
  which Prometheus reads as a counter reset), gauges as gauges, everything in base units (seconds).

Rates are the scraper's job (`rate(cambium_screener_messages_total[1m])`): nothing here keeps a "since the previous
read" window that two readers would reset for each other. The status page shows its own display rate from
`RateWindow`, a sliding window of the samples its readers took, which no reader resets.

The page listens on 127.0.0.1 only, but a browser visiting a hostile site can still be pointed at it through DNS
rebinding (a name the attacker controls that resolves to 127.0.0.1): such requests carry the attacker's name in `Host`,
so only the loopback names are accepted and any other `Host` gets a 400 (`/metrics` included).
"""

from __future__ import annotations

import html
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest, make_asgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cambium.core.files import atomic_write
from cambium.market.connector import ShardStats
from cambium.screener.notify import BackgroundSender
from cambium.screener.replay import Session

__all__ = ["LOOPBACK_HOSTS", "RateWindow", "ScreenerCollector", "ScreenerMetrics", "StatusFile", "StatusServer",
           "status_app", "status_document"]

STATUS_HOST = "127.0.0.1"
LOOPBACK_HOSTS = (STATUS_HOST, "localhost")

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DISPLAY_RATE_WINDOW_S = 10.0


class IncidentSource(Protocol):
    """What counts rate-limit incidents outside the connector (the REST client): HTTP status → count."""

    @property
    def incident_counts(self) -> dict[str, int]: ...


class RateWindow:
    """Display rate of monotonic counters over the last `window_s` seconds, from the samples its readers take.

    `rate(key, value)` records (now, value) and answers (value − oldest sample in the window) / elapsed. Any number of
    readers may share it: a read adds a sample and drops samples that left the window, it never restarts the window,
    so the page and the status file cannot reset each other's figure. None until two samples are apart in time, and
    when the counter went back (its producer restarted)."""

    def __init__(self, window_s: float = DISPLAY_RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._samples: dict[Hashable, deque[tuple[float, float]]] = {}
        self._lock = threading.Lock()

    def rate(self, key: Hashable, value: float) -> float | None:
        with self._lock:
            now = self.clock()
            samples = self._samples.setdefault(key, deque())
            if samples and value < samples[-1][1]:
                samples.clear()  # a counter reset: start over from this sample
            samples.append((now, value))
            while len(samples) > 2 and now - samples[1][0] >= self.window_s:
                samples.popleft()  # keep one sample at or beyond the window's start
            t0, v0 = samples[0]
        return (value - v0) / (now - t0) if now > t0 else None


class ScreenerCollector(Collector):
    """The counters and gauges `ScreenerMetrics` reads at scrape time from its sources (see `ScreenerMetrics.watch`).

    Nothing on the hot path: the producers keep plain integers, this turns them into metric families when scraped.
    """

    def __init__(self) -> None:
        self.shards: Callable[[], Sequence[ShardStats]] = lambda: ()
        self.session: Session | None = None
        self.incident_sources: list[IncidentSource] = []
        self.dropped: Callable[[], Mapping[str, int]] = dict
        self.workers: Callable[[], Sequence[Mapping[str, Any]]] = lambda: ()

    def collect(self) -> Iterator[Metric]:
        stats = list(self.shards())
        messages = CounterMetricFamily("cambium_screener_messages", "Data frames received, per shard",
                                       labels=["shard"])
        reconnects = CounterMetricFamily("cambium_screener_reconnects", "Reconnections (connects after the first), "
                                         "per shard", labels=["shard"])
        stale = CounterMetricFamily("cambium_screener_stale_reconnects", "Reconnections because a shard sent no data "
                                    "for ws.stale_after_s", labels=["shard"])
        malformed = CounterMetricFamily("cambium_screener_malformed_frames", "Malformed frames counted and skipped, "
                                        "by shard and reason (json, envelope, event, payload, utf8)",
                                        labels=["shard", "reason"])
        incidents = CounterMetricFamily("cambium_screener_incidents", "Rate-limit incidents: HTTP 429 (slow down) "
                                        "and 418 (IP banned), on websocket handshakes (ws) and REST requests (rest)",
                                        labels=["source", "status"])
        dropped: dict[str, int] = dict(self.dropped())
        ws_incidents: dict[str, int] = {}
        for st in stats:
            label = str(st.shard)
            messages.add_metric([label], st.frames)
            reconnects.add_metric([label], max(0, st.connects - 1))
            stale.add_metric([label], st.stale_reconnects)
            for reason, n in sorted(st.malformed_by_reason.copy().items()):
                malformed.add_metric([label, reason], n)
            for status, n in st.incidents.copy().items():
                ws_incidents[status] = ws_incidents.get(status, 0) + n
        rest_incidents: dict[str, int] = {}
        for source in self.incident_sources:
            for status, n in dict(source.incident_counts).items():
                rest_incidents[status] = rest_incidents.get(status, 0) + n
        workers = self._worker_stats()
        for w in workers:  # `live.workers`: one plain dict per worker (cambium.screener.shards documents the keys)
            label = f"w{w.get('shard', '?')}"
            messages.add_metric([label], w.get("frames", 0))
            reconnects.add_metric([label], max(0, w.get("connects", 0) - 1))
            for key, counts in (("incidents", ws_incidents), ("rest_incidents", rest_incidents)):
                for status, n in dict(w.get(key, {})).items():
                    counts[str(status)] = counts.get(str(status), 0) + n
            for reason, n in dict(w.get("dropped", {})).items():
                dropped[reason] = dropped.get(reason, 0) + n
        for source_name, counts in (("ws", ws_incidents), ("rest", rest_incidents)):
            for status in ("418", "429"):  # both always present: an alert on `increase(...) > 0` needs the series
                incidents.add_metric([source_name, status], counts.get(status, 0))
        notifications = CounterMetricFamily("cambium_screener_notifications", "Events handed to a notifier, by "
                                            "channel and outcome (offered, sent, failed, dropped, retried, "
                                            "rate_limited)", labels=["channel", "outcome"])
        for notifier in self._notifiers():
            counts = notifier.snapshot_counts()
            for outcome in ("offered", "sent", "failed", "dropped", "retried", "rate_limited"):
                notifications.add_metric([notifier.name, outcome], counts.get(outcome, 0))
            for reason, n in counts.items():  # 'dropped:queue_full', 'dropped:http_4xx', ...
                if reason.startswith("dropped:"):
                    key = f"{notifier.name}_{reason.removeprefix('dropped:')}"
                    dropped[key] = dropped.get(key, 0) + n
        dropped_family = CounterMetricFamily("cambium_screener_dropped_events", "Events dropped on purpose or "
                                             "lost, by reason: shed load and late ticks (see the live path), "
                                             "<notifier>_<why> for alerts a notifier could not deliver",
                                             labels=["reason"])
        for reason, n in sorted(dropped.items()):
            dropped_family.add_metric([reason], n)
        yield from (messages, reconnects, stale, malformed, incidents, notifications, dropped_family)
        if workers:
            restarts = CounterMetricFamily("cambium_screener_worker_restarts", "Restarts of a shard worker process",
                                           labels=["worker"])
            cpu = CounterMetricFamily("cambium_screener_worker_cpu_seconds", "CPU time of a shard worker process "
                                      "since its first frame, over its restarts", labels=["worker"], unit="seconds")
            up = GaugeMetricFamily("cambium_screener_worker_up", "1 while the worker's current process runs and "
                                   "reports", labels=["worker"])
            for w in workers:
                label = f"w{w.get('shard', '?')}"
                restarts.add_metric([label], w.get("generation", 0))
                cpu.add_metric([label], float(w.get("cpu_s", 0.0)))
                up.add_metric([label], 1.0 if w.get("alive") else 0.0)
            yield from (restarts, cpu, up)
        staleness = GaugeMetricFamily("cambium_screener_stale_seconds", "Time since the last book / trade update "
                                      "at the symbol's latest feature snapshot", labels=["symbol", "stream"],
                                      unit="seconds")
        if self.session is not None:
            for symbol, snap in sorted(list(self.session.latest.items())):
                staleness.add_metric([symbol, "book"], snap.data_health.stale_book_ms / 1e3)
                staleness.add_metric([symbol, "trades"], snap.data_health.stale_trades_ms / 1e3)
        yield staleness

    def _worker_stats(self) -> list[Mapping[str, Any]]:
        # The runner updates these dicts from its own thread: a read that met a resize is simply taken again.
        for _ in range(3):
            try:
                return list(self.workers())
            except RuntimeError:
                continue
        return []

    def _notifiers(self) -> list[BackgroundSender]:
        if self.session is None:
            return []
        return [n for n in self.session.pipeline.notifiers if isinstance(n, BackgroundSender)]


class ScreenerMetrics:
    """The registry of one live session: two histograms fed per frame and a `ScreenerCollector` read at scrape
    time. Tell it what to read with `watch` (`status_app` does for the session and the shards)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.lag = Histogram("cambium_screener_event_lag_seconds", "Receive time minus exchange event time",
                             buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=r)
        self.latency = Histogram("cambium_screener_e2e_latency_seconds", "Frame received → rank decision",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.collector = ScreenerCollector()
        r.register(self.collector)
        self.display_rate = RateWindow()
        self._recent: deque[float] = deque(maxlen=10_000)
        self._lock = threading.Lock()

    def watch(self, *, session: Session | None = None, shards: Callable[[], Sequence[ShardStats]] | None = None,
              incidents: IncidentSource | None = None, dropped: Callable[[], Mapping[str, int]] | None = None,
              workers: Callable[[], Sequence[Mapping[str, Any]]] | None = None) -> None:
        """Sources read at scrape time: the session (staleness, notifiers), the connectors' shard stats, a REST
        client whose 429/418 incidents count under `source="rest"` (each client once), the one-process live path's
        counts of events dropped on purpose by reason (`LiveResult.dropped`), and with `live.workers` the workers'
        stats dicts (`ShardedRunner.shard_stats`: frames, connects, dropped, incidents if present, generation,
        cpu_s, alive; exported under shard / worker label `w<k>`)."""
        if session is not None:
            self.collector.session = session
        if shards is not None:
            self.collector.shards = shards
        if dropped is not None:
            self.collector.dropped = dropped
        if workers is not None:
            self.collector.workers = workers
        if incidents is not None and incidents not in self.collector.incident_sources:
            self.collector.incident_sources.append(incidents)

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

    def exposition(self) -> bytes:
        """The text a scrape gets (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry)

    def asgi_app(self) -> Any:
        """prometheus_client's ASGI app on this registry (content negotiation, gzip, OpenMetrics included)."""
        return make_asgi_app(self.registry)


class _AsgiEndpoint:
    """An ASGI app as a Starlette route endpoint: a class instance is called as ASGI, where a function would be
    wrapped as a request handler; mounting it instead would redirect `/metrics` to `/metrics/`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def status_app(
    session: Session, metrics: ScreenerMetrics, shards: Callable[[], Sequence[ShardStats]], *,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
) -> Any:
    """The FastAPI app: `/` an HTML page, `/api/status` the same as JSON, `/metrics` the Prometheus exposition
    (prometheus_client's ASGI app), and `/openapi.json` their schema. Requests whose `Host` (port aside) is not in
    `allowed_hosts` get a 400."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.routing import Route

    metrics.watch(session=session, shards=shards)
    app = FastAPI(title="cambium screener", docs_url=None, redoc_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.router.routes.append(Route("/metrics", _AsgiEndpoint(metrics.asgi_app()), methods=["GET"]))

    def snapshot() -> dict[str, Any]:
        return status_document(session, metrics, shards)

    @app.get("/api/status")
    def api_status() -> dict[str, Any]:
        return snapshot()

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        s = snapshot()
        top = "".join(f"<tr><td>{r['rank']}</td><td>{r['symbol']}</td><td>{r['score']:.4f}</td>"
                      f"<td>{_why_html(r['explanation'])}</td></tr>" for r in s["top"])
        shard_rows = "".join(f"<tr><td>{h['shard']}</td><td>{h['endpoint']}</td><td>{h['streams']}</td>"
                             f"<td>{h['frames']}</td><td>{_rate(metrics.display_rate.rate(h['shard'], h['frames']))}"
                             f"</td><td>{h['connects']}</td>"
                             f"<td>{h['malformed']}</td></tr>" for h in s["shards"])
        return (
            "<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='2'>"
            "<title>cambium screener</title><style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 10px}"
            "table{border-collapse:collapse;margin-bottom:1.5em}tr:nth-child(even){background:#eee}</style></head>"
            f"<body><h1>cambium screener</h1><p>snapshots {s['snapshots']} · p95 frame→decision "
            f"{s['p95_latency_ms']} ms</p><h2>Top-K</h2><table id='top'><tr><th>rank</th><th>symbol</th>"
            f"<th>score</th><th>last alert</th></tr>{top}</table><h2>Shards</h2><table id='shards'><tr><th>shard"
            "</th><th>endpoint</th><th>streams</th><th>frames</th><th>frames/s</th><th>connects</th><th>malformed"
            f"</th></tr>{shard_rows}</table></body></html>"
        )

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # `/metrics` is a plain ASGI route, which FastAPI leaves out of the schema: describe it by hand.
        schema: dict[str, Any] = default_openapi()
        schema["paths"].setdefault("/metrics", {"get": {
            "summary": "Prometheus metrics", "operationId": "metrics",
            "responses": {"200": {"description": "Prometheus text exposition (OpenMetrics when asked)",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}})
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:,.1f}"


def status_document(session: Session, metrics: ScreenerMetrics,
                    shards: Callable[[], Sequence[ShardStats]]) -> dict[str, Any]:
    """The document of `/api/status` (also the run directory's `status.json`): the top-K with the last ALERT
    explanation of each symbol, shard health, snapshot count, digest and the p95 frame→decision latency (ms). Only
    counts: the HTML page adds its display rate (frames/s over the last ~10 s, `metrics.display_rate`)."""
    stats = shards()
    ranked = session.pipeline.ranker.ranked()
    return {
        "top": [{"rank": i + 1, "symbol": s, "score": round(score, 6), "explanation": _explanation(session, s)}
                for i, (s, score) in enumerate(ranked)],
        "shards": [{"shard": st.shard, "endpoint": st.endpoint, "streams": st.streams, "frames": st.frames,
                    "connects": st.connects, "malformed": st.malformed, "stale_reconnects": st.stale_reconnects,
                    "incidents": dict(st.incidents)}
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
