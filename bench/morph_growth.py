"""morph growth study (MOR-11): is it the growing or the grown architecture that decides against a larger static host?

Run after `cambium morph compare` (which trains the grown, same-host and larger-static arms):

    python -m bench.morph_growth --compare <first morph run>/compare/compare.json [--labels morph,morph-gnn]

For every grown run of the chosen arms it trains one more control, "born grown": the same final architecture (the
run's host plus a kernel of every blueprint that FOSSILIZED in it, at the same locations, blended at α = 1 with the
input not detached) trained statically from epoch 0 with the run's own config: same seed, data order, epochs,
optimizer, learning-rate schedule and compile settings (the kernels start from the library's initialisation, output
op zeroed). Same parameters as the grown run by construction.

- grown − born grown isolates the growth schedule (the same network, built up during training or there from the start);
- born grown − larger static (paired with compare.json's static-large run of the same seed) isolates the
  architecture (host + residual blueprints vs a uniformly wider host).

Writes bench/results/morph_growth.json (every control run, and paired differences with a 95 % t-interval) and
prints a table. Numbers come from the runs' report.json files and the controls trained here. A control already in
that file (same grown run id) is reused, and `--runs DIR,...` trains the controls of grown runs before their
comparison has finished (no pairing), so the study's wall time overlaps.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import machine, parse_args
from cambium.core.config import load
from cambium.core.schedule import LRScheduler
from cambium.morph.compare import t_interval
from cambium.morph.compiler import compile_module
from cambium.morph.config import CONFIG_MODEL, MorphConfig
from cambium.morph.contracts import CompileSettings
from cambium.morph.hosts import HostCNN
from cambium.morph.library import Urza
from cambium.morph.slots import Mode
from cambium.morph.train import CifarSplits, _batches, accuracy, host_schedule, load_splits
from cambium.morph.wrap import wrap

NAME = "morph_growth"


def fossils(report: dict[str, Any]) -> dict[str, str]:
    """location → blueprint id of every seed that FOSSILIZED in a grown run's report."""
    return {r["seed_id"]: r["blueprint_id"] for r in report.get("field_reports", []) if r["outcome"] == "FOSSILIZED"}


def born_grown(cfg: MorphConfig, splits: CifarSplits, kernels: dict[str, str], urza: Urza,
               epochs: int | None = None) -> dict[str, Any]:
    """Train host + the given blueprints (location → blueprint id) statically from epoch 0; returns its accuracies."""
    torch.manual_seed(cfg.train.seed)
    host = HostCNN(cfg.model.widths, cfg.model.num_classes)
    model = wrap(host, cfg.seeds)
    settings = CompileSettings(backend=cfg.library.backend, init_seed=cfg.train.seed)
    for loc, slot in model.iter_slots():
        if loc in kernels:
            slot.kernel = compile_module(urza.blueprint(kernels[loc]).ir, settings)
            slot.mode, slot.alpha, slot.detach_input = Mode.BLEND, 1.0, False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    epochs = epochs or cfg.train.epochs
    per_epoch = -(-len(splits.y_train) // cfg.data.batch_size)
    schedule = host_schedule(cfg.train, cfg.train.epochs * per_epoch)
    sched = LRScheduler(opt, schedule) if schedule is not None else None
    step = 0
    for epoch in range(epochs):
        model.train()
        for x, y in _batches(splits, cfg.data.batch_size, cfg.train.seed, epoch):
            if sched is not None:
                sched.step(step)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return {"val_acc": accuracy(model, splits.x_val, splits.y_val),
            "test_acc": accuracy(model, splits.x_test, splits.y_test),
            "params": sum(p.numel() for p in params), "kernels": dict(kernels)}


def control_of(run_dir: Path, cache: dict[str, Any], quick: bool) -> dict[str, Any]:
    """The born-grown control of the grown run in `run_dir` (from `cache` by run id, else trained and cached)."""
    report = json.loads((run_dir / "report.json").read_text())
    if report["run_id"] in cache and not quick:
        return dict(cache[report["run_id"]])
    cfg = load(run_dir / "config.toml", CONFIG_MODEL, ["data.limit=256"] if quick else [])
    t0 = time.perf_counter()
    control = born_grown(cfg, load_splits(cfg), fossils(report), Urza.local(cfg.library.root),
                         epochs=1 if quick else None)
    control["seconds"] = time.perf_counter() - t0
    if not quick:
        cache[report["run_id"]] = control
    return control


def _paired(a: list[float], b: list[float]) -> dict[str, Any]:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return {"mean": statistics.fmean(diffs), "sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "ci95": t_interval(diffs), "at_least_as_good": sum(d >= 0 for d in diffs), "n": len(diffs)}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra=lambda p: (
        p.add_argument("--compare", type=Path, help="compare.json of a finished `morph compare`"),
        p.add_argument("--runs", default="", help="comma-separated grown run dirs: train (and cache) their controls"),
        p.add_argument("--labels", default="morph", help="comma-separated grown arms (e.g. morph,morph-gnn)"),
        p.add_argument("--threads", type=int, default=1, help="torch intra-op threads"),
    ))
    torch.set_num_threads(args.threads)
    path = args.results_dir / f"{NAME}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    cache: dict[str, Any] = previous.get("controls", {})
    out: dict[str, Any] = {"compare": str(args.compare), "machine": machine(), "controls": cache, "runs": [],
                           "paired": {}}
    args.results_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        path.write_text(json.dumps(out, indent=2) + "\n")

    for run_dir in filter(None, args.runs.split(",")):
        control = control_of(Path(run_dir), cache, args.quick)
        print(f"{run_dir}: born grown val {control['val_acc']:.4f} test {control['test_acc']:.4f} "
              f"({control['params']} params)", flush=True)
        save()
    if args.compare is None:
        return
    data = json.loads(args.compare.read_text())
    runs_root = args.compare.resolve().parents[2]
    large = {r["train_seed"]: r for r in data["runs"] if r["label"] == "static-large"}
    for label in args.labels.split(","):
        rows = []
        for run in (r for r in data["runs"] if r["label"] == label):
            control = control_of(runs_root / run["run_id"], cache, args.quick)
            save()
            row = {"label": label, "train_seed": run["train_seed"], "run_id": run["run_id"],
                   "grown": {k: run[k] for k in ("val_acc", "test_acc", "params")}, "born_grown": control,
                   "static_large": {k: large[run["train_seed"]][k] for k in ("val_acc", "test_acc", "params")}}
            rows.append(row)
            print(f"{label} seed {row['train_seed']}: grown val {row['grown']['val_acc']:.4f} "
                  f"({row['grown']['params']} params) | born grown val {control['val_acc']:.4f} "
                  f"({control['params']}) | static-large val {row['static_large']['val_acc']:.4f} "
                  f"({row['static_large']['params']})", flush=True)
        out["runs"] += rows
        for key in ("val_acc", "test_acc"):
            grown = [r["grown"][key] for r in rows]
            born = [r["born_grown"][key] for r in rows]
            wide = [r["static_large"][key] for r in rows]
            out["paired"][f"{label} {key}"] = {"grown - born grown": _paired(grown, born),
                                               "born grown - static-large": _paired(born, wide),
                                               "grown - static-large": _paired(grown, wide)}
    save()
    for name, diffs in out["paired"].items():
        for what, d in diffs.items():
            ci = "" if d["ci95"] is None else f" [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
            print(f"{name:>20} {what:<26} {d['mean']:+.4f} ± {d['sd']:.4f}{ci}  ≥0 in {d['at_least_as_good']}/{d['n']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
