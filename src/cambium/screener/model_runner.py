"""ModelRunner: FeatureSnapshot → PredictionSnapshot, from trained artifacts or the heuristic baseline.

Artifacts live in a directory with a `manifest.json` (strictly decoded, see `ArtifactManifest`) naming the feature
schema hash they were trained on, their model and calibration versions, and one model per (profile, target). A
manifest whose hash differs from `schema.FEATURE_SCHEMA_HASH` is refused with a DataError naming both hashes. Model
kinds are looked up in `MODEL_KINDS`, which SCR-3 extends (LightGBM + calibration); the one kind shipped now is
`logistic` (coefficients in the manifest, nothing unpickled), enough to exercise the artifact path end to end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

import msgspec
import numpy as np

from cambium.core.errors import DataError
from cambium.screener.baseline import BASELINE_VERSION, baseline_predict
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
    "LogisticModel",
    "ModelRunner",
    "ProbabilityModel",
    "load_artifacts",
]

MANIFEST_FORMAT = "cambium-screener-artifacts/1"
Target = Literal["p_inplay_30s", "p_inplay_2m", "p_inplay_5m", "p_toxic"]
TARGETS: tuple[Target, ...] = ("p_inplay_30s", "p_inplay_2m", "p_inplay_5m", "p_toxic")


class ProbabilityModel(Protocol):
    """A calibrated classifier: `predict(x)` maps features `[N, F]` (schema order, NaN = missing) to `[N]` in [0, 1]."""

    def predict(self, x: np.ndarray) -> np.ndarray: ...


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


class LogisticModel:
    """p = sigmoid(coef · x + intercept); a missing feature contributes 0."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        coef: tuple[float, ...]
        intercept: float

    def __init__(self, coef: np.ndarray, intercept: float) -> None:
        self.coef = coef.astype(np.float64)
        self.intercept = float(intercept)

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = np.nan_to_num(x, nan=0.0) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))


def _load_logistic(params: msgspec.Raw, n_features: int, where: str) -> ProbabilityModel:
    try:
        p = msgspec.json.decode(params, type=LogisticModel.Params)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DataError(f"{where}: bad logistic params: {exc}") from None
    if len(p.coef) != n_features:
        raise DataError(f"{where}: logistic coef has {len(p.coef)} values, the feature schema has {n_features}")
    return LogisticModel(np.asarray(p.coef), p.intercept)


MODEL_KINDS: dict[str, Callable[[msgspec.Raw, int, str], ProbabilityModel]] = {
    "logistic": _load_logistic,
}


class Artifacts:
    """Loaded models keyed by (profile, target), with their versions."""

    def __init__(self, manifest: ArtifactManifest, models: dict[tuple[Profile, Target], ProbabilityModel]) -> None:
        self.manifest = manifest
        self.models = models
        self.model_version = manifest.model_version
        self.calibration_version = manifest.calibration_version


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
        missing = [t for t in TARGETS if t not in targets]
        if missing:
            raise DataError(f"{path}: profile {profile} lacks models for {missing}")
        for target, spec in targets.items():
            loader = MODEL_KINDS.get(spec.kind)
            where = f"{path}: models.{profile}.{target}"
            if loader is None:
                raise DataError(f"{where}: unknown kind {spec.kind!r} (known: {sorted(MODEL_KINDS)})")
            models[(profile, target)] = loader(spec.params, len(FEATURE_SCHEMA), where)
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
        profile = profile or self.scorer.cfg.profile
        base = baseline_predict(snap, profile, self.cfg.baseline)
        p30, p2m, p5m = base.p_inplay
        p_toxic = base.p_toxic
        calibration = "none"
        reasons = base.reasons
        if self.artifacts is not None and not any(r.startswith("MISSING_FEATURE:") for r in reasons):
            if (profile, "p_inplay_2m") not in self.artifacts.models:
                raise DataError(f"artifacts {self.model_version} have no models for profile {profile}")
            x = feature_vector([snap])
            out = {t: float(self.artifacts.models[(profile, t)].predict(x)[0]) for t in TARGETS}
            for target, value in out.items():
                if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                    raise DataError(f"model {self.model_version} {profile}/{target} returned {value!r} for "
                                    f"{snap.symbol} at ts={snap.ts}; expected a probability")
            p30, p2m, p5m, p_toxic = out["p_inplay_30s"], out["p_inplay_2m"], out["p_inplay_5m"], out["p_toxic"]
            calibration = self.artifacts.calibration_version
        utility = base.expected_utility_bps_2m
        score = self.scorer.score_of(p30, p2m, p5m, utility, p_toxic)
        status, reasons = self.scorer.classify(score, p2m, utility, p_toxic, snap.data_health, reasons)
        return PredictionSnapshot(
            ts=snap.ts, symbol=snap.symbol, profile=profile, p_inplay_30s=p30, p_inplay_2m=p2m, p_inplay_5m=p5m,
            expected_utility_bps_2m=utility, p_toxic=p_toxic, status=status, reasons=reasons,
            model_version=self.model_version, calibration_version=calibration, data_health=snap.data_health,
        )
