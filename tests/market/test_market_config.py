from __future__ import annotations

from pathlib import Path

import pytest

from cambium.core.config import load, load_data
from cambium.core.errors import ConfigError
from cambium.market.binance import binance_spot_venue, binance_usdm_venue, route_usdm
from cambium.market.config import CONFIG_MODEL, MarketConfig
from cambium.market.events import MarketEvent

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "market"


def test_defaults_are_binance_documented_values() -> None:
    cfg = MarketConfig()
    assert load(CONFIGS / "default.toml", CONFIG_MODEL) == cfg
    assert cfg.rest.futures_url == "https://fapi.binance.com" and cfg.rest.spot_url == "https://api.binance.com"
    assert (cfg.rest.futures_page_limit, cfg.rest.spot_page_limit) == (1500, 1000)
    assert cfg.ws.futures_public_url == "wss://fstream.binance.com/public"
    assert cfg.ws.futures_market_url == "wss://fstream.binance.com/market"
    assert (cfg.ws.new_connections_per_window, cfg.ws.connection_window_s) == (300, 300.0)
    assert cfg.ws.rotate_after_s < 24 * 3600
    usdm, spot = binance_usdm_venue(cfg.ws), binance_spot_venue(cfg.ws)
    assert (usdm.control_messages_per_s, spot.control_messages_per_s) == (10.0, 5.0)
    assert usdm.url("public") == "wss://fstream.binance.com/public/stream"
    assert [route_usdm(s) for s in ["btcusdt@bookTicker", "btcusdt@depth@100ms", "btcusdt@depth5", "btcusdt@aggTrade",
                                    "btcusdt@kline_1m", "!markPrice@arr@1s", "btcusdt@trade"]] == [
        "public", "public", "public", "market", "market", "market", "market"]


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"ws.max_streams_per_connection=1025"):
        load_data({"ws": {"max_streams_per_connection": 1025}}, CONFIG_MODEL)
    with pytest.raises(ConfigError, match=r"rotate_after_s=86400.0 must be < 86400"):
        load_data({"ws": {"rotate_after_s": 86400.0}}, CONFIG_MODEL)
    with pytest.raises(ConfigError, match=r"rest.futures_page_limit=2000"):
        load_data({"rest": {"futures_page_limit": 2000}}, CONFIG_MODEL)


def test_market_event_json_is_strict() -> None:
    ev = MarketEvent(1723161256313, "binance_usdm", "BTCUSDT", "trade", {"price": 61800.3, "qty": 0.006}, 17)
    assert MarketEvent.from_json(ev.to_json()) == ev
    d = ev.to_dict()
    for bad in ({**d, "extra": 1}, {k: v for k, v in d.items() if k != "ts"}, {**d, "ts": "1"}, {**d, "type": "x"},
                {**d, "recv_ts": True}):
        with pytest.raises(Exception, match="MarketEvent"):
            MarketEvent.from_dict(bad)
