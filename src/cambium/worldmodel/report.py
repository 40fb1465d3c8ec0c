"""The pipeline's Markdown report (`<run>/report/report.md`) with PNG plots (matplotlib, Agg backend).

Figures: Strate I reconstructions of hold-out patches, codebook usage (codes sorted by frequency), training curves,
fan charts of sampled futures against realised prices and PIT histograms; tables: the probes and the forecast scores
of phase 7. Numbers are printed from `probe.json` and `forecast.json` (full precision).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cambium.core.metrics import read_metrics
from cambium.worldmodel.artifacts import RunArtifacts
from cambium.worldmodel.backtest import BASELINES, UNSCALED, BacktestResult
from cambium.worldmodel.data import Split, holdout_part
from cambium.worldmodel.evaluation import CodedSeries
from cambium.worldmodel.features import CandleBatch
from cambium.worldmodel.jepa import WorldModelJEPA
from cambium.worldmodel.training import sample_windows

__all__ = ["AGENTS_MARKER", "format_backtest_table", "format_forecast_table", "format_probe_table",
           "write_backtest_report", "write_report"]

AGENTS_MARKER = "\n## Agents on the hold-out (phases 8–9, WM-4/5/7)\n"

METHOD_NAMES = {"cambium": "cambium (Strate III)", "random_walk": "random walk", "gbm": "GBM, rolling vol",
                "bootstrap": "historical bootstrap", "garch": "GARCH(1,1)-t"}

_FEATURE_NAMES = ("log open/prev close", "log high/prev close", "log low/prev close", "log close/prev close",
                  "log1p volume")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def format_probe_table(probes: dict[str, Any]) -> str:
    """The Markdown table of the probe results (4 decimals)."""
    lines = ["| features | dim | hold-out R² | direction accuracy | ridge α | logistic L2 |",
             "|---|---|---|---|---|---|"]
    for r in probes["results"]:
        lines.append(f"| {r['features']} | {r['dim']} | {r['r2']:.4f} | {r['accuracy']:.4f} | "
                     f"{r['ridge_alpha']:g} | {r['logistic_l2']:g} |")
    lines.append(f"| majority direction of the training window | – | – | {probes['majority_accuracy']:.4f} | – | – |")
    return "\n".join(lines)


def format_forecast_table(forecast: dict[str, Any]) -> str:
    """Markdown table per horizon: CRPS and energy score (×10⁴, log-return units), coverage, DM test vs cambium."""
    lines = ["| horizon | method | CRPS ×1e4 | energy ×1e4 | cover 50 % | cover 90 % | DM stat (cambium − it) | "
             "p-value |", "|---|---|---|---|---|---|---|---|"]
    for h, block in sorted(forecast["horizons"].items(), key=lambda kv: int(kv[0])):
        for name in sorted(block["methods"], key=lambda n: list(METHOD_NAMES).index(n)):
            m, dm = block["methods"][name], block.get("dm", {}).get(name)
            test = f"{dm['stat']:+.2f} | {dm['p_value']:.3g}" if dm else "– | –"
            lines.append(f"| {h} | {METHOD_NAMES.get(name, name)} | {m['crps'] * 1e4:.3f} | {m['energy'] * 1e4:.3f} | "
                         f"{m['coverage50']:.3f} | {m['coverage90']:.3f} | {test} |")
    return "\n".join(lines)


def _forecast_verdict(forecast: dict[str, Any]) -> str:
    out = []
    for h, block in sorted(forecast["horizons"].items(), key=lambda kv: int(kv[0])):
        me = block["methods"]["cambium"]["crps"]
        parts = []
        for b in ("gbm", "garch"):
            dm = block["dm"][b]
            better = me < block["methods"][b]["crps"]
            sig = dm["p_value"] < 0.05
            parts.append(f"{'beats' if better else 'does **not** beat'} {METHOD_NAMES[b]} "
                         f"({'significant' if sig else 'not significant'} at 5 %, p = {dm['p_value']:.3g})")
        out.append(f"- h = {h} bars: cambium " + "; ".join(parts) + ".")
    return "\n".join(out)


def _fan_charts(pipe: RunArtifacts, paths: np.ndarray, origins: dict[str, Any], k: int, out: Path) -> None:
    plt = _plt()
    segments = [cs.series for cs in pipe.coded()]
    gen = np.random.default_rng(pipe.cfg.pipeline.seed * 100 + 53)
    pick = np.sort(gen.choice(paths.shape[0], size=min(k, paths.shape[0]), replace=False))
    hist = 48
    fig, axes = plt.subplots(1, len(pick), figsize=(4 * len(pick), 3), squeeze=False)
    for ax, i in zip(axes[0], pick, strict=True):
        s = segments[origins["segment"][i]]
        e = int(origins["end_bar"][i])
        close = s.ohlcv[:, 3].double().numpy()
        h = paths.shape[2]
        prices = close[e] * np.exp(np.cumsum(paths[i].astype(np.float64), axis=1))  # [N, h]
        x = np.arange(1, h + 1)
        for lo, hi, alpha in ((5, 95, 0.2), (25, 75, 0.35)):
            ax.fill_between(x, np.percentile(prices, lo, axis=0), np.percentile(prices, hi, axis=0),
                            color="tab:blue", alpha=alpha, linewidth=0, label=f"{lo}–{hi} %")
        ax.plot(x, np.median(prices, axis=0), color="tab:blue", linewidth=1, label="median")
        a = max(0, e - hist + 1)
        ax.plot(np.arange(a - e, 1), close[a : e + 1], color="black", linewidth=1)
        ax.plot(np.arange(0, h + 1), close[e : e + h + 1], color="tab:red", linewidth=1, label="realised")
        ax.axvline(0, color="grey", linewidth=0.5)
        ax.set_title(f"{s.name} {_day(int(origins['origin_ms'][i]))}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Sampled futures (fan: quantiles of N paths) against realised prices, hold-out", fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.98, top=0.82, bottom=0.12, wspace=0.3)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _pit(forecast: dict[str, Any], out: Path) -> None:
    plt = _plt()
    blocks = sorted(forecast["horizons"].items(), key=lambda kv: int(kv[0]))
    fig, axes = plt.subplots(1, len(blocks), figsize=(4 * len(blocks), 2.8), squeeze=False)
    for ax, (h, block) in zip(axes[0], blocks, strict=True):
        for name, color in (("cambium", "tab:blue"), ("garch", "tab:orange")):
            counts = np.asarray(block["methods"][name]["pit_hist"], dtype=float)
            edges = np.linspace(0, 1, len(counts) + 1)
            ax.stairs(counts / counts.sum() * len(counts), edges, color=color, label=METHOD_NAMES[name])
        ax.axhline(1.0, color="grey", linewidth=0.5, linestyle="--")
        ax.set_title(f"PIT, h = {h} bars", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.85, bottom=0.12, wspace=0.25)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _verdict(probes: dict[str, Any]) -> str:
    by = {r["features"]: r for r in probes["results"]}
    lat, raw = by["latent"], by["raw"]
    r2 = "higher" if lat["r2"] > raw["r2"] else "not higher"
    acc = "higher" if lat["accuracy"] > raw["accuracy"] else "not higher"
    beats = lat["r2"] > raw["r2"] and lat["accuracy"] > raw["accuracy"]
    base = probes["majority_accuracy"]
    return (f"The latents' hold-out R² ({lat['r2']:.4f}) is {r2} than the raw features' ({raw['r2']:.4f}) and their "
            f"direction accuracy ({lat['accuracy']:.4f}) is {acc} than the raw features' ({raw['accuracy']:.4f}); "
            f"always predicting the training window's majority direction gives {base:.4f}. "
            + ("On this hold-out the latents beat the raw features on both probes."
               if beats else "On this hold-out the latents do **not** beat the raw features on both probes.")
            + (" An R² at or below 0 means the probe predicts next-hour returns no better than their hold-out mean."
               if max(lat["r2"], raw["r2"]) <= 0 else ""))


def _reconstructions(pipe: RunArtifacts, model: WorldModelJEPA, split: Split, out: Path) -> None:
    plt = _plt()
    cfg = pipe.cfg
    patch = cfg.tokenizer.patch_length
    segments, _ = pipe.segments()
    hold = holdout_part(segments, split, patch) or segments
    gen = torch.Generator().manual_seed(cfg.pipeline.seed * 100 + 51)
    k = cfg.evaluation.report_examples
    batch: CandleBatch = sample_windows(hold, patch, k, gen)
    with torch.no_grad():
        res = model.tokenizer(batch.ohlcv)
    fig, axes = plt.subplots(k, 2, figsize=(10, 2.2 * k), squeeze=False)
    for i in range(k):
        for j, ch in enumerate((3, 4)):
            ax = axes[i][j]
            ax.plot(res.target[i, 0, :, ch].numpy(), label="target", color="black")
            ax.plot(res.recon[i, 0, :, ch].numpy(), label="reconstruction", color="tab:orange", linestyle="--")
            ax.set_title(f"code {int(res.indices[i, 0])}: {_FEATURE_NAMES[ch]}", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Strate I on hold-out patches (RevIN + SymLog space)", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.9, bottom=0.05, hspace=0.6, wspace=0.15)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _codebook(coded: list[CodedSeries], size: int, out: Path) -> None:
    plt = _plt()
    counts = np.bincount(torch.cat([c.codes for c in coded]).numpy(), minlength=size)
    order = np.sort(counts)[::-1]
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.fill_between(np.arange(size), order, step="post", color="tab:blue", linewidth=0)
    ax.set_xlabel(f"codes sorted by frequency ({int((counts > 0).sum())} of {size} used)")
    ax.set_ylabel("patches")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title("Codebook usage over all pretokenized patches", fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.88, bottom=0.18)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _curves(metrics_path: Path, out: Path) -> None:
    plt = _plt()
    names = ("tokenizer/loss", "tokenizer/holdout_loss", "jepa/loss", "jepa/holdout_loss", "flow/loss",
             "flow/holdout_loss")
    rows = read_metrics(metrics_path, [*names, "flow/holdout_cfm", "flow/holdout_nll"])
    holdout: dict[int, float] = {}
    for r in rows:
        if r.name in ("flow/holdout_cfm", "flow/holdout_nll"):
            holdout[r.step] = holdout.get(r.step, 0.0) + r.value
    fig, axes = plt.subplots(1, 3, figsize=(14, 3))
    for ax, phase in zip(axes, ("tokenizer", "jepa", "flow"), strict=True):
        for name, label, style in ((f"{phase}/loss", "training batches", "-"),
                                   (f"{phase}/holdout_loss", "hold-out windows", "o--")):
            pts = ([(r.step, r.value) for r in rows if r.name == name] if name != "flow/holdout_loss"
                   else sorted(holdout.items()))
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label, markersize=3)
        ax.set_title(f"{phase} loss", fontsize=9)
        ax.set_xlabel("pipeline step")
        ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.88, bottom=0.18, wspace=0.25)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def write_report(pipe: RunArtifacts, model: WorldModelJEPA, coded: list[CodedSeries], split: Split,
                 probes: dict[str, Any], forecast: dict[str, Any]) -> Path:
    """Write report.md and its PNGs into `<run>/report/`; returns the path of report.md."""
    out = pipe.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    _reconstructions(pipe, model, split, out / "reconstructions.png")
    _codebook(coded, model.tokenizer.codebook_size, out / "codebook_usage.png")
    _curves(pipe.metrics_path, out / "training_curves.png")
    paths, origins = pipe.futures()
    _fan_charts(pipe, paths, origins, pipe.cfg.forecast.fan_charts, out / "fan_charts.png")
    _pit(forecast, out / "pit.png")
    latest: dict[str, float] = {}
    for r in read_metrics(pipe.metrics_path):
        latest[r.name] = r.value
    info = json.loads((pipe.run_dir / "data" / "import.json").read_text(encoding="utf-8"))
    cfg = pipe.cfg

    def m(name: str, fmt: str = ".4f") -> str:
        return format(latest[name], fmt) if name in latest else "n/a"

    text = f"""# worldmodel pipeline report — run {pipe.run_id}

Config size `{cfg.size}`, seed {cfg.pipeline.seed}. Every number below comes from this run's files; probe numbers are in
`probe.json` at full precision.

## Data (phase 1)
{len(info['symbols'])} symbols, {int(latest.get('import/rows', 0))} bars ({info['interval']}, market {info['market']}),
{info['segments']} contiguous segments, {int(latest.get('import/gaps', 0))} gaps,
{len(info['rejected'])} files rejected.
Training window: bars before {_day(split.split_ms)} UTC ({int(latest.get('import/train_bars', 0))} bars);
embargo {cfg.evaluation.embargo_bars} bars; hold-out window: bars from {_day(split.holdout_ms)} UTC to
{_day(split.last_ms)} UTC ({int(latest.get('import/holdout_bars', 0))} bars). Both models were trained on the
training window only.

## Strate I — FSQ tokenizer (phases 2–3)
Levels {list(cfg.tokenizer.fsq_levels)} = {model.tokenizer.codebook_size} codes, patches of
{cfg.tokenizer.patch_length} bars, {cfg.train_tokenizer.steps} steps. Final training loss {m('tokenizer/loss')},
hold-out reconstruction loss {m('tokenizer/holdout_loss')} (Huber, normalised SymLog space).

| window | patches | codebook usage | perplexity |
|---|---|---|---|
| training | {m('pretokenize/patches/train', '.0f')} | {m('tokenizer/codebook_usage/train')} | \
{m('tokenizer/perplexity/train', '.1f')} |
| hold-out | {m('pretokenize/patches/holdout', '.0f')} | {m('tokenizer/codebook_usage/holdout')} | \
{m('tokenizer/perplexity/holdout', '.1f')} |
| all | {m('pretokenize/patches/all', '.0f')} | {m('tokenizer/codebook_usage/all')} | \
{m('tokenizer/perplexity/all', '.1f')} |

Usage is bounded by the number of patches: a window with fewer patches than codes cannot use them all.

![reconstructions](reconstructions.png)

![codebook usage](codebook_usage.png)

## Strate II — Mamba-2 JEPA (phase 4)
{cfg.train_jepa.steps} steps on windows of {cfg.jepa.seq_len} pretokenized training codes; final loss
{m('jepa/loss')} (invariance {m('jepa/invariance')}, variance {m('jepa/variance')}, covariance
{m('jepa/covariance')}).

![training curves](training_curves.png)

## Linear probes of next-hour returns (phase 5, WM-7)
{probes['n_train']} training anchors, {probes['n_holdout']} hold-out anchors (one per patch of 16 bars with a full
window of {cfg.jepa.seq_len} patches). Features standardised with training-window statistics; penalties chosen on the
latest {cfg.evaluation.validation_fraction:.0%} of training anchors; scored once on the hold-out.
`latent` = the JEPA target encoder's last-position latent; `raw` = the patch's per-bar features and clock features
(what the model sees at that position).

{format_probe_table(probes)}

{_verdict(probes)}

## Strate III — OT-CFM latent futures (phases 5–6)
{cfg.train_flow.steps} steps on the training anchors (flow-matching loss
{m('flow/cfm')}, return-head NLL {m('flow/nll')}, Student-t degrees of freedom {m('flow/df', '.2f')}). At each of
{forecast['n_origins']} hold-out origins ({forecast['n_symbols']} symbols, one per patch of
{cfg.tokenizer.patch_length} bars) {forecast['n_futures']} latent futures were sampled ({cfg.forecast.sampler},
{cfg.forecast.ode_steps} steps) and decoded into return paths.

## Forecast evaluation (phase 7, WM-7)
Scores of the cumulative log return over h bars (CRPS, coverage of the central intervals) and of the h-bar path
(energy score), pooled over every hold-out origin; every method draws {forecast['n_futures']} paths from data up to
the origin only. GARCH(1,1)-t was fitted {forecast['garch_fits']} times (training window, then every
{cfg.forecast.garch_refit_bars} hold-out bars). DM: Diebold–Mariano on the CRPS differential averaged over symbols
per origin time, Newey–West variance; a negative statistic means cambium's CRPS is lower. Per-symbol numbers are in
`forecast.json`.

{format_forecast_table(forecast)}

{_forecast_verdict(forecast)}

![fan charts](fan_charts.png)

![PIT histograms](pit.png)
"""
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


_SCALING = {"none": "unscaled", "convergence": "scaled by the Multiverse convergence of the bar",
            "convergence_rank": "scaled by the rank of the bar's Multiverse convergence among the training bars'"}


def _policy_label(name: str) -> str:
    return {"buy_and_hold": "buy-and-hold", "momentum": "time-series momentum", "random": "random policy"}.get(
        name, name)


def format_backtest_table(figures: dict[str, Any]) -> str:
    """Markdown table: per policy the after-fee figures, the Sharpe's bootstrap interval and the bias check."""
    level = figures["bootstrap"]["confidence"]
    lines = [f"| policy | Sharpe | {level:.0%} CI | Sortino | max drawdown | annual return | turnover / yr | "
             "ρ with B&H | β | long / short share | flags |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in figures["policies"].items():
        ci, b = figures["bootstrap"]["sharpe"][name], f["bias"]
        lines.append(f"| {_policy_label(name)} | {f['sharpe']:+.3f} | [{ci['low']:+.2f}, {ci['high']:+.2f}] | "
                     f"{f['sortino']:+.3f} | {f['max_drawdown']:.1%} | {f['annual_return']:+.1%} | "
                     f"{f['turnover']:.1f} | {b['corr']:+.3f} | {b['beta']:+.3f} | "
                     f"{b['long_share']:.2f} / {b['short_share']:.2f} | {', '.join(b['flags']) or '–'} |")
    return "\n".join(lines)


def _backtest_verdict(figures: dict[str, Any]) -> str:
    boot = figures["bootstrap"]
    level = boot["confidence"]
    agents = [n for n in figures["policies"] if n not in BASELINES and not n.endswith(UNSCALED)]
    out = []
    for a in agents:
        parts = []
        for key, d in boot["difference"].items():
            if not key.startswith(f"{a} - "):
                continue
            other = key[len(a) + 3:]
            where = ("above" if d["low"] > 0 else "below" if d["high"] < 0 else "not separated from")
            parts.append(f"{_policy_label(other)}: Sharpe difference {level:.0%} CI [{d['low']:+.2f}, "
                         f"{d['high']:+.2f}] — {where} it")
        out.append(f"- **{a}**: " + "; ".join(parts) + ".")
        flags = figures["policies"][a]["bias"]["flags"]
        out.append(f"  Bias check: {'flagged: ' + ', '.join(flags) if flags else 'not flagged'}.")
        if a + UNSCALED in figures["policies"]:
            d = boot["difference"].get(f"{a} - {a + UNSCALED}")
            s1, s0 = figures["policies"][a]["sharpe"], figures["policies"][a + UNSCALED]["sharpe"]
            helped = "raised" if s1 > s0 else "did **not** raise"
            sig = (f" (difference {level:.0%} CI [{d['low']:+.4f}, {d['high']:+.4f}]: "
                   f"{'excludes' if d['low'] > 0 or d['high'] < 0 else 'includes'} 0)") if d else ""
            out.append(f"  Multiverse scaling {helped} the Sharpe ({s0:+.4f} → {s1:+.4f}){sig}.")
        beats = all(boot["difference"][f"{a} - {b}"]["low"] > 0 for b in ("buy_and_hold", "momentum"))
        out.append(f"  Goal (CI above buy-and-hold and momentum): {'met' if beats else '**not met**'}.")
    return "\n".join(out)


def _equity_curves(result: BacktestResult, out: Path) -> None:
    plt = _plt()
    days = (result.times - result.times[0]) / 86_400_000
    fig, ax = plt.subplots(figsize=(10, 4))
    for name, r in result.returns.items():
        style = "--" if name in BASELINES else "-"
        ax.plot(days, np.cumsum(np.log1p(r)), style, linewidth=1, label=_policy_label(name))
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel(f"days since {_day(int(result.times[0]))} UTC")
    ax.set_ylabel("log equity (equal-weight portfolio)")
    ax.set_title("Hold-out equity after fees, slippage and funding", fontsize=10)
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.14)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _position_histograms(result: BacktestResult, out: Path) -> None:
    plt = _plt()
    names = [n for n in result.positions if n not in BASELINES] + ["momentum", "random"]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        p = result.positions[name]
        ax.hist(p, bins=np.linspace(-1, 1, 21), weights=np.full(len(p), 1.0 / max(len(p), 1)), color="tab:blue")
        ax.set_title(_policy_label(name), fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle("Positions held on hold-out bars (share of bars per bin)", fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.88, bottom=0.08, wspace=0.3, hspace=0.5)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def write_backtest_report(pipe: RunArtifacts, result: BacktestResult) -> Path:
    """The agents' section of report.md (replacing an earlier one) with equity curves and position histograms."""
    out = pipe.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    _equity_curves(result, out / "equity_curves.png")
    _position_histograms(result, out / "positions.png")
    f, cfg = result.figures, pipe.cfg
    env = cfg.env
    fee = env.taker_fee if env.order_type == "taker" else env.maker_fee
    slip = {"range": f"{env.range_fraction:g} × the decision bar's (high − low) / close",
            "spread": f"a half spread of {env.half_spread_bps:g} bp", "none": "none"}[env.slippage]
    missing = f.get("funding_missing_bars", {})
    text = AGENTS_MARKER + f"""
{len(f['segments'])} hold-out segments ({', '.join(f['segments'])}) pooled into one equal-weight portfolio of
{f['portfolio_bars']} bars, after fees ({env.order_type}, {fee:.4%} per unit traded), slippage ({slip}) and funding
(bars outside the funding history: {sum(missing.values())}, charged 0 — `env.missing_funding =
"{env.missing_funding}"`).
Agents trained on the training window only ({', '.join(cfg.agents.kinds)}); positions
{_SCALING[cfg.agents.scaling]}. Sharpe and
Sortino annualised with {f['bars_per_year']:.0f} bars a year; intervals: stationary block bootstrap,
{f['bootstrap']['samples']} resamples, mean block {f['bootstrap']['block_bars']:g} bars, shared by all policies.
Bias check: |ρ| ≥ {cfg.backtest.mirror_corr:g} with buy-and-hold's returns, or ≥ {cfg.backtest.one_side_share:.0%} of
bars on one side, is flagged. Figures at full precision: `backtest.json`.

{format_backtest_table(f)}

{_backtest_verdict(f)}

![equity curves](equity_curves.png)

![positions](positions.png)
"""
    path = out / "report.md"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(old.split(AGENTS_MARKER)[0].rstrip("\n") + "\n" + text, encoding="utf-8")
    return path
