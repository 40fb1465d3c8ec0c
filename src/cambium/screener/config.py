"""Config models of the screener; `CONFIG_MODEL` is the root loaded from configs/screener/*.toml.

Every field has a description (it doubles as help text). Defaults are the documented ones (docs/screener.md);
the shipped configs/screener/default.toml spells all of them out.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from cambium.core.config import ConfigModel
from cambium.core.errors import ConfigError

__all__ = [
    "CONFIG_MODEL",
    "BaselineConfig",
    "ExplainConfig",
    "LightGBMConfig",
    "ModelConfig",
    "NotifyConfig",
    "RankerConfig",
    "ScorerConfig",
    "ScreenerConfig",
    "SenderConfig",
    "StatusConfig",
    "StorageConfig",
    "TelegramConfig",
    "TerminalConfig",
    "TrainConfig",
    "UniverseConfig",
    "WebhookConfig",
]


class ScorerConfig(ConfigModel):
    """score = (w_30s·p30 + w_2m·p2m + w_5m·p5m) × clamp(utility, 0, cap)/cap × (1 − toxic_penalty·p_toxic)."""

    w_30s: float = Field(0.2, ge=0.0, le=1.0, description="Weight of p_inplay_30s in the score.")
    w_2m: float = Field(0.5, ge=0.0, le=1.0, description="Weight of p_inplay_2m in the score.")
    w_5m: float = Field(0.3, ge=0.0, le=1.0, description="Weight of p_inplay_5m in the score.")
    utility_cap_bps: float = Field(
        50.0, gt=0.0, description="Expected 2 m utility (bps) at which the utility factor saturates at 1."
    )
    toxic_penalty: float = Field(
        0.5, ge=0.0, le=1.0, description="How much p_toxic discounts the score: factor (1 − toxic_penalty·p_toxic)."
    )
    profile: Literal["A", "B"] = Field(
        "B", description="Cost profile whose predictions are ranked: A maker-ish (2 bps fees), B taker-ish (4 bps)."
    )

    @model_validator(mode="after")
    def _weights_sum_to_one(self) -> ScorerConfig:
        total = self.w_30s + self.w_2m + self.w_5m
        if abs(total - 1.0) > 1e-9:
            raise ValueError(
                f"w_30s={self.w_30s} + w_2m={self.w_2m} + w_5m={self.w_5m} = {total} must be 1 "
                "(so that the score stays in [0, 1])"
            )
        return self


class StatusConfig(ConfigModel):
    """Status rules, checked in order: DATA_ISSUE, TRAP, TRADEABLE, DEAD, else WATCH."""

    max_stale_book_ms: int = Field(5_000, ge=0, description="Book older than this (ms) makes the symbol DATA_ISSUE.")
    max_stale_trades_ms: int = Field(
        120_000, ge=0, description="No trade for longer than this (ms) makes the symbol DATA_ISSUE."
    )
    trap_min_toxic: float = Field(
        0.6, ge=0.0, le=1.0, description="p_toxic at or above this, with a move likely, makes the symbol a TRAP."
    )
    trap_min_p2m: float = Field(
        0.3, ge=0.0, le=1.0, description="p_inplay_2m at or above this counts as 'a move is likely' for TRAP."
    )
    tradeable_min_score: float = Field(0.3, ge=0.0, le=1.0, description="Minimum score for TRADEABLE.")
    tradeable_max_toxic: float = Field(
        0.35, ge=0.0, le=1.0, description="Toxicity gate: TRADEABLE needs p_toxic below this."
    )
    tradeable_min_utility_bps: float = Field(
        5.0, ge=0.0, description="TRADEABLE needs expected_utility_bps_2m at or above this."
    )
    dead_max_score: float = Field(0.02, ge=0.0, le=1.0, description="Score below this (and not TRAP) is DEAD.")

    @model_validator(mode="after")
    def _gates_consistent(self) -> StatusConfig:
        if self.tradeable_max_toxic > self.trap_min_toxic:
            raise ValueError(
                f"tradeable_max_toxic={self.tradeable_max_toxic} must be <= trap_min_toxic={self.trap_min_toxic}"
            )
        if self.dead_max_score > self.tradeable_min_score:
            raise ValueError(
                f"dead_max_score={self.dead_max_score} must be <= tradeable_min_score={self.tradeable_min_score}"
            )
        return self


class RankerConfig(ConfigModel):
    """Top-K list with hysteresis, confirmation times and a minimum dwell."""

    top_k: int = Field(20, ge=1, le=1000, description="Maximum number of listed symbols.")
    enter_threshold: float = Field(0.25, ge=0.0, le=1.0, description="Score a symbol must hold to enter the list.")
    exit_threshold: float = Field(
        0.15, ge=0.0, le=1.0, description="A listed symbol leaves once its score stays below this."
    )
    enter_confirm_ms: int = Field(
        2_000, ge=0, description="The score must stay >= enter_threshold this long (ms) before the symbol enters."
    )
    exit_confirm_ms: int = Field(
        5_000, ge=0, description="The score must stay < exit_threshold this long (ms) before the symbol leaves."
    )
    min_dwell_ms: int = Field(30_000, ge=0, description="A symbol stays listed at least this long (ms) after entering.")

    @model_validator(mode="after")
    def _hysteresis(self) -> RankerConfig:
        if not self.enter_threshold > self.exit_threshold:
            raise ValueError(
                f"enter_threshold={self.enter_threshold} must be > exit_threshold={self.exit_threshold} "
                "(the gap between them is the hysteresis band)"
            )
        return self


class BaselineConfig(ConfigModel):
    """Parameters of the heuristic baseline model (used when no trained artifacts exist)."""

    fee_bps_a: float = Field(2.0, ge=0.0, description="Round-trip fees of profile A (maker-ish), bps.")
    fee_bps_b: float = Field(4.0, ge=0.0, description="Round-trip fees of profile B (taker-ish), bps.")
    target_bps_a: tuple[float, float, float] = Field(
        (5.0, 10.0, 15.0), description="Net move (bps) that counts as in-play for profile A at 30 s, 2 m, 5 m."
    )
    target_bps_b: tuple[float, float, float] = Field(
        (8.0, 15.0, 20.0), description="Net move (bps) that counts as in-play for profile B at 30 s, 2 m, 5 m."
    )
    flow_drift: float = Field(
        0.5, ge=0.0, description="Drift per unit flow imbalance, in units of the horizon's volatility."
    )
    toxic_move_bps: float = Field(10.0, gt=0.0, description="Adverse move within 30 s (bps) that counts as toxic.")
    vol_floor_bps: float = Field(0.5, gt=0.0, description="Lower bound of the 60 s volatility used (bps), avoids 0/0.")
    max_spread_bps: float = Field(10.0, gt=0.0, description="Label gate: wider spreads are never in play.")
    max_impact_bps: float = Field(20.0, gt=0.0, description="Label gate: higher impact is never in play.")
    flow_reason_min: float = Field(
        0.3, gt=0.0, le=1.0, description="|flow imbalance| that earns a FLOW_BUY/SELL reason."
    )


class ModelConfig(ConfigModel):
    """Which model produces the probabilities."""

    artifacts_dir: str | None = Field(
        None, description="Directory with a trained artifact manifest.json; unset → heuristic baseline ('baseline-v1')."
    )
    baseline: BaselineConfig = Field(default_factory=BaselineConfig, description="Heuristic baseline parameters.")


class ExplainConfig(ConfigModel):
    """Human explanations: a deterministic template, optionally rewritten by an LLM (off by default)."""

    llm_enabled: bool = Field(False, description="Ask an OpenAI-compatible endpoint; off → template only.")
    llm_url: str = Field(
        "http://127.0.0.1:8000/v1/chat/completions", description="Full URL of the chat/completions endpoint."
    )
    llm_model: str = Field("local", description="Model name sent in the request.")
    llm_timeout_s: float = Field(2.0, gt=0.0, description="Seconds to wait for the LLM before using the template.")
    llm_api_key_env: str = Field("", pattern=r"^([A-Za-z_][A-Za-z0-9_]*)?$", description="Name of the environment "
                                 "variable holding the endpoint's API key, sent as `Authorization: Bearer <key>` "
                                 "(hosted OpenAI-compatible endpoints need one); empty: no key (a local server). The "
                                 "key itself never goes in a config file.")
    max_headline_chars: int = Field(80, ge=16, description="Longest allowed headline.")
    max_subtext_chars: int = Field(280, ge=16, description="Longest allowed subtext.")
    max_tooltip_chars: int = Field(160, ge=16, description="Longest allowed tooltip text.")
    max_tooltips: int = Field(8, ge=0, description="Most tooltips allowed.")

    @model_validator(mode="after")
    def _http_url(self) -> ExplainConfig:
        if not self.llm_url.startswith(("http://", "https://")):
            raise ValueError(f"llm_url={self.llm_url!r} must be an http:// or https:// URL")
        return self


class SenderConfig(ConfigModel):
    """Rate limit and queue of a background notifier."""

    enabled: bool = Field(False, description="Send notifications through this channel.")
    rate_per_s: float = Field(1.0, gt=0.0, description="Token-bucket refill rate: messages per second.")
    burst: int = Field(5, ge=1, description="Token-bucket capacity: messages that may go out back to back.")
    queue_size: int = Field(
        1000, ge=1, description="Bounded queue; events offered when it is full are dropped (counted)."
    )
    timeout_s: float = Field(5.0, gt=0.0, description="HTTP timeout per request, seconds.")
    max_retries: int = Field(3, ge=0, le=20, description="Retries of one event after a connection error, a timeout, "
                             "an HTTP 5xx or a 429 with a retry delay (other 4xx are final); then it is dropped "
                             "(counted by reason).")
    retry_base_s: float = Field(0.5, gt=0.0, description="Retry back-off scale: the n-th wait is uniform on "
                                "[0, min(retry_cap_s, retry_base_s·2^n)] seconds.")
    retry_cap_s: float = Field(30.0, gt=0.0, description="Longest wait before a retry, seconds.")

    @model_validator(mode="after")
    def _retry_cap(self) -> SenderConfig:
        if self.retry_cap_s < self.retry_base_s:
            raise ValueError(f"retry_cap_s={self.retry_cap_s} must be >= retry_base_s={self.retry_base_s}")
        return self


class WebhookConfig(SenderConfig):
    """HTTP POST of each RankEvent as JSON."""

    url: str = Field("http://127.0.0.1:9000/screener", description="Where RankEvents are POSTed.")


class TelegramConfig(SenderConfig):
    """Telegram bot sendMessage; the bot token comes from the environment variable named by token_env."""

    api_url: str = Field("https://api.telegram.org", description="Bot API base URL (…/bot<token>/sendMessage).")
    token_env: str = Field("CAMBIUM_TELEGRAM_TOKEN", description="Environment variable holding the bot token.")
    chat_id: str = Field("", description="Chat to send to (required when enabled).")
    events: tuple[Literal["SYMBOL_ENTER", "SYMBOL_EXIT", "ALERT_TRADABLE", "ALERT_TRAP", "DATA_ISSUE"], ...] = Field(
        ("ALERT_TRADABLE", "ALERT_TRAP"), description="RankEvent kinds forwarded to Telegram."
    )

    @model_validator(mode="after")
    def _chat_when_enabled(self) -> TelegramConfig:
        if self.enabled and not self.chat_id:
            raise ValueError("enabled=true needs chat_id (the Telegram chat to send to)")
        return self


class TerminalConfig(ConfigModel):
    """Live terminal table of the current list (rich)."""

    enabled: bool = Field(False, description="Show the live table.")
    redraws_per_s: float = Field(4.0, gt=0.0, description="Token-bucket rate of redraws.")
    burst: int = Field(1, ge=1, description="Redraws that may happen back to back.")


class NotifyConfig(ConfigModel):
    """Notification channels (all off by default)."""

    terminal: TerminalConfig = Field(default_factory=TerminalConfig, description="Live terminal table.")
    webhook: WebhookConfig = Field(default_factory=WebhookConfig, description="JSON webhook.")
    telegram: TelegramConfig = Field(default_factory=TelegramConfig, description="Telegram bot.")


class StorageConfig(ConfigModel):
    """How the Parquet files (queryable with DuckDB) are written; where is the command's choice (`screener replay
    --store DIR`, the demo's `--runs-dir`)."""

    batch_rows: int = Field(1_000, ge=1, description="Rows buffered in memory before a row group is written.")
    rotate_rows: int = Field(200_000, ge=1, description="Rows per file before a new file is started.")
    compression: Literal["zstd", "snappy", "none"] = Field("zstd", description="Parquet compression codec.")

    @model_validator(mode="after")
    def _rotate_after_batch(self) -> StorageConfig:
        if self.rotate_rows < self.batch_rows:
            raise ValueError(f"rotate_rows={self.rotate_rows} must be >= batch_rows={self.batch_rows}")
        return self


class FeatureConfig(ConfigModel):
    """The feature engine: snapshot cadence, impact clip size, clock skew and expected streams.

    Windows are 1 s/10 s/60 s/5 m. Staleness is judged by the scorer (`status.max_stale_*_ms`) from data_health.
    """

    cadence_ms: int = Field(1_000, ge=100, le=60_000, description="Snapshot cadence in exchange time; the windows "
                            "(1 s, 10 s, 60 s, 5 m) must be whole multiples of it.")
    clip_notional: float = Field(10_000.0, gt=0, description="Order size (quote) whose impact_bps is measured.")
    max_skew_ms: int = Field(2_000, ge=0, description="How far (exchange ms) the clock waits for the slower of the "
                             "book and trade streams, which arrive on different connections.")
    max_clock_jump_ms: int = Field(300_000, ge=1_000, description="An event further than this (exchange ms) ahead "
                                   "of or behind the clock is refused as malformed and fills no bars; a run of "
                                   "consistent such events (the stream itself moved, e.g. after an outage) moves the "
                                   "clock without filling the gap. Default: the longest window.")
    streams: tuple[Literal["bookTicker", "trade", "depth"], ...] = Field(
        ("bookTicker", "trade", "depth"), description="Streams each symbol is expected to deliver (missing_streams).")

    @model_validator(mode="after")
    def _windows_fit(self) -> FeatureConfig:
        for window in (1_000, 10_000, 60_000, 300_000):
            if window % self.cadence_ms:
                raise ValueError(f"cadence_ms={self.cadence_ms} must divide every window (1000, 10000, 60000, 300000)")
        return self


class UniverseConfig(ConfigModel):
    """`live.symbols = "all"`: which exchangeInfo symbols are watched, and how often the list is re-read."""

    quote_assets: tuple[str, ...] = Field(("USDT",), min_length=1, description="Quote assets kept.")
    contract_types: tuple[str, ...] = Field(("PERPETUAL",), min_length=1, description="contractType values kept.")
    statuses: tuple[str, ...] = Field(("TRADING",), min_length=1, description="status values kept.")
    exclude: tuple[str, ...] = Field((), description="Symbols never watched, whatever exchangeInfo says.")
    max_symbols: int | None = Field(None, ge=1, description="Watch at most this many (the first in name order); "
                                    "unset: every symbol that passes the filters.")
    refresh_s: float = Field(3600.0, ge=1.0, description="Seconds between exchangeInfo reads; listings and "
                             "delistings found are subscribed/unsubscribed.")


class LiveConfig(ConfigModel):
    """Live mode: which symbols and streams to subscribe to, and where the status page listens."""

    symbols: tuple[str, ...] | Literal["all"] = Field(
        "all", description='USDⓈ-M symbols to watch, or "all": every symbol exchangeInfo lists that passes '
        "`live.universe` (re-read every universe.refresh_s).")
    universe: UniverseConfig = Field(default_factory=UniverseConfig, description='Filters of symbols = "all".')
    workers: int = Field(0, ge=0, le=64, description="0: one process (connector, features, model and ranker); N: "
                         "N worker processes, symbols sharded between them by a hash of the name, feeding one ranker "
                         "in the parent (transport: Redis Streams when REDIS_URL is set, pipes otherwise).")
    worker_restarts: int = Field(10, ge=0, description="How often a dead worker is restarted (its books resynced "
                                 "from REST snapshots) before the run stops with an error.")
    shed_backlog: int = Field(2_000, ge=1, description="Frames waiting in a process's receive queue at which load "
                              "is shed: the depth diffs of the least active symbols are dropped (counted under "
                              "dropped['shed_depth']) until the backlog halves.")
    shed_fraction: float = Field(0.25, gt=0.0, le=1.0, description="Share of a process's symbols (least active "
                                 "first) whose depth diffs are dropped while it sheds load.")
    trade_stream: Literal["trade", "aggTrade"] = Field("aggTrade", description="Stream carrying trades.")
    depth_stream: Literal["depth@100ms", "depth@0ms", "depth"] = Field("depth@100ms", description="Depth diffs.")
    status_port: int = Field(0, ge=0, le=65535, description="Status page port on 127.0.0.1 (0 = any free port).")
    status_every_s: float = Field(2.0, gt=0.0, le=3600.0, description="Seconds between writes of the status page's "
                                  "document to status.json in the live run's directory (read by `cambium dashboard`); "
                                  "written once more when live mode stops.")
    depth_snapshots: bool = Field(True, description="Fetch a REST depth snapshot per symbol at start so the local "
                                  "L2 books sync (needs the REST endpoint; off for the offline demo).")
    depth_limit: Literal[100, 500, 1000] = Field(1000, description="Levels per side of each REST depth snapshot.")
    gc_freeze: bool = Field(True, description="While live mode runs, keep the objects that exist when it starts "
                            "(modules, config, model) out of Python's full garbage collections (gc.freeze), whose "
                            "pauses otherwise grow with them and set the latency tail.")

    @model_validator(mode="after")
    def _named_symbols(self) -> LiveConfig:
        if isinstance(self.symbols, tuple):
            if not self.symbols:
                raise ValueError('symbols must name at least one symbol, or be "all"')
            bad = [s for s in self.symbols if not re.fullmatch(r"[A-Z0-9_]{1,32}", s)]
            if bad:
                raise ValueError(f"symbols {bad[:3]} are not USDⓈ-M symbol names (A-Z, 0-9, _; e.g. BTCUSDT)")
        return self

    def streams(self, kinds: tuple[str, ...], symbols: tuple[str, ...] | list[str] | None = None) -> list[str]:
        """Stream names for the feature streams `kinds` (bookTicker, trade, depth) of `symbols` (default: the
        configured ones, which must then be named, not "all")."""
        if symbols is None:
            if self.symbols == "all":
                raise ConfigError('live.symbols="all" is resolved from exchangeInfo (cambium.screener.universe): '
                                  "pass the resolved symbols")
            symbols = self.symbols
        suffix = {"bookTicker": "bookTicker", "trade": self.trade_stream, "depth": self.depth_stream}
        return [f"{s.lower()}@{suffix[k]}" for s in symbols for k in kinds]


class LightGBMConfig(ConfigModel):
    """LightGBM settings of every model `screener train` fits (binary objective)."""

    n_estimators: int = Field(100, ge=1, le=10_000, description="Boosting rounds.")
    learning_rate: float = Field(0.05, gt=0.0, le=1.0, description="Shrinkage per round.")
    num_leaves: int = Field(7, ge=2, le=4096, description="Leaves per tree.")
    min_child_samples: int = Field(300, ge=1, description="Fewest rows in a leaf (guards against fitting noise).")
    feature_fraction: float = Field(0.9, gt=0.0, le=1.0, description="Share of features each tree sees.")
    num_threads: int = Field(1, ge=1, le=256, description="Threads LightGBM may use.")


class TrainConfig(ConfigModel):
    """`cambium screener train`: data, labels' kline assumptions, splits, models and the evaluation report."""

    source: Literal["klines", "ticks"] = Field(
        "klines", description="klines: 1 m bar files (2 m / 5 m labels); ticks: recordings, captures or Binance "
        "aggTrades + bookTicker archive days through the feature engine (every label).")
    data: tuple[str, ...] = Field(
        ("data/samples/market/klines_1m_futures/BTCUSDT_2023-07.csv.gz",), min_length=1,
        description="Input files (one symbol each for klines; for ticks: recordings, capture files, or archive "
        "directories/day files stored by `cambium market archive`).")
    max_rows_per_file: int | None = Field(
        None, ge=100, description="Read only the first rows of each kline file (a quick run); unset reads all.")
    kline_spread_bps: float = Field(
        0.5, ge=0.0, description="Spread (bps) assumed for kline rows: bars carry none (label cost and heuristic).")
    kline_impact_bps: float = Field(0.0, ge=0.0, description="Impact (bps) assumed for kline rows.")
    holdout_fraction: float = Field(
        0.25, gt=0.0, lt=1.0, description="Last share of each symbol's span held out for the evaluation report.")
    embargo_ms: int = Field(
        600_000, ge=0, description="Rows dropped after each test block on top of the label-horizon purge (ms).")
    cv_folds: int = Field(5, ge=2, le=20, description="Purged time-series folds; their out-of-fold predictions "
                          "fit the calibration maps.")
    calibration: Literal["isotonic", "platt"] = Field(
        "isotonic", description="Calibration the manifest makes active (both are written as artifacts).")
    lightgbm: LightGBMConfig = Field(default_factory=LightGBMConfig, description="LightGBM settings.")
    seed: int = Field(0, description="Seed of LightGBM and the bootstrap.")
    bootstrap: int = Field(200, ge=10, le=10_000, description="Block-bootstrap resamples of the AUC differences.")
    bootstrap_block_ms: int = Field(
        3_600_000, ge=1_000, description="Block length of the bootstrap (ms): rows of one symbol and block move "
        "together, keeping their time dependence.")
    ece_bins: int = Field(15, ge=2, le=100, description="Equal-width bins of ECE and the reliability plots.")
    out_dir: str = Field("models/artifacts/klines-1m", description="Where the artifacts (manifest.json, models, "
                         "calibration maps) are written; replaced on each run.")


class ScreenerConfig(ConfigModel):
    """Root config of the screener."""

    live: LiveConfig = Field(default_factory=LiveConfig, description="Live mode subscriptions and status page.")
    features: FeatureConfig = Field(default_factory=FeatureConfig, description="Feature engine.")
    scorer: ScorerConfig = Field(default_factory=ScorerConfig, description="Score formula weights.")
    status: StatusConfig = Field(default_factory=StatusConfig, description="Status rules and toxicity gates.")
    ranker: RankerConfig = Field(default_factory=RankerConfig, description="Top-K list with hysteresis.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model runner.")
    notify: NotifyConfig = Field(default_factory=NotifyConfig, description="Notifiers.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Parquet storage.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="`screener train`: models and report.")
    explain: ExplainConfig = Field(default_factory=ExplainConfig, description="Explanations of ALERT events "
                                   "(notifiers, status page): the template, optionally reworded by an LLM.")


CONFIG_MODEL = ScreenerConfig
