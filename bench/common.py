"""The benchmark convention, shared by every `bench/<name>.py`.

A benchmark runs as `python -m bench.<name> [--quick]` (`--quick`: a sub-minute version that checks it works), writes
`bench/results/<name>.json` as a list of records

    {case, metric, value, unit, reference, reference_value, ratio, machine}

and prints one line per case with the ratio last. `ratio` is oriented so that > 1 means cambium does better than the
reference measured in the same run: value / reference_value for higher-is-better metrics (GFLOP/s, tokens/s),
reference_value / value for lower-is-better ones (seconds, bytes). `machine` holds the facts the figure depends on.

Timings on a shared machine are noisy: `interleaved_best` alternates the contenders and keeps each one's best time,
which estimates the uncontended time and exposes both sides to the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cambium.core.doctor import machine_facts

__all__ = ["RESULTS_DIR", "interleaved_best", "machine", "make_record", "mean_sd_n", "parse_args", "print_line",
           "resumable_study", "write_results"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine(device: str = "cpu") -> dict[str, Any]:
    """Machine facts (CPU, RAM, versions, threads, device) plus the 1-minute load average at measuring time."""
    facts = machine_facts(device)
    facts["load_avg_1m"] = round(os.getloadavg()[0], 2)
    facts["cuda_available"] = torch.cuda.is_available()
    return facts


def parse_args(description: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """`--quick` and `--results-dir`, plus whatever `extra(parser)` adds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats: checks the benchmark works")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where <name>.json is written")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def interleaved_best(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Best wall time (seconds) of each function over `rounds` rounds that call every function once in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(max(rounds, 1)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def make_record(case: str, metric: str, value: float, unit: str, reference: str, reference_value: float | None,
                *, higher_is_better: bool, machine_facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """One result record; `ratio` > 1 means better than the reference (None without a reference value)."""
    ratio: float | None = None
    if reference_value is not None and reference_value > 0 and value > 0:
        ratio = value / reference_value if higher_is_better else reference_value / value
    return {"case": case, "metric": metric, "value": value, "unit": unit, "reference": reference,
            "reference_value": reference_value, "ratio": ratio, "machine": machine_facts or machine()}


def print_line(rec: dict[str, Any]) -> None:
    ref = "" if rec["reference_value"] is None else f"  {rec['reference']} {rec['reference_value']:.4g} {rec['unit']}"
    ratio = "n/a" if rec["ratio"] is None else f"{rec['ratio']:.3f}"
    print(f"{rec['case']:<28} {rec['metric']} {rec['value']:.4g} {rec['unit']}{ref}  ratio {ratio}")


def write_results(name: str, records: list[dict[str, Any]], results_dir: Path = RESULTS_DIR) -> Path:
    """Write `<results_dir>/<name>.json` (atomically) and print one line per record; returns the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(records, indent=2) + "\n")
    tmp.replace(path)
    for rec in records:
        print_line(rec)
    return path


def mean_sd_n(records: list[dict[str, Any]], rows: Sequence[str], keys: Callable[[list[dict[str, Any]]], list[str]]
              ) -> dict[str, dict[str, list[float]]]:
    """Per row (in `rows` order) and metric (`keys(row's records)`): [mean, sample sd (0 for one run), n]."""
    out: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        runs = [r for r in records if r["row"] == row]
        if runs:
            out[row] = {k: [statistics.fmean(r[k] for r in runs),
                            statistics.stdev([r[k] for r in runs]) if len(runs) > 1 else 0.0, len(runs)]
                        for k in keys(runs)}
    return out


def resumable_study(out: Path, seeds: Sequence[int], rows: Sequence[str], steps: int,
                    measure: Callable[[str, int], dict[str, Any]],
                    summarise: Callable[[list[dict[str, Any]]], dict[str, Any]],
                    describe: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """A seed × row study that survives interruption: `measure(row, seed)` runs for every pair not already recorded
    in `out` at this `steps` (records of another step count are dropped), each record ({row, seed, steps, seconds,
    **measured}) is printed with `describe` and `out` ({runs, summary}) rewritten after each. Returns every record."""
    records: list[dict[str, Any]] = []
    if out.is_file():
        records = [r for r in json.loads(out.read_text()).get("runs", []) if r["steps"] == steps]
    done = {(r["row"], r["seed"]) for r in records}
    for seed in seeds:
        for row in rows:
            if (row, seed) in done:
                continue
            t0 = time.time()
            measured = measure(row, seed)
            record = {"row": row, "seed": seed, "steps": steps, **measured, "seconds": round(time.time() - t0, 1)}
            records.append(record)
            print(f"{row:7s} seed {seed}: {describe(record)} ({record['seconds']:.0f} s)", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.write_text(json.dumps({"runs": records, "summary": summarise(records)}, indent=1) + "\n")
            tmp.replace(out)
    return records
