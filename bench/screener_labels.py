"""The vectorised labeller (`screener.labels.make_labels`) against its loop reference on the committed 1 m klines.

Rows per second of labelling every (profile, horizon) the 1 m bars can tell (2 m, 5 m × A, B): the vectorised
van Herk/Gil-Werman path vs `labels_reference.reference_labels` (plain loops over timestamps) on the same rows, the
reference on a prefix (it is quadratic in the worst case). `python -m bench.screener_labels [--quick]`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.common import machine, make_record, parse_args, write_results
from cambium.market.importers import read_kline_file
from cambium.screener.labels import LabelSpec, PricePath, labellable, make_labels
from cambium.screener.labels_reference import reference_labels

KLINES = Path("data/samples/market/klines_1m_futures/BTCUSDT_2023-07.csv.gz")


def main() -> None:
    args = parse_args(__doc__ or "")
    table = read_kline_file(KLINES).table
    n_ref = 300 if args.quick else 2_000
    ot = table.column("open_time").to_numpy().astype(np.int64)
    close, high, low = (table.column(c).to_numpy().astype(np.float64) for c in ("close", "high", "low"))
    n = ot.size
    path = PricePath(ot + 60_000, close, high, low, np.full(n, 0.5), np.zeros(n), np.zeros(n, np.int8), 60_000)
    spec, targets = LabelSpec(), labellable(60_000)
    best = float("inf")
    for _ in range(3 if args.quick else 10):
        t0 = time.perf_counter()
        fast = make_labels(path, spec, targets)
        best = min(best, time.perf_counter() - t0)
    sub = slice(0, n_ref)
    t0 = time.perf_counter()
    ref = reference_labels(path.ts[sub].tolist(), close[sub].tolist(), high[sub].tolist(), low[sub].tolist(),
                           [0.5] * n_ref, [0.0] * n_ref, [0] * n_ref, 60_000, targets, spec.fee_bps, spec.target_bps,
                           spec.max_spread_bps, spec.max_impact_bps, spec.toxic_move_bps)
    ref_s = time.perf_counter() - t0
    # equal where both are labelled (the prefix's last rows lack the horizon in the reference)
    for key, col in ref.items():
        want, got = np.asarray(col), fast[key][sub]
        both = ~np.isnan(want)
        assert np.array_equal(want[both], got[both]), key
    facts = machine()
    rec = make_record("labels BTCUSDT 1m (2m, 5m × A, B)", "rows_per_s", n / best, "rows/s",
                      "labels_reference loops", n_ref / ref_s, higher_is_better=True, machine_facts=facts)
    write_results("screener_labels", [rec], args.results_dir)


if __name__ == "__main__":
    main()
