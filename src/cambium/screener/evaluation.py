"""The held-out evaluation of `screener train`: metrics, block-bootstrap CIs, and the Markdown + PNG report.

Metrics per model on the held-out rows: AUC and PR-AUC (average precision), Brier score and ECE (see
`calibration.py`). The AUC difference between two models gets a 95 % percentile CI from a block bootstrap: the
held-out rows are grouped into blocks of (symbol, `block_ms` of time), blocks are drawn with replacement, and both
models are scored on the same draw (rows close in time are dependent; resampling single rows would make the CI too
narrow).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cambium.screener.calibration import Reliability, ece

__all__ = ["TargetReport", "auc_diff_ci", "metrics", "write_report"]


def metrics(p: np.ndarray, y: np.ndarray, bins: int) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    both = np.unique(y).size == 2
    return {"auc": float(roc_auc_score(y, p)) if both else float("nan"),
            "pr_auc": float(average_precision_score(y, p)) if both else float("nan"),
            "brier": float(brier_score_loss(y, p)), "ece": ece(p, y, bins)}


def auc_diff_ci(a: np.ndarray, b: np.ndarray, y: np.ndarray, blocks: np.ndarray, n: int,
                rng: np.random.Generator) -> tuple[float, float, float]:
    """(AUC(a) − AUC(b), 2.5 % and 97.5 % bootstrap quantiles) over `blocks` `[N]` (integer block ids)."""
    from sklearn.metrics import roc_auc_score

    point = float(roc_auc_score(y, a) - roc_auc_score(y, b))
    order = np.argsort(blocks, kind="stable")
    ids, starts = np.unique(blocks[order], return_index=True)
    ends = np.append(starts[1:], order.size)
    diffs = []
    for _ in range(n):
        pick = rng.integers(0, ids.size, ids.size)
        rows = np.concatenate([order[starts[j]:ends[j]] for j in pick])
        yy = y[rows]
        if yy.min() == yy.max():
            continue
        diffs.append(roc_auc_score(yy, a[rows]) - roc_auc_score(yy, b[rows]))
    if not diffs:
        return point, float("nan"), float("nan")
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return point, float(lo), float(hi)


@dataclass
class TargetReport:
    """One (profile, target) label: held-out metrics per model, AUC-difference CIs, importance, reliability."""

    key: str
    n_train: int
    n_test: int
    base_rate: float
    cv_auc: list[float]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    auc_diff: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    importance: dict[str, float] = field(default_factory=dict)
    reliability: dict[str, Reliability] = field(default_factory=dict)


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.4f}"


def write_report(path: Path, reports: Sequence[TargetReport], *, title: str, facts: Mapping[str, str],
                 unlabelled: Sequence[str], active: str) -> Path:
    """`path` (Markdown) and `<stem>-reliability.png` next to it; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = path.with_name(path.stem + "-reliability.png")
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    if unlabelled:
        lines.append(f"- not labellable from this source (the heuristic predicts them): {', '.join(unlabelled)}")
    lines += ["", f"Held-out metrics (the active calibration is **{active}**; ECE over equal-width bins). "
              "AUC differences: point estimate [95 % block-bootstrap CI].", ""]
    for r in reports:
        lines += [f"## {r.key}", "",
                  f"train rows {r.n_train:,}, held-out rows {r.n_test:,}, held-out positive rate {r.base_rate:.4f}, "
                  f"purged CV AUC (raw LightGBM) {', '.join(f'{a:.3f}' for a in r.cv_auc)}", "",
                  "| model | AUC | PR-AUC | Brier | ECE |", "| --- | --- | --- | --- | --- |"]
        for name, m in r.metrics.items():
            lines.append(f"| {name} | {_fmt(m['auc'])} | {_fmt(m['pr_auc'])} | {_fmt(m['brier'])} | {_fmt(m['ece'])} |")
        lines.append("")
        for name, (d, lo, hi) in r.auc_diff.items():
            lines.append(f"- AUC({active}) − AUC({name}) = {d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        top = sorted(r.importance.items(), key=lambda kv: -kv[1])
        total = sum(v for _, v in top) or 1.0
        lines += ["", "Feature importance (LightGBM gain, share): "
                  + ", ".join(f"{k} {v / total:.2f}" for k, v in top), ""]
    lines += [f"![reliability]({png.name})", ""]
    path.write_text("\n".join(lines))

    cols = min(3, max(1, len(reports)))
    rows = -(-len(reports) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax, r in zip(axes.ravel(), reports, strict=False):
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
        for name, rel in r.reliability.items():
            ax.plot(rel.mean_p, rel.frac_pos, marker="o", ms=3, lw=1, label=name)
        hi = max(0.05, max((float(rel.mean_p.max()) for rel in r.reliability.values()), default=0.05))
        ax.set_xlim(0, min(1.0, hi * 1.1))
        ax.set_ylim(0, min(1.0, hi * 1.1))
        ax.set_title(r.key, fontsize=9)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed frequency")
    for ax in axes.ravel()[len(reports):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
