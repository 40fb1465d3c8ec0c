"""Config models of the world model (`configs/worldmodel/<size>.toml`); the root is `CONFIG_MODEL`.

T-shirt sizes follow the origin project's shapes (S/M/L/XL: d_model 256/1024/2048/4096, 12/24/48/32 layers,
4/16/32/64 heads, expand 2, d_state 16): every one gives head_dim = d_model · expand / n_heads = 128, the tile width
of TPU MXUs and GPU tensor-core tiles. `WorldModelConfig` checks that rule: a warning for `tiny` and S (CPU-sized), an
error for the sizes meant for accelerator pods (M, L, XL).
"""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import Field, model_validator

from cambium.core.config import RESUME_SAFE, ConfigModel
from cambium.core.loop import LoopConfig
from cambium.worldmodel.multiverse import MultiverseConfig
from cambium.worldmodel.tdmpc import TDMPCConfig

__all__ = [
    "ALIGNED_HEAD_DIM",
    "ALIGNMENT_ENFORCED_SIZES",
    "CONFIG_MODEL",
    "AgentsConfig",
    "AlignmentWarning",
    "BacktestConfig",
    "DataConfig",
    "EMAConfig",
    "EncoderConfig",
    "EnvConfig",
    "EvalConfig",
    "FlowConfig",
    "ForecastConfig",
    "JEPAConfig",
    "MaskingConfig",
    "PPOConfig",
    "PipelineConfig",
    "PredictorConfig",
    "TokenizerConfig",
    "TrainConfig",
    "VICRegConfig",
    "WorldModelConfig",
]

ALIGNED_HEAD_DIM = 128
ALIGNMENT_ENFORCED_SIZES = ("M", "L", "XL")


class AlignmentWarning(UserWarning):
    """head_dim is not the accelerator tile width (harmless on CPU, wasteful on TPU/GPU)."""


class DataConfig(ConfigModel):
    """Which candles the pipeline reads and where phase 1 stores them."""

    klines_glob: str = Field(
        "data/samples/market/klines_1h_futures/*.csv.gz",
        description="glob of kline files to import (any format of cambium.market.importers), relative to the working "
        "directory; empty = import nothing and use what data.store_dir already holds",
    )
    symbols: tuple[str, ...] = Field((), description="import only these symbols (file-name prefixes); empty = all")
    market: Literal["futures", "spot"] = Field("futures", description="market partition of the candle store")
    interval: Literal["1m", "5m", "15m", "1h", "4h"] = Field("1h", description="bar interval of the kline files")
    store_dir: str | None = Field(
        None, description="candle store root; None = a store inside the run directory (`<run>/store`, partitions "
        "replaced); a configured store is merged into (new bars win) and left otherwise untouched"
    )
    drop_last_bar: bool = Field(
        True, description="drop each file's last row (the committed samples end with a still-forming bar)"
    )
    min_segment_bars: int = Field(
        64, ge=2, description="contiguous runs of bars (between gaps) shorter than this are left out"
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.klines_glob and self.store_dir is None:
            raise ValueError("klines_glob is empty and store_dir is not set: give files to import or a store to read")
        return self


class EvalConfig(ConfigModel):
    """WM-7: chronological split with an embargo, linear probes of next-bar returns."""

    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of the calendar span (first to last bar of the store) held out at the end"
    )
    embargo_bars: int = Field(48, ge=0, description="bars between the training window and the hold-out window")
    ridge_alphas: tuple[float, ...] = Field(
        (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0),
        description="ridge penalties tried; chosen on the last validation_fraction of the training anchors",
    )
    logistic_l2: tuple[float, ...] = Field(
        (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
        description="L2 penalties of the direction probe tried; chosen like ridge_alphas",
    )
    validation_fraction: float = Field(
        0.2, gt=0, lt=1, description="latest share of training anchors used to choose the penalties"
    )
    batch_windows: int = Field(256, ge=1, description="windows encoded per forward pass")
    report_examples: int = Field(4, ge=1, description="hold-out patches drawn in the reconstruction plot")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if not self.ridge_alphas or any(a <= 0 for a in self.ridge_alphas):
            raise ValueError(f"ridge_alphas={list(self.ridge_alphas)} must be a non-empty list of values > 0")
        if not self.logistic_l2 or any(a <= 0 for a in self.logistic_l2):
            raise ValueError(f"logistic_l2={list(self.logistic_l2)} must be a non-empty list of values > 0")
        return self


class PipelineConfig(LoopConfig):
    """How `cambium worldmodel pipeline` runs its phases: `cambium.core.loop.LoopConfig` (seed of every random
    generator of a run, device, dtype, threads, intervals of the training phases 2 and 4)."""

    tokenizer_window_patches: int = Field(8, ge=1, description="patches per Strate I training window")
    holdout_windows: int = Field(64, ge=1, description="hold-out windows whose loss each evaluation of phases 2 and "
                                 "4 reports (fixed for the run)", json_schema_extra=RESUME_SAFE)

    @model_validator(mode="after")
    def _phases_set_their_length(self) -> PipelineConfig:
        if self.max_steps is not None:
            raise ValueError(f"max_steps={self.max_steps}: the phases run train_tokenizer.steps, "
                             "train_jepa.steps and train_flow.steps steps; set those (a resume may raise them)")
        return self


class TokenizerConfig(ConfigModel):
    """Strate I: RevIN → SymLog → dilated causal CNN → FSQ → decoder, one code per patch of bars."""

    patch_length: int = Field(16, ge=2, description="bars per patch (one code per patch)")
    hidden_channels: int = Field(128, ge=1, description="channels of the encoder and decoder convolutions")
    n_layers: int = Field(4, ge=1, le=64,
                          description="dilated residual conv layers in the encoder and in the decoder")
    kernel_size: int = Field(3, ge=2, description="kernel width of the causal convolutions")
    dilation_base: int = Field(2, ge=1, description="layer i uses dilation dilation_base**i")
    fsq_levels: tuple[int, ...] = Field((8, 5, 5, 5), description="FSQ levels per latent channel (prod = codes)")
    revin_eps: float = Field(1e-5, gt=0, description="variance floor of the per-patch normalisation")
    huber_delta: float = Field(1.0, gt=0, description="Huber loss threshold of the reconstruction loss")

    @model_validator(mode="after")
    def _check(self) -> TokenizerConfig:
        if len(self.fsq_levels) < 1 or any(v < 2 for v in self.fsq_levels):
            raise ValueError(f"fsq_levels={list(self.fsq_levels)} must be integers >= 2 (e.g. [8, 5, 5, 5])")
        field, dilation = 1, 1
        for _ in range(self.n_layers):  # stops once the patch is covered: dilation_base**i grows without bound
            field += (self.kernel_size - 1) * dilation
            if field >= self.patch_length:
                break
            dilation *= self.dilation_base
        if field < self.patch_length:
            raise ValueError(
                f"receptive field {field} of n_layers={self.n_layers}, kernel_size={self.kernel_size}, "
                f"dilation_base={self.dilation_base} must cover patch_length={self.patch_length}"
            )
        return self


class EncoderConfig(ConfigModel):
    """Strate II backbone (context and target encoders share this shape)."""

    backbone: Literal["mamba2", "attention", "nested"] = Field(
        "mamba2", description="sequence mixer of the encoder layers: Mamba-2 SSD, causal attention, or a "
        "`cambium.nn.memory` test-time memory layer (nested learning)")
    memory_rule: Literal["delta", "hebbian", "titans_lmm", "moneta", "yaad", "memora"] = Field(
        "delta", description="backbone = nested: the memory rule preset of cambium.nn.memory (delta runs its exact "
        "chunkwise form, the others token by token)")
    d_model: int = Field(256, ge=1, description="width of the latent embeddings")
    n_layers: int = Field(12, ge=1, description="encoder layers")
    n_heads: int = Field(4, ge=1, description="SSD (or attention) heads; head_dim = d_model*expand/n_heads")
    d_state: int = Field(16, ge=1, description="SSD state size N per head")
    expand: int = Field(2, ge=1, description="d_inner = expand * d_model (mamba2)")
    d_conv: int = Field(4, ge=1, description="width of the short causal convolution (mamba2)")
    chunk_size: int = Field(128, ge=1, description="SSD chunk length")
    exo_clock: bool = Field(True, description="feed realised-volatility and calendar features to the dt bias")
    dt_max_delta: float = Field(2.0, ge=0, description="bound of the clock's shift of dt before softplus")
    dt_min: float = Field(1e-3, gt=0, description="smallest initial step size")
    dt_max: float = Field(0.1, gt=0, description="largest initial step size")

    @property
    def head_dim(self) -> int:
        """d_model * expand / n_heads (attention, nested: d_model / n_heads)."""
        width = self.d_model * self.expand if self.backbone == "mamba2" else self.d_model
        return width // self.n_heads

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        width = self.d_model * self.expand if self.backbone == "mamba2" else self.d_model
        if width % self.n_heads:
            raise ValueError(f"d_model*expand={width} must be divisible by n_heads={self.n_heads}")
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min={self.dt_min} must be <= dt_max={self.dt_max}")
        return self


class PredictorConfig(ConfigModel):
    """MLP mapping a context latent to the target latent of a masked position."""

    hidden_dim: int = Field(512, ge=1, description="hidden width of the predictor MLP")
    n_layers: int = Field(2, ge=1, description="hidden layers of the predictor MLP")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout inside the predictor")


class MaskingConfig(ConfigModel):
    """Block masking of the context sequence."""

    mask_ratio: float = Field(0.5, gt=0, lt=1, description="fraction of positions masked (in contiguous blocks)")
    block_size_min: int = Field(4, ge=1, description="shortest masked block")
    block_size_max: int = Field(8, ge=1, description="longest masked block")

    @model_validator(mode="after")
    def _check(self) -> MaskingConfig:
        if self.block_size_min > self.block_size_max:
            raise ValueError(f"block_size_min={self.block_size_min} must be <= block_size_max={self.block_size_max}")
        return self


class VICRegConfig(ConfigModel):
    """VICReg weights (Bardes et al. 2022)."""

    inv_weight: float = Field(25.0, ge=0, description="weight of the invariance (prediction MSE) term")
    var_weight: float = Field(25.0, ge=0, description="weight of the variance hinge")
    cov_weight: float = Field(1.0, ge=0, description="weight of the off-diagonal covariance penalty")
    var_gamma: float = Field(1.0, gt=0, description="target standard deviation of each latent dimension")
    eps: float = Field(1e-4, gt=0, description="added to the variance before the square root")


class EMAConfig(ConfigModel):
    """Target encoder = EMA of the context encoder, momentum annealed by a cosine from tau_start to tau_end."""

    tau_start: float = Field(0.996, ge=0, le=1, description="EMA momentum at step 0")
    tau_end: float = Field(1.0, ge=0, le=1, description="EMA momentum at the last step")


class JEPAConfig(ConfigModel):
    """Strate II: JEPA over code sequences with an exo-clock."""

    seq_len: int = Field(128, ge=2, description="patches (codes) per training window")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="context/target encoder shape")
    predictor: PredictorConfig = Field(default_factory=PredictorConfig, description="predictor MLP")
    masking: MaskingConfig = Field(default_factory=MaskingConfig, description="block masking")
    vicreg: VICRegConfig = Field(default_factory=VICRegConfig, description="loss weights")
    ema: EMAConfig = Field(default_factory=EMAConfig, description="target encoder momentum")


class TrainConfig(ConfigModel):
    """One training phase."""

    steps: int = Field(1000, ge=1, description="optimizer steps of the phase (and of its lr and EMA schedules); a "
                       "resume may raise it", json_schema_extra=RESUME_SAFE)
    batch_size: int = Field(64, ge=1, description="windows per step")
    lr: float = Field(3e-4, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps")
    grad_clip: float = Field(1.0, gt=0, description="global gradient-norm clip")


class FlowConfig(ConfigModel):
    """Strate III (WM-3): OT-CFM over standardised latent futures, conditioned on the context latent; return head."""

    hidden_dim: int = Field(256, ge=1, description="width of the velocity network's residual MLP")
    n_layers: int = Field(3, ge=1, description="residual FiLM blocks of the velocity network")
    sigma: float = Field(0.0, ge=0, allow_inf_nan=False,
                         description="std of the Gaussian noise added around the straight path x_t")
    coupling: Literal["ot", "independent"] = Field("ot", description="minibatch optimal-transport pairs of noise "
                                                   "and targets, or independent pairs (plain CFM)")
    exact_max_batch: int = Field(256, ge=2, description="batches up to this size get the exact OT plan (ot.emd), "
                                 "larger ones entropic Sinkhorn")
    sinkhorn_reg: float = Field(0.05, gt=0, allow_inf_nan=False,
                                description="Sinkhorn regularisation (on the cost divided by its max)")
    cond_weight: float = Field(1.0, ge=0, allow_inf_nan=False,
                               description="weight of ‖context_i − context_j‖² in the OT cost (keeps the noise"
                               " each context receives close to N(0, I); 0 = OT on the futures alone)")
    head_hidden: int = Field(256, ge=1, description="hidden width of the return head")
    vol_window: int = Field(168, ge=2, description="trailing bars whose log-return std normalises returns (the "
                            "return head predicts returns in these units) and drives the GBM baseline")


class ForecastConfig(ConfigModel):
    """WM-7 forecast evaluation: futures sampled at hold-out origins, scored against realised returns and baselines."""

    horizons: tuple[int, ...] = Field((1, 4, 24), description="horizons in bars scored (cumulative log return "
                                      "over h bars, and the h-bar path for the energy score)")
    n_futures: int = Field(64, ge=2, description="futures sampled per origin (every method draws as many)")
    sampler: Literal["euler", "midpoint", "rk4"] = Field("midpoint", description="ODE solver of the sampler")
    ode_steps: int = Field(8, ge=1, description="fixed ODE steps from noise (t=0) to a future (t=1)")
    batch_origins: int = Field(256, ge=1, description="origins sampled per batch")
    bootstrap_window: int = Field(720, ge=2, description="trailing bars the historical bootstrap draws from")
    garch_refit_bars: int = Field(168, ge=1, description="GARCH(1,1)-t is refitted every this many hold-out bars "
                                  "(first on the training window)")
    garch_window: int = Field(2000, ge=100, description="bars of history (at most) each GARCH fit uses")
    min_train_bars: int = Field(720, ge=100, description="segments with fewer training bars are not scored (no "
                                "training window to fit the baselines on)")
    fan_charts: int = Field(4, ge=1, description="origins drawn in the fan chart figure")
    pit_bins: int = Field(10, ge=2, description="bins of the PIT histogram")

    @model_validator(mode="after")
    def _check(self) -> ForecastConfig:
        if not self.horizons or any(h < 1 for h in self.horizons) or list(self.horizons) != sorted(set(self.horizons)):
            raise ValueError(f"horizons={list(self.horizons)} must be increasing integers >= 1")
        return self


class EnvConfig(ConfigModel):
    """Strate IV trading environment (`cambium.worldmodel.env`): costs of trading real candles, episodes."""

    order_type: Literal["taker", "maker"] = Field("taker", description="which fee every rebalancing pays")
    taker_fee: float = Field(0.0005, ge=0, lt=0.1, allow_inf_nan=False,
                             description="fee per unit of notional traded as taker (Binance USDⓈ-M: 0.05 %)")
    maker_fee: float = Field(0.0002, ge=0, lt=0.1, allow_inf_nan=False,
                             description="fee per unit of notional traded as maker (Binance USDⓈ-M: 0.02 %)")
    slippage: Literal["range", "spread", "none"] = Field(
        "range", description="slippage model: a fraction of the decision bar's (high − low) / close, a fixed half "
        "spread, or none")
    range_fraction: float = Field(0.05, ge=0, le=1, allow_inf_nan=False,
                                  description="slippage = range: share of the bar's relative range paid per unit "
                                  "traded")
    half_spread_bps: float = Field(1.0, ge=0, allow_inf_nan=False,
                                   description="slippage = spread: half spread in basis points paid per unit traded")
    funding_glob: str = Field(
        "data/samples/market/funding_futures/*.csv.gz", description="glob of funding-rate history files (one per "
        "symbol, named SYMBOL.csv.gz: funding_time or timestamp, funding_rate); empty = no funding history")
    missing_funding: Literal["zero", "refuse"] = Field(
        "zero", description="bars outside a symbol's funding history (or of a symbol without a file): funding 0 "
        "(counted in the report as funding_missing_bars) or refuse the run")
    decision_bars: int = Field(1, ge=1, description="bars per step: the target position is held this many bars "
                               "(the reward sums their net returns)")
    episode_bars: int = Field(720, ge=2, description="bars per training episode (random start inside a segment)")
    reward_scale: float = Field(100.0, gt=0, allow_inf_nan=False,
                                description="reward = net return of the bar × reward_scale (backtests use returns)")


class PPOConfig(ConfigModel):
    """PPO (stable-baselines3) on the trading environment's training window."""

    steps: int = Field(20_000, ge=1, description="environment steps of training (total_timesteps)")
    n_envs: int = Field(1, ge=1, description="copies of the environment stepped together (each its own seed)")
    n_steps: int = Field(512, ge=2, description="steps per environment per rollout")
    batch_size: int = Field(128, ge=2, description="minibatch size of the PPO update")
    n_epochs: int = Field(4, ge=1, description="passes over each rollout")
    lr: float = Field(3e-4, gt=0, allow_inf_nan=False, description="Adam learning rate")
    gamma: float = Field(0.99, gt=0, le=1, allow_inf_nan=False, description="discount factor")
    gae_lambda: float = Field(0.95, gt=0, le=1, allow_inf_nan=False, description="GAE λ")
    clip_range: float = Field(0.2, gt=0, allow_inf_nan=False, description="PPO ratio clip")
    ent_coef: float = Field(0.0, ge=0, allow_inf_nan=False, description="entropy bonus weight")
    hidden: tuple[int, ...] = Field((64, 64), description="hidden widths of the policy and value MLPs")

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden={list(self.hidden)} must be a non-empty list of widths >= 1")
        return self


class AgentsConfig(ConfigModel):
    """Phase 8: per-bar features from the trained models, agents trained on the training window only."""

    kinds: tuple[Literal["ppo", "tdmpc"], ...] = Field(("ppo", "tdmpc"), description="agents trained and backtested")
    train_bars: int | None = Field(None, ge=64, description="the latest bars of each segment's training window the "
                                   "agents train on (None = all of it)")
    tdmpc_steps: int = Field(5000, ge=1, description="environment steps of TD-MPC2's training (`tdmpc` section)")
    scaling: Literal["none", "convergence", "convergence_rank"] = Field(
        "convergence", description="Multiverse position scaling (the unscaled agent stays as a baseline): none, the "
        "bar's convergence in [0, 1], or its rank among the training bars' convergences (the empirical CDF, in "
        "[0, 1]: a score that sits near 1 everywhere still spreads)")
    multiverse_features: bool = Field(True, description="put the Multiverse features (convergence, bifurcation, "
                                      "Lyapunov proxy) of each bar into the observation")

    @model_validator(mode="after")
    def _check(self) -> AgentsConfig:
        if not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds={list(self.kinds)} must list each agent at most once, at least one")
        return self


class BacktestConfig(ConfigModel):
    """Phase 9 (WM-7): hold-out backtest after fees, baselines, stationary block bootstrap, bias check."""

    bootstrap_samples: int = Field(1000, ge=10, description="stationary bootstrap resamples of the return series")
    block_bars: float = Field(168.0, ge=1, allow_inf_nan=False,
                              description="mean block length (bars) of the stationary bootstrap (Politis–Romano)")
    confidence: float = Field(0.9, gt=0, lt=1, allow_inf_nan=False, description="level of the percentile intervals")
    momentum_bars: int = Field(168, ge=1, description="look-back of the time-series momentum baseline (sign of the "
                               "return over these bars)")
    random_hold_bars: int = Field(24, ge=1, description="the random policy draws a uniform position in [−1, 1] "
                                  "every this many bars")
    mirror_corr: float = Field(0.9, gt=0, le=1, allow_inf_nan=False,
                               description="bias check: |correlation| with buy-and-hold's returns at or above this "
                               "flags a mirror of buy-and-hold")
    one_side_share: float = Field(0.95, gt=0.5, le=1, allow_inf_nan=False,
                                  description="bias check: a policy long (or short) on at least this share of bars "
                                  "is flagged as one-sided")


class WorldModelConfig(ConfigModel):
    """Root config of `cambium worldmodel`."""

    size: Literal["tiny", "S", "M", "L", "XL"] = Field(description="T-shirt size of this config")
    data: DataConfig = Field(default_factory=DataConfig, description="input candles")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Strate I model")
    jepa: JEPAConfig = Field(default_factory=JEPAConfig, description="Strate II model")
    train_tokenizer: TrainConfig = Field(default_factory=TrainConfig, description="Strate I training")
    train_jepa: TrainConfig = Field(default_factory=TrainConfig, description="Strate II training")
    flow: FlowConfig = Field(default_factory=FlowConfig, description="Strate III model")
    train_flow: TrainConfig = Field(default_factory=TrainConfig, description="Strate III training")
    forecast: ForecastConfig = Field(default_factory=ForecastConfig, description="WM-7 forecast evaluation")
    evaluation: EvalConfig = Field(default_factory=EvalConfig, description="WM-7 split and linear probes")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="pipeline phases and checkpoints")
    # The sections below are read by phases 8-9 only: a resume may change them, and phases.json's fingerprint of
    # them then redoes those phases (`cambium.worldmodel.agents.AGENT_SECTIONS`).
    env: EnvConfig = Field(default_factory=EnvConfig, description="Strate IV trading environment",
                           json_schema_extra=RESUME_SAFE)
    agents: AgentsConfig = Field(default_factory=AgentsConfig, description="phase 8: features and agents",
                                 json_schema_extra=RESUME_SAFE)
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO agent", json_schema_extra=RESUME_SAFE)
    backtest: BacktestConfig = Field(default_factory=BacktestConfig, description="phase 9: hold-out backtest",
                                     json_schema_extra=RESUME_SAFE)
    tdmpc: TDMPCConfig = Field(default_factory=TDMPCConfig, description="TD-MPC2 agent and its MPPI planner",
                               json_schema_extra=RESUME_SAFE)
    multiverse: MultiverseConfig = Field(default_factory=MultiverseConfig,
                                         description="WM-5 Multiverse Crossing features of each anchor",
                                         json_schema_extra=RESUME_SAFE)

    @model_validator(mode="after")
    def _alignment(self) -> WorldModelConfig:
        enc = self.jepa.encoder
        if enc.head_dim == ALIGNED_HEAD_DIM:
            return self
        width = "d_model*expand" if enc.backbone == "mamba2" else "d_model"
        msg = (
            f"jepa.encoder head_dim = {width}/n_heads = {enc.head_dim} (d_model={enc.d_model}, expand={enc.expand}, "
            f"n_heads={enc.n_heads}) is not {ALIGNED_HEAD_DIM}, the TPU/GPU tile width"
        )
        if self.size in ALIGNMENT_ENFORCED_SIZES:
            raise ValueError(f"{msg}; size={self.size} is meant for accelerators and requires it: adjust n_heads")
        warnings.warn(f"{msg}; fine on CPU, wasteful on accelerators", AlignmentWarning, stacklevel=2)
        return self


CONFIG_MODEL = WorldModelConfig
