"""`cambium screener train` (SCR-3): LightGBM per horizon and profile plus a p_toxic model, calibrated, evaluated.

For every label the source can tell (`training_data.py`):

1. the held-out split (`cv.holdout_split`: the last `holdout_fraction` of each symbol's span, after a purge of the
   label horizon and an embargo) is set aside for the report;
2. purged, embargoed k-fold CV (`cv.purged_folds`) over the training rows gives out-of-fold predictions, on which
   the isotonic and the Platt map are fitted (never on rows their model saw);
3. the final LightGBM is fitted on every training row;
4. on the held-out rows: the heuristic baseline, a logistic regression on the same features, and LightGBM raw,
   isotonic and Platt are scored (`evaluation.py`), with block-bootstrap CIs of the AUC differences.

Artifacts (`train.out_dir`, replaced): `manifest.json` (feature-schema hash, model and calibration versions, the
active calibration per model, the fallback targets), `<profile>_<target>.lgb.txt` (LightGBM text models), and
`<profile>_<target>.isotonic.json` / `.platt.json` (the two calibration maps, separate files). p_toxic does not
depend on the profile: one model, listed under both. The run is registered (`runs/<run_id>/`: config, provenance,
`report.md`, `report-reliability.png`, `summary.json`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from cambium.core.errors import DataError
from cambium.core.progress import progress
from cambium.core.runs import create_run
from cambium.screener.calibration import Calibrator, fit_isotonic, fit_platt, reliability
from cambium.screener.config import LightGBMConfig, ScreenerConfig
from cambium.screener.cv import holdout_split, purged_folds
from cambium.screener.evaluation import TargetReport, auc_diff_ci, metrics, write_report
from cambium.screener.labels import HORIZONS, TOXIC_HORIZON_MS
from cambium.screener.model_runner import MANIFEST_FORMAT, TARGETS
from cambium.screener.schema import FEATURE_SCHEMA_HASH, feature_names
from cambium.screener.training_data import TrainingSet, load_klines, load_ticks

__all__ = ["TrainResult", "fit_lightgbm", "load_training_set", "train"]

_NAMES = feature_names()
PROFILES = ("A", "B")
MIN_CLASS_ROWS = 5
"""Fewest rows of each class in the training and held-out rows for a target to be trained and evaluated."""


def _class_counts(y: np.ndarray) -> tuple[int, int]:
    pos = int(np.sum(y == 1.0))
    return pos, int(y.size - pos)


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    out_dir: Path
    report: Path
    reports: list[TargetReport]
    unlabelled: tuple[str, ...]
    skipped: dict[str, str]
    """Labellable targets left to the heuristic, with why (too few rows of a class, ...)."""


def fit_lightgbm(x: np.ndarray, y: np.ndarray, cfg: LightGBMConfig, seed: int) -> Any:
    import lightgbm

    params = {"objective": "binary", "learning_rate": cfg.learning_rate, "num_leaves": cfg.num_leaves,
              "min_child_samples": cfg.min_child_samples, "feature_fraction": cfg.feature_fraction,
              "num_threads": cfg.num_threads, "seed": seed, "deterministic": True, "force_row_wise": True,
              "verbosity": -1}
    return lightgbm.train(params, lightgbm.Dataset(x, label=y, free_raw_data=True), num_boost_round=cfg.n_estimators)


def _logistic(x_train: np.ndarray, y_train: np.ndarray) -> Any:
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # a column empty in the training rows (5 m features in a short capture) is kept, filled with 0
    return make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                         LogisticRegression(max_iter=1000)).fit(x_train, y_train)


def load_training_set(cfg: ScreenerConfig) -> TrainingSet:
    t = cfg.train
    paths = [Path(p) for p in t.data]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"train.data names files that do not exist: {missing}")
    if t.source == "klines":
        folders = [str(p) for p in paths if p.is_dir()]
        if folders:
            raise DataError(f"train.source=klines reads kline files, but train.data names directories {folders}; "
                            f"for recordings or aggTrades/bookTicker archive days set train.source=ticks")
        return load_klines(paths, t.kline_spread_bps, t.kline_impact_bps, cfg.model.baseline, t.max_rows_per_file)
    return load_ticks(paths, cfg.features, cfg.model.baseline)


def _horizon(key: str) -> int:
    return TOXIC_HORIZON_MS if key == "p_toxic" else HORIZONS[key.split("/")[1]]


def _file_stem(key: str) -> str:
    return key.replace("/", "_")


def train(cfg: ScreenerConfig, runs_root: str | Path = "runs", *, name: str = "train",
          show_progress: bool = True) -> TrainResult:
    """Fit, calibrate and evaluate every labellable target; write the artifacts and the report (see the module)."""
    t = cfg.train
    ds = load_training_set(cfg)
    cols = np.array([_NAMES.index(f) for f in ds.features])
    x = ds.x[:, cols]
    block_ids = np.unique(np.char.add(ds.symbol.astype(str), (ds.ts // t.bootstrap_block_ms).astype(str)),
                          return_inverse=True)[1]
    rng = np.random.default_rng(t.seed)
    run = create_run(runs_root, system="screener", name=name, config=cfg, seed=t.seed, data_files=ds.files)
    out_dir = Path(t.out_dir)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    reports: list[TargetReport] = []
    specs: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    with run, progress("screener train", total=len(ds.labels) * (t.cv_folds + 1), unit="fit",
                       tty=None if show_progress else False) as bar, contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, staging, ignore_errors=True)  # a failed run leaves no half-written models
        for key, label in ds.labels.items():
            ok = np.isfinite(label)
            try:
                train_rows, test_rows = holdout_split(ds.ts[ok], ds.symbol[ok], t.holdout_fraction, _horizon(key),
                                                      t.embargo_ms)
            except DataError as exc:
                skipped[key] = str(exc)
                bar.advance(t.cv_folds + 1)
                continue
            tr, te = np.flatnonzero(ok)[train_rows], np.flatnonzero(ok)[test_rows]
            y_tr, y_te = label[tr], label[te]
            if min(_class_counts(y_tr)) < MIN_CLASS_ROWS or min(_class_counts(y_te)) < MIN_CLASS_ROWS:
                skipped[key] = (f"too few labelled rows of a class: training (positive, negative) "
                                f"{_class_counts(y_tr)}, held-out {_class_counts(y_te)}; each needs "
                                f"{MIN_CLASS_ROWS}")
                bar.advance(t.cv_folds + 1)
                continue
            oof = np.full(tr.size, np.nan)
            cv_auc = []
            for f_train, f_test in purged_folds(ds.ts[tr], ds.symbol[tr], t.cv_folds, _horizon(key), t.embargo_ms):
                bar.set(target=key)
                if np.unique(y_tr[f_train]).size == 2:
                    booster = fit_lightgbm(x[tr[f_train]], y_tr[f_train], t.lightgbm, t.seed)
                    oof[f_test] = booster.predict(x[tr[f_test]])
                    if np.unique(y_tr[f_test]).size == 2:
                        cv_auc.append(metrics(oof[f_test], y_tr[f_test], t.ece_bins)["auc"])
                bar.advance()
            has = np.isfinite(oof)
            if min(_class_counts(y_tr[has])) < MIN_CLASS_ROWS:
                skipped[key] = f"the purged folds left too few out-of-fold predictions to calibrate on: " \
                               f"{_class_counts(y_tr[has])}"
                bar.advance()
                continue
            calibrators: dict[str, Calibrator] = {"isotonic": fit_isotonic(oof[has], y_tr[has]),
                                                  "platt": fit_platt(oof[has], y_tr[has])}
            booster = fit_lightgbm(x[tr], y_tr, t.lightgbm, t.seed)
            bar.advance()
            raw = booster.predict(x[te])
            preds = {"heuristic": ds.heuristic[key][te],
                     "logistic": _logistic(x[tr], y_tr).predict_proba(x[te])[:, 1],
                     "lightgbm raw": raw,
                     "lightgbm + isotonic": calibrators["isotonic"](raw),
                     "lightgbm + platt": calibrators["platt"](raw)}
            if not np.isfinite(preds["heuristic"]).all():
                raise DataError(f"{key}: the heuristic lacks inputs on some held-out rows")
            rep = TargetReport(key, tr.size, te.size, float(y_te.mean()), cv_auc)
            active = f"lightgbm + {t.calibration}"
            for model_name, p in preds.items():
                rep.metrics[model_name] = metrics(p, y_te, t.ece_bins)
                rep.reliability[model_name] = reliability(p, y_te, t.ece_bins)
            for other in ("heuristic", "logistic"):
                rep.auc_diff[other] = auc_diff_ci(preds[active], preds[other], y_te, block_ids[te], t.bootstrap, rng)
            gain = booster.feature_importance(importance_type="gain")
            rep.importance = {f: float(g) for f, g in zip(ds.features, gain, strict=True)}
            reports.append(rep)
            stem = _file_stem(key)
            (staging / f"{stem}.lgb.txt").write_text(booster.model_to_string())
            for kind, cal in calibrators.items():
                (staging / f"{stem}.{kind}.json").write_bytes(msgspec.json.encode(cal))
            specs[key] = {"kind": "lightgbm", "params": {"file": f"{stem}.lgb.txt", "features": list(ds.features),
                                                         "calibration": f"{stem}.{t.calibration}.json"}}
        unlabelled = tuple(target for target in TARGETS if target not in ds.targets)

        def key_of(profile: str, target: str) -> str:
            return "p_toxic" if target == "p_toxic" else f"{profile}/{target}"

        models = {p: {tg: specs[key_of(p, tg)] for tg in ds.targets if key_of(p, tg) in specs} for p in PROFILES}
        fallback = {p: [tg for tg in TARGETS if tg not in models[p]] for p in PROFILES}
        if not specs:
            raise DataError("no target could be trained: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        manifest = {"format": MANIFEST_FORMAT, "feature_schema_hash": FEATURE_SCHEMA_HASH,
                    "feature_names": list(_NAMES), "model_version": f"lgbm-{ds.source}-{run.id}",
                    "calibration_version": f"{t.calibration}-{run.id}", "models": models,
                    "fallback": fallback}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
        facts = {"source": ds.source, "files": ", ".join(str(f) for f in ds.files),
                 "symbols": ", ".join(sorted(set(ds.symbol.tolist()))), "features": ", ".join(ds.features),
                 "labelled targets": ", ".join(ds.targets), "held-out share": f"{t.holdout_fraction} of each span, "
                 f"after a purge of the label horizon and an embargo of {t.embargo_ms / 1000:g} s",
                 "artifacts": str(out_dir), "run": run.id}
        facts |= {f"not trained: {k}": v for k, v in skipped.items()}
        report = run.dir / "report.md"
        write_report(report, reports, title=f"screener train — {ds.source}", facts=facts, unlabelled=unlabelled,
                     active=f"lightgbm + {t.calibration}")
        summary = {r.key: {m: r.metrics[m] for m in r.metrics} | {"auc_diff": r.auc_diff} for r in reports}
        (run.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        run.finish(summary={"targets": len(reports), "artifacts": str(out_dir)})
    return TrainResult(run.id, run.dir, out_dir, report, reports, unlabelled, skipped)
