"""SCR-7: number extraction, output validation, the always-valid template, and the LLM path against a local server."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.screener.config import ExplainConfig
from cambium.screener.contracts import STATUSES, ExplainInput, ExplainOutput
from cambium.screener.explain import (
    allowed_numbers,
    extract_numbers,
    format_number,
    render_input,
    template_output,
    validate_output,
)
from cambium.screener.explain_llm import BackgroundExplainer, Explainer

from ._http import LocalServer, Reply

CFG = ExplainConfig()
INP = ExplainInput(symbol="BTCUSDT", timeframe="2m", status="WATCH", score=0.4213,
                   reasons=("TOXIC_GATE", "FLOW_BUY"),
                   numeric_summary={"spread_bps": 0.0162, "p_toxic": 0.41, "ret_bps_60s": -12.5,
                                    "mid": 61800.25})


@pytest.mark.parametrize(("text", "expected"), [
    ("score 0.42, up 5%", [("0.42", False, False), ("5", False, True)]),
    ("fell -12.5 bps then +3", [("-12.5", True, False), ("3", True, False)]),
    ("\u22127 and 61,800.25 and .5", [("-7", True, False), ("61800.25", False, False), ("0.5", False, False)]),
    ("2024-08-08 BTC-5 p2m", [("2024", False, False), ("8", False, False), ("8", False, False),
                              ("5", False, False), ("2", False, False)]),
    ("1,2345 and 12 %", [("1", False, False), ("2345", False, False), ("12", False, True)]),
    ("no digits here", []),
])
def test_extract_numbers(text: str, expected: list[tuple[str, bool, bool]]) -> None:
    got = [(n.value, n.signed, n.percent) for n in extract_numbers(text)]
    assert got == [(Decimal(v), s, p) for v, s, p in expected]


def test_format_number_is_fixed_point() -> None:
    assert [format_number(x) for x in (0.42131, 1e-7, -1e-7, 61800.25, 3.0, -12.5, 1e16)] == [
        "0.4213", "0", "0", "61800.25", "3", "-12.5", "10000000000000000"]


def _out(**over: object) -> ExplainOutput:
    base: dict[str, object] = dict(headline="BTCUSDT on watch: score 0.4213", status_label="WATCH",
                                   subtext="Toxicity 0.41 blocks trading; 60 s return -12.5 bps.",
                                   tooltips={"TOXIC_GATE": "p_toxic 0.41 is above the gate"})
    base.update(over)
    return ExplainOutput(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("over", "problem"), [
    ({}, None),
    ({"subtext": "fell 12.5 bps (sign left out)"}, None),
    ({"subtext": "score of 42.13%"}, None),
    ({"subtext": "mid at 61,800.25"}, None),
    ({"subtext": "toxicity 0.4"}, "'0.4'"),
    ({"subtext": "rose +12.5 bps"}, "'+12.5'"),
    ({"headline": "BTCUSDT in 3 minutes"}, "'3'"),
    ({"status_label": "TRADEABLE"}, "contradicts"),
    ({"status_label": "Bullish"}, "not one of"),
    ({"headline": "x" * 81}, "max_headline_chars=80"),
    ({"subtext": "y" * 281}, "max_subtext_chars=280"),
    ({"tooltips": {"SOMETHING_ELSE": "z"}}, "neither"),
    ({"tooltips": {"TOXIC_GATE": "z" * 161}}, "max_tooltip_chars"),
    ({"headline": "  "}, "empty"),
])
def test_validate_output(over: dict, problem: str | None) -> None:
    problems = validate_output(_out(**over), INP, CFG)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


symbol = st.from_regex(r"[A-Z0-9_]{1,32}", fullmatch=True)
code = st.from_regex(r"[A-Z][A-Z0-9_]{0,20}(:[A-Za-z0-9_.@]{1,20})?", fullmatch=True)
key = st.from_regex(r"[a-z0-9_]{1,40}", fullmatch=True)
value = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12) | st.sampled_from(
    [0.0, -0.0, 1e-9, -0.00004, 0.5, 99.99995])
inputs = st.builds(
    ExplainInput, symbol=symbol, timeframe=st.from_regex(r"[0-9]{1,3}[smh]", fullmatch=True),
    status=st.sampled_from(STATUSES), score=st.floats(0.0, 1.0),
    reasons=st.lists(code, max_size=16).map(tuple), numeric_summary=st.dictionaries(key, value, max_size=16),
    style=st.sampled_from(["short", "detailed"]))
configs = st.builds(ExplainConfig, max_headline_chars=st.integers(16, 120), max_subtext_chars=st.integers(16, 400),
                    max_tooltip_chars=st.integers(16, 200), max_tooltips=st.integers(0, 10))


@settings(max_examples=150, deadline=None)
@given(inp=inputs, cfg=configs)
def test_template_is_always_valid(inp: ExplainInput, cfg: ExplainConfig) -> None:
    out = template_output(inp, cfg)
    assert validate_output(out, inp, cfg) == []
    assert template_output(inp, cfg) == out
    assert allowed_numbers(inp) >= {n.value for n in extract_numbers(out.headline + " " + out.subtext)}


def _chat(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


GOOD = json.dumps({"headline": "BTCUSDT WATCH: score 0.4213", "subtext": "Toxicity 0.41 is above the gate.",
                   "status_label": "WATCH", "tooltips": {"TOXIC_GATE": "p_toxic 0.41"}})
REPLIES: dict[str, Reply] = {
    "/good": (200, _chat(GOOD), 0.0),
    "/fenced": (200, _chat(f"```json\n{GOOD}\n```"), 0.0),
    "/new_number": (200, _chat(GOOD.replace("0.41 is", "0.38 is")), 0.0),
    "/wrong_label": (200, _chat(GOOD.replace('"WATCH"', '"TRADEABLE"')), 0.0),
    "/too_long": (200, _chat(GOOD.replace("Toxicity", "Toxicity " + "very " * 80)), 0.0),
    "/malformed_content": (200, _chat('{"headline": "BTCUSDT", "subtext": '), 0.0),
    "/extra_key": (200, _chat(GOOD[:-1] + ', "mood": "happy"}'), 0.0),
    "/malformed_body": (200, b"<html>oops", 0.0),
    "/http_500": (500, b"{}", 0.0),
    "/slow": (200, _chat(GOOD), 3.0),
}


@pytest.fixture(scope="module")
def llm_server():  # type: ignore[no-untyped-def]
    with LocalServer(lambda path, body: REPLIES[path]) as server:
        yield server


@pytest.mark.parametrize(("path", "source", "why"), [
    ("/good", "llm", None), ("/fenced", "llm", None),
    ("/new_number", "template", "invalid"), ("/wrong_label", "template", "invalid"),
    ("/too_long", "template", "invalid"), ("/malformed_content", "template", "malformed"),
    ("/extra_key", "template", "malformed"), ("/malformed_body", "template", "transport"),
    ("/http_500", "template", "transport"), ("/slow", "template", "timeout"),
])
def test_llm_answers_and_fallbacks(llm_server: LocalServer, path: str, source: str, why: str | None) -> None:
    # A generous timeout except for the slow server (3 s answer): the machine running the tests may be busy.
    cfg = ExplainConfig(llm_enabled=True, llm_url=llm_server.url + path, llm_timeout_s=0.5 if why == "timeout" else 10)
    explainer = Explainer(cfg)
    result = asyncio.run(explainer.explain(INP))
    assert result.source == source
    assert validate_output(result.output, INP, cfg) == []
    if why is None:
        assert result.output.subtext == "Toxicity 0.41 is above the gate." and explainer.counts["llm_ok"] == 1
    else:
        assert result.problems[0] == why and explainer.counts[f"fallback_{why}"] == 1
        assert result.output == template_output(INP, cfg)
    sent = json.loads(llm_server.requests[-1][1])
    assert sent["messages"][1]["content"] == render_input(INP)


def test_llm_off_is_template_only_and_sends_nothing(llm_server: LocalServer) -> None:
    before = llm_server.count()
    explainer = Explainer(ExplainConfig(llm_enabled=False, llm_url=llm_server.url + "/good"))
    result = asyncio.run(explainer.explain(INP))
    assert result.source == "template" and result.output == template_output(INP, CFG)
    assert llm_server.count() == before


def test_background_explainer_does_not_block_the_caller(llm_server: LocalServer) -> None:
    cfg = ExplainConfig(llm_enabled=True, llm_url=llm_server.url + "/slow", llm_timeout_s=0.5)
    with BackgroundExplainer(Explainer(cfg)) as bg:
        futures = [bg.submit(INP) for _ in range(3)]
        assert not any(f.done() for f in futures)  # submit returned before the 3 s server answered
        results = [f.result(timeout=10) for f in futures]
    assert all(r.source == "template" and r.problems[0] == "timeout" for r in results)


def _good_answer() -> bytes:
    content = json.dumps({"headline": "BTCUSDT on watch", "subtext": "Toxic flow gate.", "status_label": "WATCH",
                          "tooltips": {}})
    return json.dumps({"choices": [{"message": {"content": content}}]}).encode()


def test_llm_sends_the_api_key_from_the_named_variable_and_reuses_one_client() -> None:
    import httpx

    from cambium.screener.explain_llm import OpenAICompatibleLLM, api_key

    cfg = ExplainConfig(llm_enabled=True, llm_url="https://llm.invalid/v1/chat/completions",
                        llm_api_key_env="CAMBIUM_TEST_LLM_KEY")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=_good_answer())

    llm = OpenAICompatibleLLM(cfg.llm_url, cfg.llm_model, cfg.llm_timeout_s,
                              api_key=api_key(cfg, {"CAMBIUM_TEST_LLM_KEY": "sk-test-123"}),
                              transport=httpx.MockTransport(handler))
    explainer = Explainer(cfg, llm)

    async def three() -> list[str]:
        out = [(await explainer.explain(INP)).source for _ in range(3)]
        await llm.aclose()
        return out

    assert asyncio.run(three()) == ["llm"] * 3
    assert [r.headers["authorization"] for r in seen] == ["Bearer sk-test-123"] * 3
    assert llm.clients_made == 1  # one HTTP client (one connection pool) for the three requests
    assert "sk-test-123" not in cfg.model_dump_json()  # the config names the variable, never holds the key


def test_llm_refuses_in_one_line_when_the_named_key_variable_is_unset() -> None:
    from cambium.core.errors import ConfigError

    cfg = ExplainConfig(llm_enabled=True, llm_api_key_env="CAMBIUM_TEST_LLM_KEY")
    with pytest.raises(ConfigError) as info:
        Explainer(cfg, env={})
    assert "CAMBIUM_TEST_LLM_KEY" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        Explainer(cfg, env={"CAMBIUM_TEST_LLM_KEY": ""})
    Explainer(cfg.model_copy(update={"llm_enabled": False}), env={})  # LLM off: no key needed
    Explainer(cfg.model_copy(update={"llm_api_key_env": ""}), env={})  # a local endpoint without a key
    with pytest.raises(ValueError, match="llm_api_key_env"):
        ExplainConfig(llm_api_key_env="sk-live-abc")  # a key pasted where the variable's name belongs
