"""A synthetic exchange-scale market made of recorded traffic: N symbols, an exchangeInfo listing them, their depth
snapshots, for `cambium market serve --universe N`, the screener's scale tests and bench/screener.py.

`replicate(records, n, traffic)` renames the recorded frames of the recording's base symbols (BTCUSDT/ETHUSDT in the
committed captures) to ``S000USDT`` … : symbol k takes the frames of base ``k % len(bases)``.
- traffic "stress": every symbol gets every frame of its base (as busy as BTC/ETH in the capture's busiest minutes);
- traffic "market": symbol k keeps each frame of its base with probability min(1, share_k), seeded per symbol, where
  share_k is the activity (trades in 30 days) relative to BTCUSDT read off the committed 300-pair USDⓈ-M
  cross-section at evenly spaced quantiles, busiest first (`activity_shares`): a typical market of that many symbols.
  A depth diff it keeps is as large as its base's. The first frame of each of a symbol's streams is always kept, so
  every listed symbol quotes however quiet it is.

`exchange_info(symbols)` is a USDⓈ-M exchangeInfo body listing them as TRADING USDT perpetuals, plus entries every
universe filter must refuse (a quarterly contract, a BUSD-quoted perpetual, a SETTLING one). `depth_bodies` renames
the recording's inline REST depth snapshots (or, without one, builds one from the first book ticker) for each symbol.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from cambium.core.errors import DataError
from cambium.market.recorder import Record

__all__ = ["ACTIVITY", "activity_shares", "base_symbols", "depth_bodies", "exchange_info", "replicate",
           "synthetic_name"]

ACTIVITY = Path("data/samples/market/activity/usdm_trades_30d.csv")


def synthetic_name(k: int) -> str:
    return f"S{k:03d}USDT"


def activity_shares(n_symbols: int, activity: Path = ACTIVITY) -> list[float]:
    """Activity of n_symbols symbols relative to BTCUSDT, busiest first (see the module docstring)."""
    try:
        rows = list(csv.DictReader(activity.read_text(encoding="utf-8").splitlines()))
        btc = next(int(r["trades"]) for r in rows if r["symbol"] == "BTCUSDT")
        shares = np.array([int(r["trades"]) / btc for r in rows])
    except (OSError, StopIteration, KeyError, ValueError) as exc:
        raise DataError(f"{activity}: cannot read the activity cross-section ({type(exc).__name__}: {exc}); run "
                        "from the repository root") from None
    return [float(np.quantile(shares, 1 - (k + 0.5) / n_symbols)) for k in range(n_symbols)]


def _stream_symbol(frame: str) -> str | None:
    """The lower-case symbol of a combined-stream frame, or None for anything else."""
    if not frame.startswith('{"stream":"'):
        return None
    at = frame.find("@", 11)
    return frame[11:at] if at > 11 else None


def base_symbols(records: Sequence[Record]) -> list[str]:
    """The lower-case symbols of the recording's stream frames, in name order."""
    return sorted({s for r in records if (s := _stream_symbol(r.frame)) is not None})


def replicate(records: Sequence[Record], n_symbols: int, traffic: str = "market") -> list[Record]:
    """The stream frames renamed to n_symbols synthetic symbols (see the module docstring), in recorded order."""
    if traffic not in ("market", "stress"):
        raise DataError(f"traffic {traffic!r} is unknown; use 'market' or 'stress'")
    bases = base_symbols(records)
    if not bases:
        raise DataError("the recording holds no combined-stream frame to replicate")
    shares = activity_shares(n_symbols) if traffic == "market" else [1.0] * n_symbols
    rngs = [random.Random(k) for k in range(n_symbols)]
    owners: dict[str, list[int]] = {b: list(range(i, n_symbols, len(bases))) for i, b in enumerate(bases)}
    out = []
    firsts: set[str] = set()
    for r in records:
        base = _stream_symbol(r.frame)
        if base is None:
            continue
        stream = r.frame[11 : r.frame.index('"', 11)]
        first = stream not in firsts
        firsts.add(stream)
        for k in owners[base]:
            if shares[k] < 1.0 and rngs[k].random() >= shares[k] and not first:
                continue
            name = synthetic_name(k)
            frame = r.frame.replace(base, name.lower(), 1).replace(base.upper(), name, 1)
            out.append(Record(r.recv_ns, r.mono_ns, 0, frame))
    return out


def exchange_info(symbols: Sequence[str]) -> dict[str, Any]:
    """A USDⓈ-M exchangeInfo body listing `symbols` as TRADING USDT perpetuals, plus three that filters refuse."""

    def entry(symbol: str, status: str = "TRADING", contract: str = "PERPETUAL", quote: str = "USDT") -> dict[str, Any]:
        return {"symbol": symbol, "pair": symbol, "contractType": contract, "status": status,
                "baseAsset": symbol.removesuffix(quote), "quoteAsset": quote, "marginAsset": quote,
                "filters": [{"filterType": "PRICE_FILTER", "tickSize": "0.10"},
                            {"filterType": "LOT_SIZE", "stepSize": "0.001", "minQty": "0.001"}]}

    listed = [entry(s) for s in symbols]
    listed += [entry("ZZZUSDT_250926", contract="CURRENT_QUARTER"), entry("ZZZBUSD", quote="BUSD"),
               entry("ZZZOLDUSDT", status="SETTLING")]
    return {"timezone": "UTC", "serverTime": 0, "futuresType": "U_MARGINED",
            "rateLimits": [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
                            "limit": 2400}],
            "symbols": listed}


def depth_bodies(records: Sequence[Record], tagged_snapshots: dict[str, str], n_symbols: int) -> dict[str, bytes]:
    """REST /depth bodies per synthetic symbol: the snapshot of its base (`tagged_snapshots`: lower-case base symbol →
    the recorded body text), or one built from the base's first book ticker when the recording has none."""
    bases = base_symbols(records)
    bodies: dict[str, bytes] = {}
    for i, base in enumerate(bases):
        text = tagged_snapshots.get(base)
        if text is None:
            top = next((orjson.loads(r.frame)["data"] for r in records
                        if r.frame.startswith(f'{{"stream":"{base}@bookTicker"')), None)
            if top is None:
                continue
            text = orjson.dumps({"lastUpdateId": top["u"], "E": top.get("E", 0), "T": top.get("T", 0),
                                 "bids": [[top["b"], top["B"]]], "asks": [[top["a"], top["A"]]]}).decode()
        for k in range(i, n_symbols, len(bases)):
            bodies[synthetic_name(k)] = text.encode()
    return bodies
