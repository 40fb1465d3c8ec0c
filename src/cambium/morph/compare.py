"""MOR-11: morphogenetic runs against the same host without seeds and against a larger static host.

`compare(cfg, name=...)` trains three registered arms with the same data, epochs and optimizer, each once per RNG seed
of `compare.train_seeds` (or `train.seed` alone), so every arm sees the same seeds and data orders:

- `morph`: the config as given, morphogenetic;
- `static`: the same host, `train.morphogenetic = false`;
- `static-large`: one static host whose widths are the smallest uniform widening of `model.widths` with at least
  `compare.param_ratio` × the largest final parameter count of the morph runs, and more than the host's (sized after
  those runs finish; seeds still in flight at the end are not host parameters and do not count). It is at least as
  large as every morph run, so a morph run matching it is never helped by size;
- `morph-<label>` for each of `compare.variants` (label → overrides, e.g. another controller): further grown arms,
  trained like `morph` and counted in sizing `static-large`.

It then writes, under `<first morph run dir>/compare/`: `compare.json` (every run's numbers, the per-arm summary and the
paired differences), `accuracy.png` (validation accuracy per epoch: each arm's mean over seeds, with its min-max
band), `seeds.png` (each seed location's lifecycle state per epoch, Gantt-like, per RNG seed) and `report.md` (per-arm
mean ± standard deviation, the paired differences of every grown arm against static and static-large with a 95 %
t-interval and a sign count, every run, the seed timelines). Every number comes from the runs' report.json and
metrics.duckdb, never recomputed by training.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cambium.core.config import load, load_data
from cambium.core.metrics import read_metrics
from cambium.core.progress import get_logger
from cambium.core.runs import get_run
from cambium.morph.config import CONFIG_MODEL, MorphConfig, TrainConfig
from cambium.morph.hosts import widths_for_params

__all__ = ["LABELS", "STATE_COLORS", "Arm", "Comparison", "compare", "seed_segments", "summarize", "write_report"]

log = get_logger("cambium.morph.compare")

LABELS = ("morph", "static", "static-large")

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
    train_seed: int
    run_id: str
    run_dir: Path
    widths: tuple[int, ...]
    report: dict[str, Any]
    val_acc_per_epoch: list[float] = field(default_factory=list)


@dataclass
class Comparison:
    arms: list[Arm]
    out_dir: Path
    grown: tuple[str, ...] = ("morph",)
    """The labels of the grown arms: `morph` and one `morph-<label>` per `compare.variants` entry."""

    @property
    def labels(self) -> tuple[str, ...]:
        return (*self.grown, *LABELS[1:])

    @property
    def report_path(self) -> Path:
        return self.out_dir / "report.md"

    def runs(self, label: str) -> list[Arm]:
        """The runs of one arm, in train-seed order."""
        return [a for a in self.arms if a.label == label]


def _arm_config(cfg: MorphConfig, overrides: list[str]) -> MorphConfig:
    return load_data(cfg.model_dump(mode="json"), CONFIG_MODEL, overrides)


def _arm(label: str, description: str, cfg: MorphConfig, runs_root: Path, report: dict[str, Any]) -> Arm:
    run_dir = get_run(runs_root, report["run_id"]).dir
    rows = read_metrics(run_dir / "metrics.duckdb", ["val_acc"], run_id=report["run_id"])
    return Arm(label, description, cfg.train.seed, report["run_id"], run_dir, tuple(cfg.model.widths), report,
               [r.value for r in rows])


def finished_run(runs_root: Path, run_name: str, arm_cfg: MorphConfig) -> dict[str, Any] | None:
    """The report of a finished run named `run_name` in `runs_root` whose config equals `arm_cfg` (None if none)."""
    from cambium.core.runs import list_runs

    for record in list_runs(runs_root, "morph"):
        if record.name != run_name or record.status != "finished" or not (record.dir / "report.json").is_file():
            continue
        if load(record.dir / "config.toml", CONFIG_MODEL) == arm_cfg:
            report: dict[str, Any] = json.loads((record.dir / "report.json").read_text())
            steps = arm_cfg.train.max_steps if arm_cfg.train.max_steps is not None else arm_cfg.train.epochs
            if report.get("epochs_done") == steps:
                return report
    return None


def compare(cfg: MorphConfig, *, name: str, runs_root: str | Path = "runs", reuse: bool = False) -> Comparison:
    """Train the three arms (morph, static, static-large) once per train seed and write the report. With `reuse`, an
    arm whose finished run (same name, equal config) is already in `runs_root` is read back instead of trained again
    (runs are deterministic: an interrupted comparison continues, or another process trains arms ahead of it)."""
    from cambium.morph.train import train

    runs_root = Path(runs_root)
    train_seeds = cfg.compare.train_seeds or (cfg.train.seed,)
    arms: list[Arm] = []

    def run(label: str, description: str, arm_cfg: MorphConfig, run_name: str) -> Arm:
        report = finished_run(runs_root, run_name, arm_cfg) if reuse else None
        log.info("compare: %s, train seed %d%s", description, arm_cfg.train.seed, " (reused)" if report else "")
        if report is None:
            report = train(arm_cfg, name=run_name, runs_root=runs_root)
        arm = _arm(label, description, arm_cfg, runs_root, report)
        arms.append(arm)
        return arm

    grown = ("morph", *(f"morph-{label}" for label in cfg.compare.variants))
    for s in train_seeds:
        run("morph", "morphogenetic host", _arm_config(cfg, ["train.morphogenetic=true", f"train.seed={s}"]), name)
        for label, overrides in cfg.compare.variants.items():
            run(f"morph-{label}", f"morphogenetic host, {label}",
                _arm_config(cfg, [*overrides, "train.morphogenetic=true", f"train.seed={s}"]), f"{name}-{label}")
    morphs = list(arms)
    # Strictly larger than the host even when nothing fossilized, so the third arm is never a copy of the second.
    target = max(math.ceil(max(a.report["params"] for a in morphs) * cfg.compare.param_ratio),
                 morphs[0].report["host_params"] + 1)
    wide, mult = widths_for_params(cfg.model.widths, cfg.model.num_classes, target)
    log.info("compare: the larger static host is %s (×%s, >= %d params)", list(wide), mult, target)
    for s in train_seeds:
        static_cfg = _arm_config(cfg, ["train.morphogenetic=false", f"train.seed={s}"])
        run("static", "same host, no seeds", static_cfg, f"{name}-static")
        large_cfg = _arm_config(static_cfg, [f"model.widths=[{', '.join(str(w) for w in wide)}]"])
        run("static-large", f"larger static host (widths ×{mult:g})", large_cfg, f"{name}-static-large")
    order = {label: k for k, label in enumerate((*grown, *LABELS[1:]))}
    arms.sort(key=lambda a: (order[a.label], train_seeds.index(a.train_seed)))
    result = Comparison(arms, morphs[0].run_dir / "compare", grown)
    write_report(result, cfg.train)
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


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """The two-sided Student-t confidence interval of the mean of `values` (None for fewer than two)."""
    if len(values) < 2:
        return None
    from scipy import stats

    mean, sd = _mean_sd(values)
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    return mean - half, mean + half


def summarize(result: Comparison) -> dict[str, Any]:
    """Per-arm mean/sd/min/max of val acc, test acc and parameters, and the paired (same train seed) differences of
    every grown arm against static and static-large: mean, sd, 95 % t-interval and how many seeds the grown arm was
    at least as accurate."""
    out: dict[str, Any] = {"arms": {}, "paired": {}}
    for label in result.labels:
        runs = result.runs(label)
        entry: dict[str, Any] = {"runs": len(runs), "widths": sorted({tuple(a.widths) for a in runs})}
        for key in ("val_acc", "test_acc", "params"):
            values = [float(a.report[key]) for a in runs]
            mean, sd = _mean_sd(values)
            entry[key] = {"mean": mean, "sd": sd, "min": min(values), "max": max(values)}
        out["arms"][label] = entry
    for grown in result.grown:
        morph = {a.train_seed: a for a in result.runs(grown)}
        for other in LABELS[1:]:
            pairs = [(morph[a.train_seed], a) for a in result.runs(other) if a.train_seed in morph]
            entry = {"seeds": len(pairs)}
            for key in ("val_acc", "test_acc"):
                diffs = [m.report[key] - o.report[key] for m, o in pairs]
                mean, sd = _mean_sd(diffs)
                entry[key] = {"mean": mean, "sd": sd, "ci95": t_interval(diffs),
                              "morph_at_least_as_good": sum(d >= 0 for d in diffs)}
            out["paired"][f"{grown} - {other}"] = entry
    return out


def _pm(stat: dict[str, float], fmt: str = ".4f") -> str:
    return f"{stat['mean']:{fmt}} ± {stat['sd']:.4f}"


def _summary_table(result: Comparison, summary: dict[str, Any]) -> list[str]:
    lines = ["| arm | host widths | runs | val acc | test acc | parameters |", "|---|---|---|---|---|---|"]
    for label in result.labels:
        e, first = summary["arms"][label], result.runs(label)[0]
        params = e["params"]
        span = f"{params['mean']:.0f}" if params["min"] == params["max"] else (
            f"{params['mean']:.0f} ({params['min']:.0f}-{params['max']:.0f})")
        lines.append(f"| {label} ({first.description}) | {list(first.widths)} | {e['runs']} | {_pm(e['val_acc'])} "
                     f"| {_pm(e['test_acc'])} | {span} |")
    return lines


def _ci(stat: dict[str, Any]) -> str:
    ci = stat.get("ci95")
    return "—" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _paired_table(summary: dict[str, Any]) -> list[str]:
    lines = ["| difference | seeds | val acc (95 % CI) | test acc (95 % CI) "
             "| grown at least as accurate (val / test) |",
             "|---|---|---|---|---|"]
    for name, e in summary["paired"].items():
        lines.append(f"| {name} | {e['seeds']} | {_pm(e['val_acc'], '+.4f')} {_ci(e['val_acc'])} "
                     f"| {_pm(e['test_acc'], '+.4f')} {_ci(e['test_acc'])} "
                     f"| {e['val_acc']['morph_at_least_as_good']} / {e['test_acc']['morph_at_least_as_good']} "
                     f"of {e['seeds']} |")
    return lines


def _runs_table(arms: list[Arm]) -> list[str]:
    lines = ["| arm | train seed | run | host widths | val acc | test acc | parameters |",
             "|---|---|---|---|---|---|---|"]
    for a in arms:
        r = a.report
        lines.append(f"| {a.label} | {a.train_seed} | `{a.run_id}` | {list(a.widths)} | {r['val_acc']:.4f} "
                     f"| {r['test_acc']:.4f} | {r['params']} |")
    return lines


def _timeline_text(seeds: dict[str, Any]) -> list[str]:
    lines = []
    for loc, seed in seeds.items():
        steps = " → ".join(f"{c['target']}@{c['epoch']}" for c in seed["timeline"]) or "DORMANT throughout"
        lines.append(f"- `{loc}` (final {seed['state']}): {steps}")
    return lines


def write_report(result: Comparison, train: TrainConfig) -> Path:
    """compare.json, accuracy.png, seeds.png and report.md into `result.out_dir`; returns report.md's path."""
    epochs = train.epochs
    lr = f"host lr {train.lr:g}" + ("" if train.lr_schedule == "constant" else
                                     f" on a cosine to {train.lr * train.lr_floor:g}")
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    morphs = result.runs("morph")
    segments = {
        a.train_seed: {loc: seed_segments(s["timeline"], epochs) for loc, s in a.report.get("seeds", {}).items()}
        for a in morphs
    }
    summary = summarize(result)
    data = {
        "runs": [{"label": a.label, "description": a.description, "train_seed": a.train_seed, "run_id": a.run_id,
                  "widths": list(a.widths), "val_acc": a.report["val_acc"], "test_acc": a.report["test_acc"],
                  "params": a.report["params"], "epochs_done": a.report["epochs_done"],
                  "val_acc_per_epoch": a.val_acc_per_epoch}
                 for a in result.arms],
        "summary": summary,
        "seed_segments": {str(s): seg for s, seg in segments.items()},
    }
    (out / "compare.json").write_text(json.dumps(data, indent=2) + "\n")
    _plot_accuracy(result, out / "accuracy.png")
    def row(a: Arm, loc: str) -> str:
        return f"{loc} (seed {a.train_seed})" if len(morphs) > 1 else loc

    rows = {row(a, loc): segments[a.train_seed][loc] for a in morphs for loc in segments[a.train_seed]}
    finals = {row(a, loc): str(s["state"]) for a in morphs for loc, s in a.report.get("seeds", {}).items()}
    _plot_seeds(rows, finals, epochs, out / "seeds.png")
    seeds_list = ", ".join(str(a.train_seed) for a in morphs)
    large = summary["arms"]["static-large"]["params"]["mean"]
    md = [
        "# Morphogenesis against static hosts (MOR-11)", "",
        f"CIFAR-10 (committed images), {epochs} epochs, {lr}, same data, optimizer and data order in every arm, "
        f"each arm trained once per train seed ({seeds_list}). Accuracy is top-1 on the held-out validation split "
        "and on the test batch, after the last epoch; ± is the standard deviation over seeds.", "",
        *_summary_table(result, summary), "",
        f"The morphogenetic host started at {morphs[0].report['host_params']} parameters and ended at "
        f"{summary['arms']['morph']['params']['min']:.0f}-{summary['arms']['morph']['params']['max']:.0f}; the "
        f"larger static host ({large:.0f}) is the smallest uniform widening of the host with at least as many as "
        "the largest morph run.", "",
        "## Paired differences (same train seed)", "",
        *_paired_table(summary), "",
        "## Validation accuracy per epoch", "", "![validation accuracy per epoch](accuracy.png)", "",
        "## Every run", "", *_runs_table(result.arms), "",
        "## Seed timelines (morphogenetic arm)", "",
        "State changes as `STATE@epoch` (the boundary before that 0-based epoch):", "",
    ]
    for a in morphs:
        if len(morphs) > 1:
            md += [f"Train seed {a.train_seed} (`{a.run_id}`):", ""]
        md += [*(_timeline_text(a.report.get("seeds", {})) or ["- no seeds"]), ""]
    for grown in result.grown[1:]:
        md += [f"### {grown}", ""]
        for a in result.runs(grown):
            md += [f"Train seed {a.train_seed} (`{a.run_id}`):", "",
                   *(_timeline_text(a.report.get("seeds", {})) or ["- no seeds"]), ""]
    md += ["![seed timeline](seeds.png)", ""]
    result.report_path.write_text("\n".join(md))
    return result.report_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_accuracy(result: Comparison, path: Path) -> None:
    """Each arm's mean validation accuracy per epoch over its runs, with the min-max band when there are several."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in result.labels:
        runs = [a.val_acc_per_epoch for a in result.runs(label) if a.val_acc_per_epoch]
        if not runs:
            continue
        n = min(len(r) for r in runs)
        epochs = range(1, n + 1)
        mean = [statistics.fmean(r[e] for r in runs) for e in range(n)]
        params = statistics.fmean(a.report["params"] for a in result.runs(label))
        (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=f"{label} ({params:.0f} params, {len(runs)} runs)")
        if len(runs) > 1:
            ax.fill_between(epochs, [min(r[e] for r in runs) for e in range(n)],
                            [max(r[e] for r in runs) for e in range(n)], color=line.get_color(), alpha=0.15)
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
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(handles), 6),
                  fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
