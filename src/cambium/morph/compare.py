"""MOR-11: a morphogenetic run against the same host without seeds and against a larger static host.

`compare(cfg, name=...)` trains three registered runs with the same data, epochs, optimizer and seed:

- `morph`: the config as given, morphogenetic;
- `static`: the same host, `train.morphogenetic = false`;
- `static-large`: a static host whose widths are the smallest uniform widening of `model.widths` with at least
  `compare.param_ratio` × the morphogenetic run's final parameter count, and more than the host's (sized after that
  run finishes; seeds still in flight at the end are not host parameters and do not count).

It then writes, under `<morph run dir>/compare/`: `compare.json` (the numbers), `accuracy.png` (validation accuracy
per epoch of each arm), `seeds.png` (each seed's lifecycle state per epoch, Gantt-like) and `report.md` (a table of
final val/test accuracy and parameter count per arm, the seed timelines in text, the figures). Every number comes from
the runs' report.json and metrics.duckdb, never recomputed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cambium.core.config import load_data
from cambium.core.metrics import read_metrics
from cambium.core.progress import get_logger
from cambium.core.runs import get_run
from cambium.morph.config import CONFIG_MODEL, MorphConfig
from cambium.morph.hosts import widths_for_params

__all__ = ["STATE_COLORS", "Arm", "Comparison", "compare", "seed_segments", "write_report"]

log = get_logger("cambium.morph.compare")

# One colour per lifecycle state; failures are warm, the way to FOSSILIZED cool.
STATE_COLORS: dict[str, str] = {
    "DORMANT": "#e6e6e6", "GERMINATED": "#c6dbef", "LOADING": "#9ecae1", "TRAINING": "#6baed6",
    "GRAFTING": "#4292c6", "STABILIZATION": "#2171b5", "EVALUATING": "#084594", "FINE_TUNING": "#74c476",
    "FOSSILIZED": "#238b45", "CULLED": "#fd8d3c", "ROLLED_BACK": "#d7301f",
}


@dataclass
class Arm:
    """One trained run of the comparison: its report.json and validation accuracy per epoch."""

    label: str
    description: str
    run_id: str
    run_dir: Path
    widths: tuple[int, ...]
    report: dict[str, Any]
    val_acc_per_epoch: list[float] = field(default_factory=list)


@dataclass
class Comparison:
    arms: list[Arm]
    out_dir: Path

    @property
    def report_path(self) -> Path:
        return self.out_dir / "report.md"


def _arm_config(cfg: MorphConfig, overrides: list[str]) -> MorphConfig:
    return load_data(cfg.model_dump(mode="json"), CONFIG_MODEL, overrides)


def _arm(label: str, description: str, cfg: MorphConfig, runs_root: Path, report: dict[str, Any]) -> Arm:
    run_dir = get_run(runs_root, report["run_id"]).dir
    rows = read_metrics(run_dir / "metrics.duckdb", ["val_acc"], run_id=report["run_id"])
    return Arm(label, description, report["run_id"], run_dir, tuple(cfg.model.widths), report,
               [r.value for r in rows])


def compare(cfg: MorphConfig, *, name: str, runs_root: str | Path = "runs") -> Comparison:
    """Train the three arms (morph, static, static-large) and write the report; returns where it went."""
    from cambium.morph.train import train

    runs_root = Path(runs_root)
    morph_cfg = _arm_config(cfg, ["train.morphogenetic=true"])
    static_cfg = _arm_config(cfg, ["train.morphogenetic=false"])
    log.info("compare: training the morphogenetic arm")
    morph = _arm("morph", "morphogenetic host", morph_cfg, runs_root, train(morph_cfg, name=name, runs_root=runs_root))
    log.info("compare: training the same host without seeds")
    static = _arm("static", "same host, no seeds", static_cfg, runs_root,
                  train(static_cfg, name=f"{name}-static", runs_root=runs_root))
    # Strictly larger than the host even when nothing fossilized, so the third arm is never a copy of the second.
    target = max(math.ceil(morph.report["params"] * cfg.compare.param_ratio), morph.report["host_params"] + 1)
    wide, mult = widths_for_params(cfg.model.widths, cfg.model.num_classes, target)
    large_cfg = _arm_config(static_cfg, [f"model.widths=[{', '.join(str(w) for w in wide)}]"])
    log.info("compare: training the larger static host %s (×%s, >= %d params)", list(wide), mult, target)
    large = _arm("static-large", f"larger static host (widths ×{mult:g})", large_cfg, runs_root,
                 train(large_cfg, name=f"{name}-static-large", runs_root=runs_root))
    result = Comparison([morph, static, large], morph.run_dir / "compare")
    write_report(result, epochs=cfg.train.epochs)
    return result


def seed_segments(timeline: list[dict[str, Any]], epochs: int) -> list[tuple[str, int, int]]:
    """(state, first epoch, end epoch exclusive) spans of one seed from its report.json timeline.

    A change recorded at boundary `e` holds from epoch e (0-based) on; several changes at one boundary leave only
    the last state visible. A seed with no change was DORMANT throughout.
    """
    spans: list[tuple[str, int, int]] = []
    state, start = "DORMANT", 0
    for change in timeline:
        epoch = int(change["epoch"])
        if epoch > start:
            spans.append((state, start, epoch))
            start = epoch
        state = str(change["target"])
    if epochs > start:
        spans.append((state, start, epochs))
    return spans


def _table(arms: list[Arm]) -> list[str]:
    lines = ["| arm | run | host widths | val acc | test acc | parameters |", "|---|---|---|---|---|---|"]
    for a in arms:
        r = a.report
        lines.append(f"| {a.label} ({a.description}) | `{a.run_id}` | {list(a.widths)} | {r['val_acc']:.4f} "
                     f"| {r['test_acc']:.4f} | {r['params']} |")
    return lines


def _timeline_text(seeds: dict[str, Any]) -> list[str]:
    lines = []
    for loc, seed in seeds.items():
        steps = " → ".join(f"{c['target']}@{c['epoch']}" for c in seed["timeline"]) or "DORMANT throughout"
        lines.append(f"- `{loc}` (final {seed['state']}): {steps}")
    return lines


def write_report(result: Comparison, *, epochs: int) -> Path:
    """compare.json, accuracy.png, seeds.png and report.md into `result.out_dir`; returns report.md's path."""
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    arms = {a.label: a for a in result.arms}
    seeds: dict[str, Any] = arms["morph"].report.get("seeds", {})
    segments = {loc: seed_segments(s["timeline"], epochs) for loc, s in seeds.items()}
    summary = {
        "arms": [{"label": a.label, "description": a.description, "run_id": a.run_id, "widths": list(a.widths),
                  "val_acc": a.report["val_acc"], "test_acc": a.report["test_acc"], "params": a.report["params"],
                  "epochs_done": a.report["epochs_done"], "val_acc_per_epoch": a.val_acc_per_epoch}
                 for a in result.arms],
        "seed_segments": segments,
    }
    (out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot_accuracy(result.arms, out / "accuracy.png")
    _plot_seeds(segments, {loc: str(s["state"]) for loc, s in seeds.items()}, epochs, out / "seeds.png")
    morph = arms["morph"].report
    md = [
        "# Morphogenesis against static hosts (MOR-11)", "",
        f"CIFAR-10 (committed images), {epochs} epochs, same data order, optimizer and seed in every arm. "
        "Accuracy is top-1 on the held-out validation split and on the test batch.", "",
        *_table(result.arms), "",
        f"The morphogenetic host started at {morph['host_params']} parameters and ended at {morph['params']}; "
        "the larger static host is the smallest uniform widening of the host with at least that many.", "",
        "## Validation accuracy per epoch", "", "![validation accuracy per epoch](accuracy.png)", "",
        "## Seed timeline (morphogenetic arm)", "",
        "State changes as `STATE@epoch` (the boundary before that 0-based epoch):", "",
        *(_timeline_text(seeds) or ["- no seeds"]), "", "![seed timeline](seeds.png)", "",
    ]
    result.report_path.write_text("\n".join(md))
    return result.report_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_accuracy(arms: list[Arm], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for a in arms:
        ax.plot(range(1, len(a.val_acc_per_epoch) + 1), a.val_acc_per_epoch, marker="o", ms=3,
                label=f"{a.label} ({a.report['params']} params)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_seeds(segments: dict[str, list[tuple[str, int, int]]], finals: dict[str, str], epochs: int,
                path: Path) -> None:
    """One bar per seed location, coloured by state per epoch; the state after the last boundary written beside."""
    plt = _pyplot()
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    locs = list(segments)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * max(len(locs), 1)))
    seen: set[str] = set()
    for row, loc in enumerate(locs):
        for state, start, end in segments[loc]:
            ax.broken_barh([(start, end - start)], (row - 0.4, 0.8), facecolors=STATE_COLORS.get(state, "#000000"),
                           edgecolor="white", linewidth=0.5)
            seen.add(state)
        ax.text(epochs, row, f" → {finals.get(loc, '')}", va="center", fontsize=7, clip_on=False)
    ax.set_yticks(range(len(locs)), locs)
    ax.set_xlim(0, epochs)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.invert_yaxis()
    handles = [Patch(color=c, label=s) for s, c in STATE_COLORS.items() if s in seen]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.16, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
