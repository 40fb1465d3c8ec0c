"""The dashboard's FastAPI app: three HTML pages (runs list, run, comparison) that draw themselves from JSON routes.

Pages are small shells; `static/dashboard.js` fetches the JSON and draws with plotly.js, which is served from the
installed plotly package (`plotly.offline.get_plotlyjs`), never from a CDN. A running run's page polls
`/api/runs/{id}` and `/api/runs/{id}/series?since=<last step>` and appends the new points, without a reload.

Every bad request is a 4xx with a one-line `detail`: a run id that is not registered (404), a malformed query
parameter (422, FastAPI's validation), a bad metric name or a file path that leaves the run directory or is not an
image (400). Requests whose Host header is not an allowed host get a 400 (a page served on loopback cannot be read by
another site through DNS rebinding).
"""

from __future__ import annotations

import gzip
import html
import json
import re
import tomllib
from collections.abc import Sequence
from datetime import date
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.middleware.trustedhost import TrustedHostMiddleware

from cambium.core.errors import CambiumError, RunError
from cambium.core.export import flatten
from cambium.core.registry import RunRecord
from cambium.core.runs import REGISTRY_FILE, STATUSES, get_run, list_runs
from cambium.dashboard import queries

__all__ = ["LOOPBACK_HOSTS", "create_app"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
STATIC = Path(__file__).resolve().parent / "static"
_STATIC_FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HEADLINE = ("loss", "train_loss", "val/loss", "val_loss", "val_acc", "val/bpb", "jepa/loss", "probe/latent/r2")
Status = Literal["running", "finished", "failed", "killed"]
assert set(Status.__args__) == set(STATUSES)  # type: ignore[attr-defined]


def create_app(runs_dir: str | Path, *, allowed_hosts: Sequence[str] = LOOPBACK_HOSTS) -> FastAPI:
    """The dashboard over every run registered in `runs_dir` (its experiments.sqlite)."""
    root = Path(runs_dir)
    app = FastAPI(title="cambium dashboard", docs_url=None, redoc_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.exception_handler(CambiumError)
    def _bad_input(request: Request, exc: CambiumError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409 if isinstance(exc, RunError) else 400)

    def record_of(run_id: str) -> RunRecord:
        if not _ID_RE.match(run_id):
            raise HTTPException(404, f"run id {run_id!r} is not a run id (letters, digits, '.', '_', '-')")
        if not (root / REGISTRY_FILE).is_file():
            raise HTTPException(404, f"no run {run_id!r}: {root} has no run registry ({REGISTRY_FILE})")
        try:
            return get_run(root, run_id)
        except RunError as exc:
            raise HTTPException(404, str(exc)) from None

    # ---- pages
    @app.get("/", response_class=HTMLResponse)
    def runs_page() -> str:
        return _page("runs", "cambium runs", {"statuses": list(STATUSES)})

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(run_id: str) -> str:
        record = record_of(run_id)
        return _page("run", f"{record.id} · cambium", {"run": record.id, "system": record.system})

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(run: Annotated[list[str], Query(min_length=2, max_length=8)]) -> str:
        ids = [record_of(r).id for r in run]
        return _page("compare", "compare · cambium", {"runs": ids})

    @app.get("/static/plotly.min.js")
    def plotly_js(request: Request) -> Response:
        raw, packed = _plotly_js()
        headers = {"Cache-Control": "public, max-age=86400"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(packed, media_type="text/javascript", headers={**headers, "Content-Encoding": "gzip"})
        return Response(raw, media_type="text/javascript", headers=headers)

    @app.get("/static/{name}")
    def static(name: str) -> FileResponse:
        if name not in _STATIC_FILES:
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(STATIC / name, media_type=_STATIC_FILES[name])

    # ---- JSON
    @app.get("/api/runs")
    def api_runs(
        system: Annotated[str | None, Query(max_length=64)] = None,
        status: Status | None = None,
        since: Annotated[date | None, Query(description="created on or after this day (YYYY-MM-DD, UTC)")] = None,
        until: Annotated[date | None, Query(description="created on or before this day (YYYY-MM-DD, UTC)")] = None,
    ) -> dict[str, Any]:
        out = []
        records = list_runs(root) if (root / REGISTRY_FILE).is_file() else []
        for r in records:
            day = r.created[:10]
            if ((system and r.system != system) or (status and r.status != status)
                    or (since and day < since.isoformat()) or (until and day > until.isoformat())):
                continue
            out.append({**_record_json(r), **_digest(r)})
        return {"runs": out, "systems": sorted({r.system for r in records})}

    @app.get("/api/runs/{run_id}")
    def api_run(run_id: str) -> dict[str, Any]:
        record = record_of(run_id)
        names = queries.metric_names(record.dir) if record.dir.is_dir() else {}
        config = _read_text(record.dir / "config.toml")
        provenance = _read_json(record.dir / "provenance.json")
        return {**_record_json(record), "names": names,
                "steps": max((v["last"] for v in names.values()), default=None),
                "experts": queries.expert_layers(names), "config": config,
                "provenance": provenance if isinstance(provenance, dict) else None}

    @app.get("/api/runs/{run_id}/series")
    def api_series(
        run_id: str,
        name: Annotated[list[str], Query(min_length=1, max_length=64, description="metric names")],
        points: Annotated[int, Query(ge=2, le=5000, description="at most this many points per metric")] = 800,
        since: Annotated[int, Query(ge=-1, le=2**62, description="only steps after this one")] = -1,
    ) -> dict[str, Any]:
        record = record_of(run_id)
        found = queries.series(record.dir, name, points, since)
        return {"run": record.id, "status": record.status, "series": {k: v.to_json() for k, v in found.items()}}

    @app.get("/api/runs/{run_id}/experts")
    def api_experts(
        run_id: str,
        kind: Literal["load", "bias"] = "load",
        points: Annotated[int, Query(ge=2, le=5000, description="at most this many step buckets")] = 400,
        layer: Annotated[int | None, Query(ge=0, le=100_000, description="only this MoE layer")] = None,
    ) -> dict[str, Any]:
        record = record_of(run_id)
        found = queries.expert_matrices(record.dir, kind, points, layer)
        return {"run": record.id, "kind": kind, "layers": {
            str(k): {"steps": m.steps, "experts": m.experts, "z": m.z} for k, m in found.items()}}

    @app.get("/api/runs/{run_id}/seeds")
    def api_seeds(run_id: str) -> dict[str, Any]:
        record = record_of(run_id)
        peers = []
        for r in list_runs(root, "morph"):
            d = queries.run_digest(r.dir, ("params", "val_acc")) if r.dir.is_dir() else {"latest": {}}
            if "params" in d["latest"] and "val_acc" in d["latest"]:
                peers.append({"run": r.id, "name": r.name, "params": d["latest"]["params"],
                              "val_acc": d["latest"]["val_acc"]})
        return _jsonable({"run": record.id, "timeline": queries.morph_seeds(record.dir), "peers": peers})

    @app.get("/api/runs/{run_id}/artifacts")
    def api_artifacts(run_id: str) -> dict[str, Any]:
        record = record_of(run_id)
        return _jsonable({"run": record.id, **queries.artifacts(record.dir)})

    @app.get("/api/runs/{run_id}/screener")
    def api_screener(run_id: str) -> dict[str, Any]:
        record = record_of(run_id)
        return _jsonable({"run": record.id, "status": record.status, "live": queries.screener_status(record.dir)})

    @app.get("/api/runs/{run_id}/files/{path:path}")
    def api_file(run_id: str, path: str) -> FileResponse:
        record = record_of(run_id)
        try:
            target = queries.run_file(record, path)
        except FileNotFoundError:
            raise HTTPException(404, f"run {record.id} has no file {path!r}") from None
        return FileResponse(target, media_type=queries.IMAGE_SUFFIXES[target.suffix.lower()])

    @app.get("/api/compare")
    def api_compare(run: Annotated[list[str], Query(min_length=2, max_length=8)]) -> dict[str, Any]:
        records = [record_of(r) for r in run]
        configs = [_flat_config(r.dir / "config.toml") for r in records]
        keys = sorted(set().union(*configs))
        diff = [{"key": k, "values": [_config_cell(c, k) for c in configs]} for k in keys
                if len({json.dumps(c.get(k, "<missing>")) for c in configs}) > 1]
        names = [set(queries.metric_names(r.dir)) if r.dir.is_dir() else set() for r in records]
        return {"runs": [_record_json(r) for r in records], "keys": len(keys), "diff": diff,
                "common": sorted(set.intersection(*names))}

    return app


def _page(kind: str, title: str, data: dict[str, Any]) -> str:
    payload = json.dumps({"page": kind, **data}).replace("</", "<\\/")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><link rel='stylesheet' href='/static/dashboard.css'>"
        "<script src='/static/plotly.min.js'></script></head><body>"
        "<header><a href='/' class='brand'>cambium</a><span class='sub'>dashboard</span></header>"
        f"<main id='main'></main><script type='application/json' id='page-data'>{payload}</script>"
        "<script src='/static/dashboard.js'></script></body></html>"
    )


@cache
def _plotly_js() -> tuple[bytes, bytes]:
    from plotly.offline import get_plotlyjs

    raw = get_plotlyjs().encode("utf-8")
    return raw, gzip.compress(raw, compresslevel=6)


def _record_json(r: RunRecord) -> dict[str, Any]:
    return {"id": r.id, "system": r.system, "name": r.name, "status": r.status, "created": r.created,
            "updated": r.updated, "summary": _jsonable(r.summary)}


def _digest(r: RunRecord) -> dict[str, Any]:
    if not r.dir.is_dir():
        return {"steps": None, "rows": 0, "latest": {}}
    try:
        return queries.run_digest(r.dir, HEADLINE)
    except CambiumError as exc:  # one unreadable metrics file must not hide the other runs
        return {"steps": None, "rows": 0, "latest": {}, "error": str(exc)}


def _flat_config(path: Path) -> dict[str, Any]:
    try:
        return flatten(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}


def _config_cell(config: dict[str, Any], key: str) -> str:
    if key not in config:
        return "<missing>"
    value = config[key]
    return value if isinstance(value, str) else json.dumps(_jsonable(value))


def _jsonable(value: Any) -> Any:
    """Plain JSON: non-finite floats become None (the JSON encoder refuses NaN), dates and the like become text."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _read_json(path: Path) -> Any:
    try:
        return _jsonable(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None
