"""live.symbols = "all": exchangeInfo → the watched universe, its refresh, and hostile exchangeInfo bodies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cambium.core.config import load_data
from cambium.core.errors import ConfigError
from cambium.market.synthetic import exchange_info
from cambium.screener.config import ScreenerConfig, UniverseConfig
from cambium.screener.universe import Universe, UniverseError, select_symbols


def test_filters_keep_trading_usdt_perpetuals_only() -> None:
    body = exchange_info(["BTCUSDT", "ETHUSDT", "SOLUSDT"])  # + a quarterly, a BUSD-quoted and a SETTLING entry
    sel = select_symbols(body, UniverseConfig())
    assert sel.symbols == ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    assert sel.listed == 6 and sel.refused == {}
    narrowed = select_symbols(body, UniverseConfig(exclude=("ETHUSDT",), max_symbols=1))
    assert narrowed.symbols == ("BTCUSDT",)
    assert "ZZZBUSD" in select_symbols(body, UniverseConfig(quote_assets=("USDT", "BUSD"))).symbols


def test_malformed_entries_are_counted_by_reason() -> None:
    body = exchange_info(["BTCUSDT"])
    body["symbols"] += [3, {"symbol": "X"}, {**body["symbols"][0], "symbol": "bad name!"}, body["symbols"][0]]
    sel = select_symbols(body, UniverseConfig())
    assert sel.symbols == ("BTCUSDT",)
    assert sel.refused == {"entry": 1, "field": 1, "name": 1, "duplicate": 1}


@pytest.mark.parametrize("body", [None, [], "x", {"symbols": 3}, {}])
def test_an_unreadable_body_is_one_line(body: Any) -> None:
    with pytest.raises(UniverseError) as err:
        select_symbols(body, UniverseConfig())
    assert "\n" not in str(err.value) and "exchangeInfo" in str(err.value)


def test_refresh_reports_listings_and_keeps_the_set_through_failures() -> None:
    answers: list[Any] = [exchange_info(["AUSDT", "BUSDT"]), exchange_info(["BUSDT", "CUSDT"]), {"oops": 1},
                          exchange_info([])]
    u = Universe(UniverseConfig(), lambda: answers.pop(0))
    assert u.bootstrap() == ("AUSDT", "BUSDT")
    change = u.refresh()
    assert (change.added, change.removed) == (("CUSDT",), ("AUSDT",))
    assert not u.refresh() and u.symbols == ("BUSDT", "CUSDT") and "symbols" in u.last_error  # a bad page
    assert not u.refresh() and u.symbols == ("BUSDT", "CUSDT")  # an empty listing never unsubscribes the market
    assert u.failures == 2


def test_bootstrap_without_symbols_refuses_to_start() -> None:
    with pytest.raises(UniverseError, match="found no symbol"):
        Universe(UniverseConfig(), lambda: {"symbols": []}).bootstrap()


def test_config_all_is_the_default_and_streams_need_resolved_symbols() -> None:
    cfg = load_data({}, ScreenerConfig, [])
    assert cfg.live.symbols == "all"
    with pytest.raises(ConfigError, match="resolved"):
        cfg.live.streams(("bookTicker",))
    assert cfg.live.streams(("bookTicker",), ["BTCUSDT"]) == ["btcusdt@bookTicker"]
    with pytest.raises(ConfigError):
        load_data({"live": {"symbols": []}}, ScreenerConfig, [])
    with pytest.raises(ConfigError, match="not USDⓈ-M symbol names"):
        load_data({"live": {"symbols": ["btc-usdt"]}}, ScreenerConfig, [])


_text = st.one_of(st.text(max_size=12), st.sampled_from(["BTCUSDT", "TRADING", "PERPETUAL", "USDT"]))
_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), _text),
                     lambda inner: st.one_of(st.lists(inner, max_size=4),
                                             st.dictionaries(_text, inner, max_size=5)), max_leaves=20)
_entry = st.fixed_dictionaries({}, optional={"symbol": _json, "status": _json, "quoteAsset": _json,
                                             "contractType": _json})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(_json, st.fixed_dictionaries({"symbols": st.lists(st.one_of(_entry, _json), max_size=8)})))
def test_fuzz_exchange_info_is_refused_or_counted_never_a_traceback(body: Any) -> None:
    try:
        sel = select_symbols(body, UniverseConfig())
    except UniverseError as exc:
        assert "\n" not in str(exc)
        return
    assert sel.listed == len(body["symbols"])
    assert len(sel.symbols) + sum(sel.refused.values()) <= sel.listed
    assert all(isinstance(s, str) for s in sel.symbols)


def test_live_mode_follows_a_listing_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """live.symbols = "all" in one process against the replay server: exchangeInfo lists S000-S003, then (at the
    next read, 1 s later) S002-S007. The new symbols are subscribed and reach the ranker; the delisted ones' events
    are dropped from then on."""
    import asyncio

    import orjson
    from tests.screener._scale import SyntheticMarket

    from cambium.core.config import load
    from cambium.market.binance_rest import RestClient
    from cambium.market.config import RestConfig
    from cambium.screener.live import run_live
    from cambium.screener.observability import ScreenerMetrics
    from cambium.screener.replay import Session

    cfg = load(Path("configs/screener/sample-replay.toml"), ScreenerConfig,
               ['live.symbols="all"', "live.universe.refresh_s=1", "live.gc_freeze=false"])
    session = Session(cfg)
    with SyntheticMarket(4.0, 8, "stress") as market:
        server = market.server
        assert server is not None
        server.exchange_info = orjson.dumps(exchange_info(market.names[:4]))

        async def go() -> Any:
            async def relist() -> None:
                await asyncio.sleep(0.5)
                server.exchange_info = orjson.dumps(exchange_info(market.names[2:]))

            task = asyncio.create_task(relist())
            rest = RestClient("futures", RestConfig(futures_url=market.rest))
            res = await run_live(cfg, market.ws, session, ScreenerMetrics(), rest=rest, duration_s=4.5)
            await task
            return res

        res = asyncio.run(go())
    assert res.universe_reads >= 1 and res.symbols == 6
    assert res.unsubscribed == 2 * len(cfg.features.streams)  # S000 and S001: UNSUBSCRIBEd, not just ignored
    assert sum(s.streams for s in res.shards) == 6 * len(cfg.features.streams)
    assert {"S004USDT", "S007USDT"} <= set(session.pipeline.ranker.scores())
