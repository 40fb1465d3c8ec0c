"""The feature schema: the ordered feature names and dtypes a model reads, and its hash.

A trained artifact records the hash of the schema it was trained on; the ModelRunner refuses an artifact whose hash
differs from the running code's (a renamed, reordered, added or retyped feature would silently feed wrong columns).
The window suffixes match the feature engine's windows: 1 s, 10 s, 60 s, 5 m.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Final

import numpy as np

from cambium.screener.contracts import FeatureSnapshot

__all__ = ["FEATURE_SCHEMA", "FEATURE_SCHEMA_HASH", "feature_names", "feature_vector", "schema_hash"]

FEATURE_SCHEMA: Final[tuple[tuple[str, str], ...]] = (
    ("mid", "float64"),                  # (best bid + best ask) / 2, quote currency
    ("microprice", "float64"),           # size-weighted mid: (bid·ask_qty + ask·bid_qty) / (bid_qty + ask_qty)
    ("spread_bps", "float64"),           # (ask − bid) / mid · 1e4
    ("book_imbalance", "float64"),       # (bid_qty − ask_qty) / (bid_qty + ask_qty), in [−1, 1]
    ("impact_bps", "float64"),           # cost to take the configured clip size through the book, one side, bps
    ("flow_imbalance_10s", "float64"),   # (taker buy − taker sell) / total volume over 10 s, in [−1, 1]
    ("flow_imbalance_60s", "float64"),
    ("trade_rate_10s", "float64"),       # trades per second over 10 s
    ("trade_rate_60s", "float64"),
    ("ret_bps_1s", "float64"),           # log return of mid over the window, bps
    ("ret_bps_10s", "float64"),
    ("ret_bps_60s", "float64"),
    ("ret_bps_5m", "float64"),
    ("realized_vol_bps_60s", "float64"),  # sqrt(sum of squared 1 s mid log returns) over 60 s, bps
    ("realized_vol_bps_5m", "float64"),
    ("natr_bps", "float64"),             # average true range of 1 s bars / mid, bps
    ("volume_zscore_60s", "float64"),    # z-score of the last 60 s volume against the 5 m history
    ("regime_vol", "float64"),           # realized_vol_bps_60s / realized_vol_bps_5m
    ("regime_trend", "float64"),         # |ret_bps_5m| / (realized_vol_bps_5m + 1e-9): trend strength
)


def feature_names(schema: Sequence[tuple[str, str]] = FEATURE_SCHEMA) -> tuple[str, ...]:
    return tuple(name for name, _ in schema)


def schema_hash(schema: Sequence[tuple[str, str]] = FEATURE_SCHEMA) -> str:
    """sha256 (hex) of the schema's canonical JSON `[[name, dtype], ...]`: order, names and dtypes all count."""
    text = json.dumps([[name, dtype] for name, dtype in schema], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


FEATURE_SCHEMA_HASH: Final[str] = schema_hash()
_NAMES: Final[tuple[str, ...]] = feature_names()


def feature_vector(snapshots: Sequence[FeatureSnapshot], names: Sequence[str] = _NAMES) -> np.ndarray:
    """Model input matrix `[N, F]` float64 in schema order; a missing or None feature becomes NaN."""
    out = np.full((len(snapshots), len(names)), np.nan, dtype=np.float64)
    for i, snap in enumerate(snapshots):
        feats = snap.features
        for j, name in enumerate(names):
            value = feats.get(name)
            if value is not None:
                out[i, j] = value
    return out
