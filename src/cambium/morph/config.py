"""Config models of morph. `CONFIG_MODEL` is the root loaded from configs/morph/*.toml."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cambium.core.config import RESUME_SAFE, ConfigModel
from cambium.core.loop import LoopConfig

__all__ = [
    "CONFIG_MODEL",
    "BusConfig",
    "CompareConfig",
    "ControllerConfig",
    "DataConfig",
    "LibraryConfig",
    "LifecycleConfig",
    "ModelConfig",
    "MorphConfig",
    "PolicyConfig",
    "SeedsConfig",
    "TrainConfig",
]


class SeedsConfig(ConfigModel):
    """Where seeds go and how their telemetry is taken (MOR-2)."""

    locations: tuple[str, ...] = Field(
        default=(), description="dotted names of host modules a seed slot follows (see wrap.suggest_locations)"
    )
    telemetry_every: int = Field(default=4, ge=1, description="sample telemetry on every n-th training forward")
    dead_threshold: float = Field(default=1e-6, ge=0.0, description="a channel with max |x| below this is dead")
    var_floor: float = Field(default=1e-4, gt=0.0, description="activation variance at which health halves")
    pressure_ref: float = Field(default=1.0, gt=0.0, description="gradient pressure at which health halves")
    confidence_half_samples: float = Field(default=4.0, gt=0.0, description="samples at which confidence is 0.5")


AdaptingState = Literal["TRAINING", "GRAFTING", "STABILIZATION", "EVALUATING", "FINE_TUNING"]
"""The lifecycle states in which the host may be frozen (`LifecycleConfig.freeze_host_in`)."""


class LifecycleConfig(ConfigModel):
    """Durations, gates and safety limits of the seed lifecycle (MOR-3, MOR-4)."""

    training_epochs: int = Field(default=1, ge=1, description="epochs a seed learns its reconstruction target")
    seed_objective: Literal["reconstruction", "gradmax"] = Field(
        default="reconstruction",
        description="what a TRAINING seed learns, its output unused: 'reconstruction' (f(x) ≈ r* = -η·B·∂L/∂x, gate "
        "min_explained) or 'gradmax' (its output op stays zero; the other parameters, held at their initial norm, "
        "climb the GradMax score ‖∇_θout L‖², so the graft starts at f ≡ 0 with the steepest task-loss descent; "
        "gate: a finite, positive score)",
    )
    reconstruction_step: float = Field(default=1.0, gt=0.0, description="η of the target r* = -η·B·∂L/∂x")
    min_explained: float = Field(
        default=0.0, description="TRAINING passes if 1 - mse/mean(r*²) over its last epoch exceeds this"
    )
    graft_steps: int = Field(default=50, ge=1, description="steps over which alpha ramps 0 → 1 in GRAFTING")
    stabilization_epochs: int = Field(default=1, ge=1, description="epochs at alpha = 1 before evaluation")
    fine_tune_epochs: int = Field(default=1, ge=1, description="epochs host and seed train jointly")
    min_delta: float = Field(
        default=0.0, description="EVALUATING passes if val metric (seed on) - (seed off) >= this"
    )
    fine_tune_tolerance: float = Field(
        default=0.01, ge=0.0, description="FINE_TUNING passes if val metric >= evaluated metric - this"
    )
    loss_spike_factor: float = Field(
        default=3.0, gt=1.0, description="a step loss above this × the last good epoch's mean loss rolls back"
    )
    embargo_epochs: int = Field(default=2, ge=0, description="epochs a location is blocked after a failure")
    max_adaptations_per_epoch: int = Field(default=2, ge=0, description="germinations allowed per epoch boundary")
    freeze_host_in: tuple[AdaptingState, ...] = Field(
        default=("TRAINING", "GRAFTING", "STABILIZATION", "EVALUATING"),
        description="while any seed is in one of these states the host's weights and normalisation statistics do not "
        "change (the spec's frozen base). Empty: the host trains on beside its seeds (a live host: TRAINING's "
        "reconstruction target is then taken from the host as it is at each step)",
    )
    seed_lr: float = Field(default=1e-3, gt=0.0, description="Adam learning rate of seed kernels")
    await_compiles: bool = Field(
        default=True,
        description="at a boundary, wait for compilations still in flight (training never waits mid-epoch); "
        "makes transitions independent of thread timing",
    )
    compile_timeout_epochs: int = Field(
        default=3, ge=1, description="a GERMINATED seed whose kernel is not ready after this many epochs is culled"
    )

    @model_validator(mode="after")
    def _check_freeze(self) -> LifecycleConfig:
        if self.freeze_host_in and "TRAINING" not in self.freeze_host_in:
            raise ValueError(
                f"lifecycle.freeze_host_in={list(self.freeze_host_in)} freezes the host for a blended seed but not "
                "for a TRAINING one: list TRAINING too, or nothing (a live host)"
            )
        if len(set(self.freeze_host_in)) != len(self.freeze_host_in):
            raise ValueError(f"lifecycle.freeze_host_in={list(self.freeze_host_in)} lists a state twice")
        return self


class PolicyConfig(ConfigModel):
    """Tamiyo's heuristic policy (MOR-6)."""

    health_threshold: float = Field(default=0.3, ge=0.0, le=1.0, description="adapt where health_score < this")
    confidence_threshold: float = Field(default=0.7, ge=0.0, le=1.0, description="... and confidence > this")
    blueprints_conv: tuple[str, ...] = Field(
        default=("conv_bottleneck", "squeeze_excitation", "attention"),
        description="blueprints tried in order at a [B, C, H, W] location (next one after each failure)",
    )
    blueprints_tokens: tuple[str, ...] = Field(
        default=("low_rank_adapter", "residual_mlp", "attention"),
        description="blueprints tried in order at a [B, T, D] location",
    )
    blueprints_flat: tuple[str, ...] = Field(
        default=("residual_mlp", "low_rank_adapter"), description="blueprints tried in order at a [B, D] location"
    )
    blueprint_choice: Literal["cycle", "gradmax"] = Field(
        default="cycle",
        description="'cycle': the next untried blueprint of the layout's list; 'gradmax': of the library's blueprints "
        "for the location (the list's templates and Karn's mutants of them, compiled and tagged by Urabrask, within "
        "library.max_params, none with an avoided tag), the one whose zero-initialised output gets the largest "
        "task-loss gradient (GradMax), preferred tags first",
    )
    placement: Literal["health", "gradmax"] = Field(
        default="health",
        description="'health': germinate where health < health_threshold, least healthy first; 'gradmax': every "
        "DORMANT location with confidence > confidence_threshold is a candidate, largest GradMax score of its "
        "best blueprint first (needs blueprint_choice = 'gradmax')",
    )
    avoid_tags: tuple[str, ...] = Field(
        default=(), description="gradmax choice: never choose a blueprint with one of these Urabrask tags"
    )
    prefer_tags: tuple[str, ...] = Field(
        default=(), description="gradmax choice: blueprints with more of these Urabrask tags rank first"
    )

    @model_validator(mode="after")
    def _check_choice(self) -> PolicyConfig:
        from cambium.morph.kernel_bench import TAG_CLASSES

        known = {t for tags in TAG_CLASSES.values() for t in tags}
        for name in ("avoid_tags", "prefer_tags"):
            bad = [t for t in getattr(self, name) if t not in known]
            if bad:
                raise ValueError(f"policy.{name} has unknown tag(s) {bad}; Urabrask's tags: {sorted(known)}")
        if set(self.avoid_tags) & set(self.prefer_tags):
            both = sorted(set(self.avoid_tags) & set(self.prefer_tags))
            raise ValueError(f"policy.avoid_tags and policy.prefer_tags share {both}")
        if self.placement == "gradmax" and self.blueprint_choice != "gradmax":
            raise ValueError("policy.placement='gradmax' needs policy.blueprint_choice='gradmax' (it ranks locations "
                             "by their best blueprint's GradMax score)")
        return self


class BusConfig(ConfigModel):
    """Oona (MOR-7)."""

    retention: int = Field(
        default=10_000, ge=0,
        description="with REDIS_URL: the entries a stream keeps once every consumer group has acknowledged older "
        "ones (0 = keep all; un-acked entries are never trimmed, see cambium.morph.redis_bus); the in-process bus "
        "keeps a run's messages in memory",
    )


class ControllerConfig(ConfigModel):
    """Which Tamiyo decides in `cambium morph train` (MOR-6): the heuristic ([policy]) or a GNN policy trained by
    Simic (`cambium morph simic`), which uses [policy]'s blueprint lists as its blueprint mask."""

    kind: Literal["heuristic", "gnn"] = Field(default="heuristic", description="'heuristic' or 'gnn'")
    policy: Path | None = Field(
        default=None, description="kind = 'gnn': the policy file (safetensors) written by `cambium morph simic`"
    )

    @model_validator(mode="after")
    def _check(self) -> ControllerConfig:
        if self.kind == "gnn" and self.policy is None:
            raise ValueError("controller.kind='gnn' needs controller.policy, the file `cambium morph simic` wrote")
        if self.kind == "heuristic" and self.policy is not None:
            raise ValueError(f"controller.policy={str(self.policy)!r} is only read with controller.kind='gnn'")
        return self


class LibraryConfig(ConfigModel):
    """Urza storage, Tezzeret compilation and Kasmina's kernel cache (MOR-5)."""

    root: Path = Field(default=Path("runs/urza"), description="directory of the local artifact store")
    max_params: int = Field(
        default=200_000, ge=1,
        description="the largest blueprint (trainable parameters) Karn may propose and the gradmax choice may pick",
    )
    mutants_per_blueprint: int = Field(
        default=0, ge=0, le=16,
        description="gradmax choice: Karn's mutants of each template offered at a location besides the template",
    )
    cache_bytes: int = Field(default=128 * 2**20, ge=0, description="Kasmina's LRU kernel cache budget in bytes")
    backend: Literal["eager", "codegen"] = Field(default="codegen", description="Tezzeret compile backend")
    benchmark_batch: int = Field(default=8, ge=1, description="batch size of Urabrask's latency measurement")
    benchmark_repeats: int = Field(default=5, ge=1, description="timed forwards per benchmark (median kept)")
    compile_in: Literal["thread", "workers"] = Field(
        default="thread",
        description="where Tezzeret compiles: 'thread' (a background thread of the trainer) or 'workers' "
        "(`cambium morph worker` processes reached through Redis; needs REDIS_URL)",
    )
    worker_wait_s: float = Field(
        default=300.0, gt=0.0,
        description="compile_in = 'workers' with lifecycle.await_compiles: the longest a boundary waits for the "
        "workers' outcomes before going on without them",
    )


class DataConfig(ConfigModel):
    """CIFAR-10 subset (Tolaria)."""

    root: Path = Field(
        default=Path("data/samples/images/cifar10/cifar-10-batches-py"), description="cifar-10-batches-py dir"
    )
    train_batches: tuple[str, ...] = Field(default=("data_batch_1", "data_batch_2"), description="training files")
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="share of training images for validation")
    limit: int = Field(default=0, ge=0, description="use at most this many training images (0 = all)")
    batch_size: int = Field(default=64, ge=1, description="batch size")


class ModelConfig(ConfigModel):
    """Host CNN (Tolaria)."""

    widths: tuple[int, ...] = Field(default=(8, 16, 16), min_length=1, description="channels of each conv stage")
    num_classes: int = Field(default=10, ge=2, description="classes")


class TrainConfig(LoopConfig):
    """Tolaria's loop: `cambium.core.loop.LoopConfig` (one loop step is an epoch; checkpoints at epoch boundaries)
    and the host's optimiser."""

    device: str = Field("cpu", description="'cpu': seed kernels and the background compiler are CPU code (CUDA for "
                        "morph is not built yet)", json_schema_extra=RESUME_SAFE)
    checkpoint_every: int = Field(1, ge=1, description="checkpoint every this many epochs (and at the end)",
                                  json_schema_extra=RESUME_SAFE)
    eval_every: int = Field(1, ge=1, description="validation loss every this many epochs (and at the end)",
                            json_schema_extra=RESUME_SAFE)
    epochs: int = Field(default=12, ge=1, description="epochs of the host's lr schedule (max_steps may run longer)")
    lr: float = Field(default=3e-3, gt=0.0, description="host AdamW learning rate")
    weight_decay: float = Field(default=0.0, ge=0.0, description="host AdamW weight decay")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="host lr over the run: constant, or a half cosine from lr to lr × lr_floor at the last step",
    )
    lr_floor: float = Field(default=0.0, ge=0.0, le=1.0, description="cosine: the final lr as a fraction of lr")
    morphogenetic: bool = Field(default=True, description="False runs the same host without seeds (baseline)")

    @field_validator("device")
    @classmethod
    def _cpu_only(cls, value: str) -> str:
        if value != "cpu":
            raise ValueError(f"morph trains on the CPU only (seed kernels, telemetry and the background compiler are "
                             f"CPU code); device={value!r} is not built yet, use 'cpu'")
        return value


class CompareConfig(ConfigModel):
    """`cambium morph compare` (MOR-11): which RNG seeds it repeats the arms over, and how the larger static network
    it trains next to the morphogenetic runs is sized."""

    train_seeds: tuple[int, ...] = Field(
        default=(), description="RNG seeds (train.seed) each arm is trained with, one run per seed and arm; "
        "empty = train.seed only"
    )
    param_ratio: float = Field(
        default=1.0, ge=1.0,
        description="the larger static host is the smallest uniform widening of model.widths with at least this "
        "× the largest final parameter count of the morphogenetic runs",
    )
    variants: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="further morphogenetic arms: label → config overrides ('section.key=value') applied to the "
        "config, e.g. another controller; each is trained per train seed and paired with both static arms",
    )

    @field_validator("variants")
    @classmethod
    def _check_variants(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for label, overrides in value.items():
            if not label.replace("-", "").replace("_", "").isalnum() or len(label) > 40:
                raise ValueError(f"compare.variants label {label[:60]!r} must be 1-40 letters, digits, '-' or '_'")
            if label in ("morph", "static", "static-large"):
                raise ValueError(f"compare.variants label {label!r} is an arm's name already")
            bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
            if bad:
                raise ValueError(f"compare.variants[{label!r}] has {bad[0][:60]!r}; overrides are 'section.key=value'")
        return value


class MorphConfig(ConfigModel):
    """Root config of a morph run."""

    seeds: SeedsConfig = Field(default_factory=SeedsConfig, description="seed slots and telemetry")
    lifecycle: LifecycleConfig = Field(default_factory=LifecycleConfig, description="lifecycle and safety")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Tamiyo")
    controller: ControllerConfig = Field(default_factory=ControllerConfig, description="Tamiyo's kind (MOR-6)")
    bus: BusConfig = Field(default_factory=BusConfig, description="Oona")
    library: LibraryConfig = Field(default_factory=LibraryConfig, description="Urza, Tezzeret, Kasmina cache")
    data: DataConfig = Field(default_factory=DataConfig, description="data")
    model: ModelConfig = Field(default_factory=ModelConfig, description="host model")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training loop")
    compare: CompareConfig = Field(default_factory=CompareConfig, description="MOR-11 comparison")

    @model_validator(mode="after")
    def _check(self) -> MorphConfig:
        if len(set(self.seeds.locations)) != len(self.seeds.locations):
            raise ValueError(f"seeds.locations={list(self.seeds.locations)} lists a location twice")
        if len(set(self.compare.train_seeds)) != len(self.compare.train_seeds):
            raise ValueError(f"compare.train_seeds={list(self.compare.train_seeds)} lists a seed twice")
        return self


CONFIG_MODEL = MorphConfig
