"""ModelRunner: FeatureSnapshot → PredictionSnapshot, from trained artifacts or the heuristic baseline.

Artifacts live in a directory with a `manifest.json` (strictly decoded, see `ArtifactManifest`) naming the feature
schema hash they were trained on, their model and calibration versions, and one model per (profile, target). A
manifest whose hash differs from `schema.FEATURE_SCHEMA_HASH` is refused with a DataError naming both hashes. Model
kinds are looked up in `MODEL_KINDS`: `logistic` (coefficients in the manifest) and `lightgbm` (a LightGBM text model
file, the columns it reads, and a calibration file; `cambium screener train` writes them). Nothing is unpickled.
Targets the training data could not label (30 s and p_toxic from 1 m klines) are listed under `fallback`: the
heuristic predicts them, and model_version says so.

Models follow scikit-learn's protocol: `predict_proba(x)` returns `[N, 2]` class probabilities (a classifier whose
`predict` returns 0/1 labels cannot slip through as probabilities); the runner checks the shape, the range and that
rows sum to 1. `predict_batch` predicts every snapshot of a tick with one call per (profile, target).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec
import numpy as np

from cambium.core.errors import DataError
from cambium.screener.baseline import BASELINE_VERSION, baseline_predict
from cambium.screener.calibration import Calibrator, decode_calibrator
from cambium.screener.config import ModelConfig
from cambium.screener.contracts import FeatureSnapshot, PredictionSnapshot, Profile
from cambium.screener.schema import FEATURE_SCHEMA, FEATURE_SCHEMA_HASH, feature_names, feature_vector
from cambium.screener.scorer import Scorer

__all__ = [
    "MANIFEST_FORMAT",
    "MODEL_KINDS",
    "TARGETS",
    "ArtifactManifest",
    "Artifacts",
    "LightGBMModel",
    "LogisticModel",
    "ModelRunner",
    "ProbabilityModel",
    "load_artifacts",
]

MANIFEST_FORMAT = "cambium-screener-artifacts/1"
Target = Literal["p_inplay_30s", "p_inplay_2m", "p_inplay_5m", "p_toxic"]
TARGETS: tuple[Target, ...] = ("p_inplay_30s", "p_inplay_2m", "p_inplay_5m", "p_toxic")


class ProbabilityModel(Protocol):
    """A calibrated binary classifier, scikit-learn style: `predict_proba(x)` maps features `[N, F]` (schema order,
    NaN = missing) to `[N, 2]` probabilities of (negative, positive)."""

    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...


def _two_columns(p1: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - p1, p1], axis=1)


class ModelSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: str
    params: msgspec.Raw


class ArtifactManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str
    feature_schema_hash: str
    feature_names: tuple[str, ...]
    model_version: str
    calibration_version: str
    models: dict[Profile, dict[Target, ModelSpec]]
    fallback: dict[Profile, tuple[Target, ...]] = {}
    """Per profile, the targets the heuristic predicts (the training data could not label them, or held too few
    rows of a class to train and evaluate them)."""


class LogisticModel:
    """p = sigmoid(coef · x + intercept); a missing feature contributes 0."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        coef: tuple[float, ...]
        intercept: float

    def __init__(self, coef: np.ndarray, intercept: float) -> None:
        self.coef = coef.astype(np.float64)
        self.intercept = float(intercept)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = np.nan_to_num(x, nan=0.0) @ self.coef + self.intercept
        return _two_columns(1.0 / (1.0 + np.exp(-z)))


class LightGBMModel:
    """A LightGBM binary booster reading the schema columns `columns`, its raw probability mapped by `calibrator`."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        file: str
        features: tuple[str, ...]
        calibration: str

    def __init__(self, booster: Any, columns: np.ndarray, calibrator: Calibrator) -> None:
        self.booster, self.columns, self.calibrator = booster, columns, calibrator

    def raw(self, x: np.ndarray) -> np.ndarray:
        """Uncalibrated P(positive) `[N]`."""
        return np.asarray(self.booster.predict(x[:, self.columns]), dtype=np.float64)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _two_columns(np.clip(self.calibrator(self.raw(x)), 0.0, 1.0))


def _inside(directory: Path, name: str, where: str) -> Path:
    path = (directory / name).resolve()
    if directory.resolve() not in path.parents or not path.is_file():
        raise DataError(f"{where}: {name!r} is not a file inside {directory}")
    return path


def _load_logistic(params: msgspec.Raw, directory: Path, where: str) -> ProbabilityModel:
    try:
        p = msgspec.json.decode(params, type=LogisticModel.Params)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DataError(f"{where}: bad logistic params: {exc}") from None
    n_features = len(FEATURE_SCHEMA)
    if len(p.coef) != n_features:
        raise DataError(f"{where}: logistic coef has {len(p.coef)} values, the feature schema has {n_features}")
    return LogisticModel(np.asarray(p.coef), p.intercept)


def _load_lightgbm(params: msgspec.Raw, directory: Path, where: str) -> ProbabilityModel:
    import lightgbm

    try:
        p = msgspec.json.decode(params, type=LightGBMModel.Params)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DataError(f"{where}: bad lightgbm params: {exc}") from None
    names = feature_names()
    unknown = [f for f in p.features if f not in names]
    if unknown or not p.features:
        raise DataError(f"{where}: features {list(p.features)} must be a non-empty subset of the schema "
                        f"(unknown: {unknown})")
    model_path = _inside(directory, p.file, where)
    try:
        booster = lightgbm.Booster(model_str=model_path.read_text())
    except (lightgbm.basic.LightGBMError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{where}: {model_path} is not a LightGBM model: {exc}") from None
    if booster.num_feature() != len(p.features):
        raise DataError(f"{where}: {model_path} reads {booster.num_feature()} features, params list "
                        f"{len(p.features)}")
    calibrator = decode_calibrator(_inside(directory, p.calibration, where).read_bytes(), f"{where}.calibration")
    return LightGBMModel(booster, np.array([names.index(f) for f in p.features]), calibrator)


MODEL_KINDS: dict[str, Callable[[msgspec.Raw, Path, str], ProbabilityModel]] = {
    "logistic": _load_logistic,
    "lightgbm": _load_lightgbm,
}


class Artifacts:
    """Loaded models keyed by (profile, target), with their versions."""

    def __init__(self, manifest: ArtifactManifest, models: dict[tuple[Profile, Target], ProbabilityModel]) -> None:
        self.manifest = manifest
        self.models = models
        self.calibration_version = manifest.calibration_version
        fallback = ";".join(f"{p}:{','.join(ts)}" for p, ts in sorted(manifest.fallback.items()) if ts)
        self.model_version = manifest.model_version + (f"+{BASELINE_VERSION}({fallback})" if fallback else "")


def load_artifacts(directory: str | Path, expected_hash: str = FEATURE_SCHEMA_HASH) -> Artifacts:
    """Read `<directory>/manifest.json` and its models; DataError on any mismatch (names the file and the rule)."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist; train artifacts with `cambium screener train` or unset "
                        "model.artifacts_dir to use the baseline")
    try:
        manifest = msgspec.json.decode(path.read_bytes(), type=ArtifactManifest)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DataError(f"{path}: invalid manifest: {exc}") from None
    if manifest.format != MANIFEST_FORMAT:
        raise DataError(f"{path}: format={manifest.format!r}, this code reads {MANIFEST_FORMAT!r}")
    if manifest.feature_schema_hash != expected_hash:
        raise DataError(
            f"{path}: artifact feature_schema_hash={manifest.feature_schema_hash} does not match the code's "
            f"feature schema hash {expected_hash}; retrain the artifacts for this feature schema"
        )
    if manifest.feature_names != feature_names():
        raise DataError(f"{path}: feature_names differ from the code's schema although the hash matches")
    models: dict[tuple[Profile, Target], ProbabilityModel] = {}
    for profile, targets in manifest.models.items():
        fallback = manifest.fallback.get(profile, ())
        missing = [t for t in TARGETS if t not in targets and t not in fallback]
        if missing:
            raise DataError(f"{path}: profile {profile} lacks models for {missing} (and they are not in fallback)")
        both = [t for t in targets if t in fallback]
        if both:
            raise DataError(f"{path}: profile {profile} has models for {both}, which fallback also lists")
        for target, spec in targets.items():
            loader = MODEL_KINDS.get(spec.kind)
            where = f"{path}: models.{profile}.{target}"
            if loader is None:
                raise DataError(f"{where}: unknown kind {spec.kind!r} (known: {sorted(MODEL_KINDS)})")
            models[(profile, target)] = loader(spec.params, path.parent, where)
    return Artifacts(manifest, models)


class ModelRunner:
    """Predicts one PredictionSnapshot per FeatureSnapshot; status and reasons come from the scorer's rules."""

    def __init__(self, cfg: ModelConfig | None = None, scorer: Scorer | None = None,
                 artifacts: Artifacts | None = None) -> None:
        self.cfg = cfg or ModelConfig()
        self.scorer = scorer or Scorer()
        if artifacts is None and self.cfg.artifacts_dir is not None:
            artifacts = load_artifacts(self.cfg.artifacts_dir)
        self.artifacts = artifacts

    @property
    def model_version(self) -> str:
        return self.artifacts.model_version if self.artifacts else BASELINE_VERSION

    def predict(self, snap: FeatureSnapshot, profile: Profile | None = None) -> PredictionSnapshot:
        return self.predict_batch([snap], profile)[0]

    def predict_batch(self, snaps: Sequence[FeatureSnapshot],
                      profile: Profile | None = None) -> list[PredictionSnapshot]:
        """Every snapshot of a tick: one `predict_proba` call per target over all of them (the heuristic fills the
        fallback targets and the snapshots it marks MISSING_FEATURE)."""
        profile = profile or self.scorer.cfg.profile
        bases = [baseline_predict(snap, profile, self.cfg.baseline) for snap in snaps]
        rows = [i for i, b in enumerate(bases) if not any(r.startswith("MISSING_FEATURE:") for r in b.reasons)]
        learned: dict[Target, np.ndarray] = {}
        if self.artifacts is not None and rows:
            if profile not in self.artifacts.manifest.models:
                raise DataError(f"artifacts {self.model_version} have no models for profile {profile}")
            x = feature_vector([snaps[i] for i in rows])
            for target in TARGETS:
                model = self.artifacts.models.get((profile, target))
                if model is not None:
                    learned[target] = self._positive(model, x, profile, target, [snaps[i] for i in rows])
        out = []
        position = {i: k for k, i in enumerate(rows)}
        for i, (snap, base) in enumerate(zip(snaps, bases, strict=True)):
            p30, p2m, p5m = base.p_inplay
            values = {"p_inplay_30s": p30, "p_inplay_2m": p2m, "p_inplay_5m": p5m, "p_toxic": base.p_toxic}
            calibration = "none"
            k = position.get(i)
            if k is not None and learned:
                values.update({t: float(v[k]) for t, v in learned.items()})
                calibration = self.artifacts.calibration_version if self.artifacts else "none"
            utility = base.expected_utility_bps_2m
            p30, p2m, p5m, p_toxic = (values["p_inplay_30s"], values["p_inplay_2m"], values["p_inplay_5m"],
                                      values["p_toxic"])
            score = self.scorer.score_of(p30, p2m, p5m, utility, p_toxic)
            status, reasons = self.scorer.classify(score, p2m, utility, p_toxic, snap.data_health, base.reasons)
            out.append(PredictionSnapshot(
                ts=snap.ts, symbol=snap.symbol, profile=profile, p_inplay_30s=p30, p_inplay_2m=p2m, p_inplay_5m=p5m,
                expected_utility_bps_2m=utility, p_toxic=p_toxic, status=status, reasons=reasons,
                model_version=self.model_version, calibration_version=calibration, data_health=snap.data_health,
            ))
        return out

    def _positive(self, model: ProbabilityModel, x: np.ndarray, profile: Profile, target: Target,
                  snaps: Sequence[FeatureSnapshot]) -> np.ndarray:
        """P(positive) `[N]` from `predict_proba`, checked: `[N, 2]`, finite, in [0, 1], rows summing to 1."""
        proba = np.asarray(model.predict_proba(x), dtype=np.float64)
        where = f"model {self.model_version} {profile}/{target}"
        if proba.shape != (x.shape[0], 2):
            raise DataError(f"{where}: predict_proba returned shape {proba.shape}, expected ({x.shape[0]}, 2) "
                            "class probabilities")
        ok = np.isfinite(proba).all(axis=1) & (proba >= 0.0).all(axis=1) & (proba <= 1.0).all(axis=1)
        ok &= np.abs(proba.sum(axis=1) - 1.0) <= 1e-6
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise DataError(f"{where} returned {proba[i].tolist()!r} for {snaps[i].symbol} at ts={snaps[i].ts}; "
                            "expected class probabilities in [0, 1] summing to 1")
        return proba[:, 1]
