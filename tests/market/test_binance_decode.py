"""Decoding real Binance frames (lines quoted from the committed captures and Binance's documentation), and refusing
hostile ones: wrong JSON types, non-finite or absurd numbers (issue 14), and real frames mutated field by field."""

from __future__ import annotations

import gzip
from pathlib import Path

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.screener._hostile import hostile_frames, stream_frames

from cambium.market.binance import ControlReply, MalformedFrame, decode_binance, decode_binance_reference
from cambium.market.binance_wire import ENVELOPE_DECODER, MAX_NUM
from cambium.market.captures import iter_cryptofeed, iter_hftbacktest
from cambium.market.events import MarketEvent

USDM_BOOK = ('{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":5123107839020,"s":"BTCUSDT","b":"61800.20",'
             '"B":"2.507","a":"61800.30","A":"2.510","T":1723161256313,"E":1723161256313}}')
USDM_TRADE = ('{"stream":"btcusdt@trade","data":{"e":"trade","E":1723161256322,"T":1723161256322,"s":"BTCUSDT",'
              '"t":5266583935,"p":"61800.30","q":"0.006","X":"MARKET","m":false}}')
SPOT_BOOK = ('{"stream":"btcusdt@bookTicker","data":{"u":50093239212,"s":"BTCUSDT","b":"61837.63000000",'
             '"B":"3.78826000","a":"61837.64000000","A":"1.54698000"}}')
SPOT_TRADE = ('{"stream":"btcusdt@trade","data":{"e":"trade","E":1723161255343,"s":"BTCUSDT","t":3735683259,'
              '"p":"61837.63000000","q":"0.02000000","T":1723161255342,"m":true,"M":true}}')
MARK_ARR = ('{"stream":"!markPrice@arr","data":[{"e":"markPriceUpdate","E":1562305380000,"s":"BTCUSDT",'
            '"p":"11794.15000000","i":"11784.62659091","P":"11784.25641265","r":"0.00038167","T":1562306400000}]}')


def test_trades_and_book_tickers_futures_and_spot() -> None:
    (ev,) = decode_binance(USDM_BOOK, 7, "binance_usdm")
    assert (ev.ts, ev.symbol, ev.type, ev.recv_ts) == (1723161256313, "BTCUSDT", "book", 7)
    assert ev.payload == {"kind": "top", "bid": 61800.2, "bid_qty": 2.507, "ask": 61800.3, "ask_qty": 2.51,
                          "update_id": 5123107839020}
    (ev,) = decode_binance(USDM_TRADE, 7, "binance_usdm")
    assert ev.payload == {"price": 61800.3, "qty": 0.006, "side": "buy", "trade_id": 5266583935,
                          "trade_time": 1723161256322}
    (ev,) = decode_binance(SPOT_BOOK, 1723161254087891268, "binance_spot")
    assert ev.ts == 1723161254087 and ev.payload["bid"] == 61837.63  # spot bookTicker has no event time
    (ev,) = decode_binance(SPOT_TRADE, 1, "binance_spot")
    assert ev.payload["side"] == "sell" and ev.payload["qty"] == 0.02  # m=true: the buyer was maker, a taker sold


def test_depth_kline_and_mark_price(samples: Path) -> None:
    with gzip.open(samples / "ws/binance_usdm_hftbacktest/btcusdt_20240808.gz", "rt") as fh:
        depth_line = next(ln for ln in fh if "@depth@0ms" in ln[:60]).split(" ", 1)[1].rstrip("\n")
    raw = orjson.loads(depth_line)["data"]
    (ev,) = decode_binance(depth_line, 1, "binance_usdm")
    assert ev.type == "book" and ev.payload["kind"] == "diff" and ev.payload["prev_update_id"] == raw["pu"]
    assert ev.payload["bids"] == [[float(p), float(q)] for p, q in raw["b"]] and len(raw["b"]) > 10
    cf = samples / "ws/binance_cryptofeed/2021-07-22_usdm/BINANCE_FUTURES.ws.1.0.gz"
    with gzip.open(cf, "rt") as fh:
        kline_line = next(ln for ln in fh if '"x":true' in ln).split(": ", 1)[1].rstrip("\n")
    k = orjson.loads(kline_line)["data"]["k"]
    (ev,) = decode_binance(kline_line, 1, "binance_usdm")
    assert ev.type == "kline" and ev.payload["closed"] is True and ev.payload["interval"] == "1m"
    assert (ev.payload["open_time"], ev.payload["trades"], ev.payload["taker_buy_quote"]) == (k["t"], k["n"],
                                                                                              float(k["Q"]))
    (ev,) = decode_binance(MARK_ARR, 1, "binance_usdm")
    assert ev.type == "mark" and ev.payload == {"mark": 11794.15, "index": 11784.62659091, "settle": 11784.25641265,
                                                "funding_rate": 0.00038167, "next_funding_time": 1562306400000}


@pytest.mark.parametrize(
    "frame",
    ['{"stream":"btcusdt@trade","data":{"e":"trade","E":1723', "not json", '{"stream":"x"}', "[1,2,3]",
     '{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"T":1,"s":"BTCUSDT","t":1,"p":"abc","q":"1","m":true}}',
     '{"stream":"btcusdt@trade","data":{"e":"trade","E":1}}', '{"stream":"a","data":{"e":"somethingNew"}}',
     '{"data":{"e":"trade"}}', '{"stream":"a","data":"text"}'],
)
def test_malformed_frames_raise_malformed(frame: str) -> None:
    with pytest.raises(MalformedFrame):
        decode_binance(frame, 1, "binance_usdm")


def test_control_replies() -> None:
    assert decode_binance('{"result":null,"id":3}', 1, "x") == ControlReply(3, None)
    assert decode_binance('{"code":2,"msg":"Invalid request","id":4}', 1, "x") == ControlReply(
        4, "code=2 msg=Invalid request")
    assert decode_binance('{"error":{"code":1,"msg":"bad"},"id":5}', 1, "x") == ControlReply(5, "code=1 msg=bad")


def outcome(decode: object, frame: str | bytes) -> str:
    """What a decoder makes of a frame, as text that tells every float bit apart (repr; -0.0 is not 0.0)."""
    try:
        out = decode(frame, 7, "binance_usdm")  # type: ignore[operator]
    except MalformedFrame as exc:
        return f"MalformedFrame: {exc}"
    if isinstance(out, ControlReply):
        return repr(out)
    return repr([ev.to_dict() for ev in out])


def test_fast_decoder_equals_the_reference_on_every_committed_frame(samples: Path) -> None:
    ws = samples / "ws"
    records = [*iter_hftbacktest(ws / "binance_usdm_hftbacktest/btcusdt_20240808.gz"),
               *iter_hftbacktest(ws / "binance_usdm_hftbacktest/ethusdt_20240808.gz"),
               *iter_cryptofeed(ws / "binance_cryptofeed/2021-07-22_usdm/BINANCE_FUTURES.ws.1.0.gz")]
    fast_path = 0
    for r in records:
        assert outcome(decode_binance, r.frame) == outcome(decode_binance_reference, r.frame), r.frame[:200]
        try:
            ENVELOPE_DECODER.decode(r.frame)
            fast_path += 1
        except msgspec.ValidationError:
            pass
    assert len(records) > 170_000
    assert fast_path > 0.99 * len(records)  # the comparison above is about the fast path, not the fallback


BOOK = ('{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":1,"s":"BTCUSDT","b":"1.5","B":"2","a":"1.6",'
        '"A":"3","T":1,"E":5%s}}')


@pytest.mark.parametrize(
    "frame",
    [
        BOOK % ',"X":"\xff"',
        (BOOK % ',"X":"\xff"').encode("latin-1"),  # not UTF-8 in a field neither decoder reads
        BOOK % ',"X":"\ud800"',  # a lone surrogate
        BOOK % ',"X":"\\ud800"',
        (BOOK % "").replace('"b":"1.5"', '"b":"-0"'),  # msgspec alone would read +0.0
        (BOOK % "").replace('"b":"1.5"', '"b":" 1.5"'),
        (BOOK % "").replace('"b":"1.5"', '"b":"1_5"'),
        (BOOK % "").replace('"b":"1.5"', '"b":1e999'),
        (BOOK % "").replace('"b":"1.5"', '"b":true'),
        (BOOK % "").replace('"b":"1.5"', '"b":"nan"'),
        (BOOK % "").replace('"u":1', '"u":"1"'),  # passed through as it is, never coerced
        (BOOK % "").replace('"stream":"btcusdt@bookTicker"', '"stream":5'),
        (BOOK % "").replace(',"E":5', ',"E":null'),
        BOOK % ',"E":7',
        BOOK % " xyz",
        (BOOK % "").encode(),
        b"\xef\xbb\xbf" + (BOOK % "").encode(),
        SPOT_BOOK,
        MARK_ARR,
        '{"stream":"x","data":[]}',
        '{"stream":"x","data":null,"id":1}',
        '{"stream":"a","data":{"e":"trade","E":1,"T":1,"s":"A","t":1,"p":"1","q":"1","m":"false"}}',
        '{"stream":"a","data":{"e":"aggTrade","E":1,"T":1,"s":"A","a":9,"p":"1","q":"1","m":true}}',
        '{"stream":"a","data":{"e":"trade","E":1,"T":1,"s":"A","t":1,"p":"1","q":"1","m":true,"e":"kline"}}',
        '{"stream":"d","data":{"e":"depthUpdate","E":1,"s":"S","U":1,"u":2,"b":[["1","2","3"]],"a":[]}}',
        '{"stream":"d","data":{"e":"depthUpdate","E":1,"s":"S","U":1,"u":2,"b":["12"],"a":[]}}',
        '{"stream":"d","data":{"e":"depthUpdate","E":1,"s":"S","U":1,"u":2,"b":[[1,2]],"a":[[true,2]]}}',
        '{"stream":"d","data":{"e":"depthUpdate","E":1,"s":"S","U":1,"u":2,"b":[],"a":[["1e5","0.0"]],"pu":0}}',
        '[{"stream":"d"}]',
    ],
)
def test_fast_decoder_equals_the_reference_on_odd_frames(frame: str | bytes) -> None:
    assert outcome(decode_binance, frame) == outcome(decode_binance_reference, frame)


DECIMAL = st.from_regex(r"-?[0-9]{1,22}(\.[0-9]{0,22})?([eE][-+]?[0-9]{1,3})?", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(prices=st.lists(st.one_of(DECIMAL, st.text(max_size=8)), min_size=6, max_size=6))
def test_fast_decoder_reads_prices_and_sizes_exactly_as_float_does(prices: list[str]) -> None:
    b, B, a, A, p, q = (orjson.dumps(x).decode() for x in prices)
    book = f'{{"stream":"s","data":{{"e":"bookTicker","u":1,"s":"S","b":{b},"B":{B},"a":{a},"A":{A},"E":2}}}}'
    depth = f'{{"stream":"s","data":{{"e":"depthUpdate","E":1,"s":"S","U":1,"u":2,"b":[[{b},{B}]],"a":[[{p},{q}]]}}}}'
    trade = f'{{"stream":"s","data":{{"e":"trade","E":1,"T":1,"s":"S","t":1,"p":{p},"q":{q},"m":false}}}}'
    for frame in (book, depth, trade):
        assert outcome(decode_binance, frame) == outcome(decode_binance_reference, frame)


TRADE = USDM_TRADE.replace('"X":"MARKET",', "")
KLINE = ('{"stream":"btcusdt@kline_1m","data":{"e":"kline","E":1,"s":"BTCUSDT","k":{"t":1,"T":2,"s":"BTCUSDT","i":"1m",'
         '"o":"1","c":"1","h":"1","l":"1","v":"1","n":3,"x":false,"q":"1","V":"1","Q":"1"}}}')
DEPTH = '{"stream":"d","data":{"e":"depthUpdate","E":1,"s":"S","U":1,"u":2,"pu":0,"b":[["1","2"]],"a":[]}}'


@pytest.mark.parametrize(
    "frame",
    [
        TRADE.replace('"s":"BTCUSDT"', '"s":5'),  # issue 14: a number where the symbol belongs
        TRADE.replace('"E":1723161256322', '"E":"1723161256322"'),  # issue 14: a string event time
        TRADE.replace('"p":"61800.30"', '"p":"NaN"'),  # issue 14
        TRADE.replace('"p":"61800.30"', '"p":1e400'),  # issue 14
        TRADE.replace('"q":"0.006"', '"q":"inf"'),
        TRADE.replace('"q":"0.006"', '"q":"1e16"'),  # absurd: beyond MAX_NUM
        TRADE.replace('"m":false', '"m":"false"'),  # the lax fast path would make this False, float() of it "sell"
        TRADE.replace('"t":5266583935', '"t":"5266583935"'),
        TRADE.replace('"T":1723161256322', '"T":1.5'),
        TRADE.replace('"E":1723161256322', '"E":18446744073709551617'),  # beyond 64 bits: orjson reads a float
        TRADE.replace('"E":1723161256322', '"E":9223372036854775808'),  # int64 + 1
        TRADE.replace('"E":1723161256322', '"E":true'),
        TRADE.replace('"s":"BTCUSDT"', '"s":null'),
        USDM_BOOK.replace('"u":5123107839020', '"u":"5123107839020"'),
        USDM_BOOK.replace('"E":1723161256313', '"E":"1723161256313"'),
        USDM_BOOK.replace('"b":"61800.20"', '"b":"nan"'),
        USDM_BOOK.replace('"b":"61800.20"', '"b":1e999'),
        USDM_BOOK.replace('"B":"2.507"', '"B":true'),
        DEPTH.replace('["1","2"]', '["nan","2"]'),
        DEPTH.replace('["1","2"]', '["1","1e400"]'),
        DEPTH.replace('"pu":0', '"pu":"0"'),
        DEPTH.replace('"U":1', '"U":[1]'),
        KLINE.replace('"o":"1"', '"o":"NaN"'),
        KLINE.replace('"x":false', '"x":"false"'),
        KLINE.replace('"n":3', '"n":"3"'),
        MARK_ARR.replace('"p":"11794.15000000"', '"p":"inf"'),
        MARK_ARR.replace('"r":"0.00038167"', '"r":"NaN"'),
        MARK_ARR.replace('"E":1562305380000', '"E":"x"'),
    ],
)
def test_wrong_json_types_and_non_finite_numbers_are_refused_by_both_decoders(frame: str) -> None:
    for decode in (decode_binance, decode_binance_reference):
        with pytest.raises(MalformedFrame) as info:
            decode(frame, 1, "binance_usdm")
        # orjson refuses a number beyond float range as JSON; everything else is a bad payload
        assert info.value.reason == ("json" if ":1e4" in frame or ":1e9" in frame else "payload"), decode


@pytest.mark.parametrize("frame", ['{"id":1,"error":"refused"}', '{"id":1,"error":5}', '{"id":1,"error":null}'])
def test_odd_control_replies_are_malformed_not_a_traceback(frame: str) -> None:
    with pytest.raises(MalformedFrame):
        decode_binance(frame, 1, "binance_usdm")


def test_malformed_frames_carry_a_reason() -> None:
    reasons = {}
    for frame in ("not json", "[1]", '{"stream":"x"}', '{"stream":"a","data":{"e":"new"}}', TRADE.replace('"m":false',
                                                                                                            '"m":1')):
        with pytest.raises(MalformedFrame) as info:
            decode_binance(frame, 1, "x")
        reasons[frame[:12]] = info.value.reason
    assert list(reasons.values()) == ["json", "json", "envelope", "event", "payload"]


def _assert_clean(events: list[MarketEvent]) -> None:
    """What the screener relies on after decoding: int64 times, str symbols, finite prices and sizes in range."""
    for ev in events:
        assert type(ev.ts) is int and -(2**63) <= ev.ts < 2**63 and type(ev.symbol) is str
        p = ev.payload
        numbers = [v for k, v in p.items() if k in ("price", "qty", "bid", "bid_qty", "ask", "ask_qty")]
        numbers += [x for side in ("bids", "asks") for level in p.get(side, ()) for x in level]
        assert all(type(x) is float and 0.0 <= x <= MAX_NUM for x in numbers), p
        if ev.type == "trade":
            assert p["side"] in ("buy", "sell") and type(p["trade_id"]) is int and type(p["trade_time"]) is int


@settings(max_examples=250, deadline=None)
@given(frame=hostile_frames(stream_frames()))
def test_mutated_real_frames_decode_as_the_reference_does_or_are_refused(frame: str) -> None:
    """Fuzz: a real frame with one field mutated gives clean events from both decoders, or MalformedFrame from both."""
    fast, reference = outcome(decode_binance, frame), outcome(decode_binance_reference, frame)
    # The one documented difference (binance_wire.py): 1e400 in a field neither reads, skipped by msgspec.
    if not reference.startswith("MalformedFrame: not JSON: number is infinity"):
        assert fast == reference
    try:
        out = decode_binance(frame, 7, "binance_usdm")
    except MalformedFrame:
        return
    if not isinstance(out, ControlReply):
        _assert_clean(out)
