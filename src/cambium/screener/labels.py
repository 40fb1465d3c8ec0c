"""Training labels (SCR-3): in-play per horizon and profile, and toxicity, over a regular price path.

A `PricePath` is one symbol on a regular time grid of `step_ms`: at row i the entry price `entry[i]` (taken at
`ts[i]`), and for the step that *ends* at `ts[i]` the highest and lowest realisable prices `high[i]`, `low[i]`. Where
those come from decides what the labels mean:

- tick captures through the feature engine: one row per snapshot (cadence 1 s), entry = high = low = the bar-close mid
  (a quote that was on the book at that instant, so an exit there is realisable);
- 1-minute klines: one row per bar, ts = the bar's close, entry = close, high/low = the bar's traded high and low
  (prices at which trades printed inside the bar, after the entry at the previous close).

For a horizon h (k = h / step rows; a horizon the step does not divide cannot be labelled from that source, e.g. 30 s
from 1 m bars, and is refused), with the future steps j = i+1 … i+k, which cover exactly (ts[i], ts[i] + h]:

    up_bps[i]   = max_j 1e4 · ln(high[j] / entry[i])          (best exit of a long)
    down_bps[i] = max_j 1e4 · ln(entry[i] / low[j])           (best exit of a short)
    cost[i]     = fee(profile) + spread_bps[i] + impact_bps[i]   (round trip, as in the heuristic baseline)
    in_play     = max(up, down) − cost ≥ target(profile, h)   — the move may go either way
                  and is 0 when spread_bps > max_spread_bps or impact_bps > max_impact_bps (the gates)
    toxic       = the move against the entry within 30 s exceeds toxic_move_bps: down_bps_30s for a long
                  (direction +1), up_bps_30s for a short (−1)

A label is NaN (unlabelled, left out of training and evaluation) when the horizon runs past the end of the path,
the grid has a gap inside it (a row missing), a price it needs is missing, a gate input is missing, or (toxic) the
direction is 0. The window maxima use the van Herk/Gil-Werman block algorithm, O(N) whatever the horizon;
`labels_reference.py` computes the same labels with plain loops over timestamps and a test holds the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from cambium.core.errors import DataError
from cambium.screener.config import BaselineConfig

__all__ = ["HORIZONS", "LabelSpec", "PricePath", "label_name", "labellable", "make_labels", "sliding_max",
           "window_moves"]

HORIZONS: Mapping[str, int] = {"p_inplay_30s": 30_000, "p_inplay_2m": 120_000, "p_inplay_5m": 300_000}
TOXIC_HORIZON_MS = 30_000


@dataclass(frozen=True)
class LabelSpec:
    """Costs, targets and gates of the labels; `from_baseline` takes them from the heuristic's config so that the
    model and the baseline it is compared with aim at the same event."""

    fee_bps: Mapping[str, float] = field(default_factory=lambda: {"A": 2.0, "B": 4.0})
    target_bps: Mapping[str, tuple[float, float, float]] = field(
        default_factory=lambda: {"A": (5.0, 10.0, 15.0), "B": (8.0, 15.0, 20.0)})
    max_spread_bps: float = 10.0
    max_impact_bps: float = 20.0
    toxic_move_bps: float = 10.0

    @classmethod
    def from_baseline(cls, cfg: BaselineConfig) -> LabelSpec:
        return cls({"A": cfg.fee_bps_a, "B": cfg.fee_bps_b}, {"A": cfg.target_bps_a, "B": cfg.target_bps_b},
                   cfg.max_spread_bps, cfg.max_impact_bps, cfg.toxic_move_bps)


@dataclass(frozen=True)
class PricePath:
    """One symbol on a regular grid; every array is `[N]`. `direction` (+1 long, −1 short, 0 none) is the entry side
    toxicity is judged for (the training sets enter with the 10 s taker flow, as the baseline does)."""

    ts: np.ndarray          # int64 ms, strictly increasing, multiples of step_ms apart (gaps allowed)
    entry: np.ndarray       # float64
    high: np.ndarray
    low: np.ndarray
    spread_bps: np.ndarray
    impact_bps: np.ndarray
    direction: np.ndarray   # int8 / float in {−1, 0, +1}
    step_ms: int

    def __post_init__(self) -> None:
        n = self.ts.shape[0]
        for name in ("entry", "high", "low", "spread_bps", "impact_bps", "direction"):
            if getattr(self, name).shape != (n,):
                raise DataError(f"PricePath.{name} has shape {getattr(self, name).shape}, ts has ({n},)")
        if self.step_ms <= 0:
            raise DataError(f"PricePath.step_ms={self.step_ms} must be > 0")
        if n > 1:
            d = np.diff(self.ts)
            if (d <= 0).any() or (d % self.step_ms).any():
                bad = int(np.flatnonzero((d <= 0) | (d % self.step_ms != 0))[0])
                raise DataError(f"PricePath.ts must increase by multiples of step_ms={self.step_ms}: "
                                f"ts[{bad}]={int(self.ts[bad])}, ts[{bad + 1}]={int(self.ts[bad + 1])}")


def label_name(profile: str, target: str) -> str:
    return f"{profile}/{target}"


def labellable(step_ms: int) -> tuple[str, ...]:
    """The targets a path of this step can label: the horizons it divides; p_toxic needs 30 s."""
    out = [t for t, h in HORIZONS.items() if h % step_ms == 0]
    if TOXIC_HORIZON_MS % step_ms == 0:
        out.append("p_toxic")
    return tuple(out)


def sliding_max(y: np.ndarray, k: int) -> np.ndarray:
    """`W[i] = max(y[i : i + k])` for i in 0 … len(y) − k (van Herk/Gil-Werman: per-block prefix and suffix maxima)."""
    n = y.shape[0]
    if k < 1 or n < k:
        return np.empty(0, dtype=y.dtype)
    pad = (-n) % k
    blocks = np.concatenate([y, np.full(pad, -np.inf)]).reshape(-1, k)
    prefix = np.maximum.accumulate(blocks, axis=1).ravel()
    suffix = np.maximum.accumulate(blocks[:, ::-1], axis=1)[:, ::-1].ravel()
    i = np.arange(n - k + 1)
    return np.maximum(suffix[i], prefix[i + k - 1])


def window_moves(path: PricePath, horizon_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """(up_bps, down_bps) `[N]` over the horizon, NaN where it cannot be told (see the module docstring)."""
    if horizon_ms % path.step_ms:
        raise DataError(f"a {horizon_ms // 1000} s horizon cannot be labelled from {path.step_ms // 1000} s steps "
                        "(the step must divide the horizon)")
    k = horizon_ms // path.step_ms
    n = path.ts.shape[0]
    up = np.full(n, np.nan)
    down = np.full(n, np.nan)
    if n <= k:
        return up, down
    with np.errstate(divide="ignore", invalid="ignore"):
        log_hi, log_lo, log_entry_all = np.log(path.high), np.log(path.low), np.log(path.entry)
    bad = ~(np.isfinite(log_hi) & np.isfinite(log_lo))
    # window j = i+1 … i+k, i.e. the slice of the shifted arrays starting at i
    hi_max = sliding_max(np.where(bad, -np.inf, log_hi)[1:], k)
    lo_min = -sliding_max(np.where(bad, -np.inf, -log_lo)[1:], k)
    bad_count = np.concatenate([[0], np.cumsum(bad[1:])])
    m = n - k
    gaps = bad_count[k:k + m] - bad_count[:m]
    contiguous = path.ts[k:] - path.ts[:m] == horizon_ms
    log_entry = log_entry_all[:m]
    ok = contiguous & (gaps == 0) & np.isfinite(log_entry)
    up[:m] = np.where(ok, 1e4 * (hi_max - log_entry), np.nan)
    down[:m] = np.where(ok, 1e4 * (log_entry - lo_min), np.nan)
    return up, down


def make_labels(path: PricePath, spec: LabelSpec, targets: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Labels `[N]` (1.0, 0.0 or NaN) keyed by `label_name(profile, target)` for in-play and `"p_toxic"`.
    `targets` defaults to every one the path's step can label."""
    targets = labellable(path.step_ms) if targets is None else targets
    out: dict[str, np.ndarray] = {}
    gate_known = np.isfinite(path.spread_bps) & np.isfinite(path.impact_bps)
    gated = gate_known & ((path.spread_bps > spec.max_spread_bps) | (path.impact_bps > spec.max_impact_bps))
    horizon_index = {t: i for i, t in enumerate(HORIZONS)}
    for target in targets:
        if target == "p_toxic":
            continue
        up, down = window_moves(path, HORIZONS[target])
        best = np.maximum(up, down)
        for profile, fee in spec.fee_bps.items():
            cost = fee + path.spread_bps + path.impact_bps
            hit = (best - cost >= spec.target_bps[profile][horizon_index[target]]) & ~gated
            label = np.where(hit, 1.0, 0.0)
            label[~(np.isfinite(best) & gate_known)] = np.nan
            out[label_name(profile, target)] = label
    if "p_toxic" in targets:
        up, down = window_moves(path, TOXIC_HORIZON_MS)
        adverse = np.where(path.direction > 0, down, up)
        label = np.where(adverse > spec.toxic_move_bps, 1.0, 0.0)
        label[~np.isfinite(adverse) | (path.direction == 0)] = np.nan
        out["p_toxic"] = label
    return out
