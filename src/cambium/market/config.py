"""Config of the market data layer: candle store, REST downloader, websocket connector.

Defaults are Binance's real endpoints and documented limits (see shared/data/market/BINANCE_LIMITS.md); every URL is
configurable so tests and the replay demo point at 127.0.0.1.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cambium.core.config import ConfigModel
from cambium.market.limits import HARD_STREAM_CAP

__all__ = ["CONFIG_MODEL", "MarketConfig", "RestConfig", "StoreConfig", "WsConfig"]


class StoreConfig(ConfigModel):
    root: str = Field("data/market", description="Directory of the Parquet candle store.")


class RestConfig(ConfigModel):
    spot_url: str = Field("https://api.binance.com", description="Base URL of the spot REST API (/api/v3/...).")
    futures_url: str = Field(
        "https://fapi.binance.com", description="Base URL of the USDⓈ-M futures REST API (/fapi/v1/...)."
    )
    timeout_s: float = Field(10.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(5, ge=0, description="Retries of one request after 5xx, 429 or a malformed body.")
    backoff_base_s: float = Field(1.0, gt=0, description="Retry back-off scale: the n-th wait is U(0, base·2^n).")
    backoff_cap_s: float = Field(60.0, gt=0, description="Longest retry back-off in seconds.")
    weight_fraction: float = Field(
        0.8, gt=0, le=1, description="Share of the per-minute REQUEST_WEIGHT limit the client allows itself to use."
    )
    spot_page_limit: int = Field(1000, ge=1, le=1000, description="Klines per spot request (documented max 1000).")
    futures_page_limit: int = Field(
        1500, ge=1, le=1500, description="Klines per futures request (documented max 1500; weight 10 above 1000)."
    )

    @model_validator(mode="after")
    def _backoff(self) -> RestConfig:
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError(f"backoff_cap_s={self.backoff_cap_s} must be >= backoff_base_s={self.backoff_base_s}")
        return self


class WsConfig(ConfigModel):
    futures_public_url: str = Field(
        "wss://fstream.binance.com/public", description="USDⓈ-M endpoint for @bookTicker and @depth streams."
    )
    futures_market_url: str = Field(
        "wss://fstream.binance.com/market",
        description="USDⓈ-M endpoint for @aggTrade, @trade, @kline_*, @markPrice and ticker streams.",
    )
    spot_url: str = Field("wss://stream.binance.com:9443", description="Spot websocket endpoint (all streams).")
    max_streams_per_connection: int = Field(
        800, ge=1, le=HARD_STREAM_CAP, description="Streams per connection (Binance's hard cap is 1024)."
    )
    streams_per_subscribe: int = Field(200, ge=1, description="Stream names per SUBSCRIBE control message.")
    control_messages_per_s: float | None = Field(
        None, gt=0, description="Outgoing control messages per second per connection; None = the venue's limit."
    )
    backoff_base_s: float = Field(0.5, gt=0, description="Reconnect back-off scale: the n-th wait is U(0, base·2^n).")
    backoff_cap_s: float = Field(60.0, gt=0, description="Longest reconnect back-off in seconds.")
    breaker_failures: int = Field(5, ge=1, description="Consecutive failed connects that open the circuit breaker.")
    breaker_cooldown_s: float = Field(30.0, gt=0, description="Seconds an open breaker waits before a probe.")
    new_connections_per_window: int = Field(300, ge=1, description="New connections allowed per window per IP.")
    connection_window_s: float = Field(300.0, gt=0, description="Window of the new-connection budget, seconds.")
    stale_after_s: float = Field(30.0, gt=0, description="A shard with no data frame for this long reconnects.")
    rotate_after_s: float = Field(
        23.5 * 3600, gt=0, description="Reconnect a shard proactively after this long (server cuts at 24 h)."
    )
    ping_interval_s: float | None = Field(20.0, gt=0, description="Client ping period; None disables client pings.")
    ping_timeout_s: float | None = Field(60.0, gt=0, description="Close if our ping is not answered within this.")
    open_timeout_s: float = Field(10.0, gt=0, description="Timeout of the opening handshake.")
    queue_size: int = Field(100_000, ge=1, description="Frames buffered between the shards and the consumer.")
    client: Literal["websockets", "picows"] = Field(
        "picows", description="Websocket client library: picows (default: about half the CPU per frame) or websockets "
        "(docs/screener.md has the measured frames/s and CPU).")
    ban_backoff_s: float = Field(
        120.0, gt=0, description="Hold-off of every shard after a handshake answered HTTP 418 (IP banned) without "
        "Retry-After; Binance's bans last 2 minutes to 3 days.")

    @model_validator(mode="after")
    def _check(self) -> WsConfig:
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError(f"backoff_cap_s={self.backoff_cap_s} must be >= backoff_base_s={self.backoff_base_s}")
        if self.rotate_after_s >= 24 * 3600:
            raise ValueError(f"rotate_after_s={self.rotate_after_s} must be < 86400 (Binance cuts at 24 h)")
        return self


class MarketConfig(ConfigModel):
    """Root config of cambium.market."""

    store: StoreConfig = Field(default_factory=StoreConfig, description="Parquet candle store.")
    rest: RestConfig = Field(default_factory=RestConfig, description="REST client and downloader.")
    ws: WsConfig = Field(default_factory=WsConfig, description="Websocket connector.")


CONFIG_MODEL = MarketConfig
