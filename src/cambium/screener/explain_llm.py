"""Optional LLM rewording of explanations, always off the hot path and always with a valid fallback.

`ExplainLLM` is the strict interface: given chat messages, return the assistant's text. `OpenAICompatibleLLM` speaks
the OpenAI chat/completions JSON to any configured URL (a local llama.cpp/vLLM server, a hosted API). `Explainer`
asks it with a timeout, validates the answer with `explain.validate_output` and falls back to the deterministic
template on any failure (timeout, transport error, malformed JSON, a rule broken), counting why. With
`llm_enabled = false` (the default) no request is ever made. `BackgroundExplainer` runs an Explainer on its own event
loop thread so callers on the scoring path only enqueue work: the scores never wait for, nor depend on, the LLM.

Hosted endpoints need an API key: `explain.llm_api_key_env` names the environment variable that holds it (the key
itself is never in a config file); it is sent as `Authorization: Bearer <key>`, and an Explainer whose named variable
is unset or empty is refused at construction, in one line. `OpenAICompatibleLLM` keeps one `httpx.AsyncClient`
(connection pool, TLS session) for its lifetime, created on first use on the loop that uses it; `aclose` ends it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx
import orjson

from cambium.core.errors import ConfigError, ProtocolError
from cambium.screener.config import ExplainConfig
from cambium.screener.contracts import STATUSES, ExplainInput, ExplainOutput, decode
from cambium.screener.explain import render_input, template_output, validate_output

__all__ = ["BackgroundExplainer", "ExplainLLM", "Explainer", "Explanation", "OpenAICompatibleLLM", "api_key",
           "build_messages"]


class ExplainLLM(Protocol):
    async def complete(self, messages: list[dict[str, str]]) -> str:
        """The assistant's reply text for `messages`; raise on transport or protocol failure."""
        ...


@dataclass(frozen=True, slots=True)
class Explanation:
    output: ExplainOutput
    source: Literal["llm", "template"]
    problems: tuple[str, ...] = ()


def build_messages(inp: ExplainInput, cfg: ExplainConfig) -> list[dict[str, str]]:
    system = (
        "You explain one signal of a crypto market screener to a trader. Reply with only a JSON object with the "
        'keys "headline", "subtext", "status_label" and "tooltips" (an object from reason code to a short text). '
        "Use only the facts given. Never write a number that does not appear in the input. "
        f"status_label must be exactly the input status, one of: {', '.join(STATUSES)}. "
        f"Limits in characters: headline {cfg.max_headline_chars}, subtext {cfg.max_subtext_chars}, "
        f"each tooltip {cfg.max_tooltip_chars}; at most {cfg.max_tooltips} tooltips."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": render_input(inp)}]


class OpenAICompatibleLLM:
    """POSTs `{"model", "messages", "temperature": 0}` to `url` and returns choices[0].message.content; with
    `api_key`, sends it as `Authorization: Bearer`. One HTTP client for the object's lifetime (`aclose` ends it)."""

    def __init__(self, url: str, model: str, timeout_s: float, headers: dict[str, str] | None = None, *,
                 api_key: str | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.headers = {"content-type": "application/json", **(headers or {})}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.transport = transport
        self._client: httpx.AsyncClient | None = None
        self.clients_made = 0

    def _http(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            self._client = httpx.AsyncClient(timeout=self.timeout_s, transport=self.transport)
            self.clients_made += 1
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def complete(self, messages: list[dict[str, str]]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": 0,
                "response_format": {"type": "json_object"}}
        response = await self._http().post(self.url, content=orjson.dumps(body), headers=self.headers)
        if response.status_code != 200:
            raise ProtocolError(f"LLM endpoint {self.url} answered HTTP {response.status_code}")
        try:
            data: Any = orjson.loads(response.content)
            content = data["choices"][0]["message"]["content"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise ProtocolError(f"LLM endpoint {self.url} sent no choices[0].message.content: {exc!r}") from None
        if not isinstance(content, str):
            raise ProtocolError(f"LLM endpoint {self.url}: message content is {type(content).__name__}, not text")
        return content


def _strip_fence(text: str) -> str:
    text = text.strip()
    if text.startswith("```") and text.endswith("```"):
        text = text[3:-3]
        text = text.removeprefix("json")
    return text.strip()


class Explainer:
    """Template always; the LLM's answer instead when enabled, in time and valid. `counts` says what happened."""

    def __init__(self, cfg: ExplainConfig | None = None, llm: ExplainLLM | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        """`env` (default `os.environ`) holds the API key variable that `cfg.llm_api_key_env` names."""
        self.cfg = cfg or ExplainConfig()
        if llm is None and self.cfg.llm_enabled:
            llm = OpenAICompatibleLLM(self.cfg.llm_url, self.cfg.llm_model, self.cfg.llm_timeout_s,
                                      api_key=api_key(self.cfg, os.environ if env is None else env))
        self.llm = llm if self.cfg.llm_enabled else None
        self.counts: Counter[str] = Counter()

    def template(self, inp: ExplainInput) -> Explanation:
        return Explanation(template_output(inp, self.cfg), "template")

    async def explain(self, inp: ExplainInput) -> Explanation:
        if self.llm is None:
            self.counts["template_only"] += 1
            return self.template(inp)
        try:
            text = await asyncio.wait_for(self.llm.complete(build_messages(inp, self.cfg)), self.cfg.llm_timeout_s)
        except TimeoutError:
            return self._fallback(inp, "timeout", f"no answer within llm_timeout_s={self.cfg.llm_timeout_s}")
        except (httpx.HTTPError, ProtocolError) as exc:
            return self._fallback(inp, "transport", str(exc) or type(exc).__name__)
        try:
            output = decode(_strip_fence(text), ExplainOutput)
        except ProtocolError as exc:
            return self._fallback(inp, "malformed", str(exc))
        problems = validate_output(output, inp, self.cfg)
        if problems:
            return self._fallback(inp, "invalid", *problems)
        self.counts["llm_ok"] += 1
        return Explanation(output, "llm")

    def _fallback(self, inp: ExplainInput, why: str, *problems: str) -> Explanation:
        self.counts[f"fallback_{why}"] += 1
        return Explanation(template_output(inp, self.cfg), "template", (why, *problems))


def api_key(cfg: ExplainConfig, env: Mapping[str, str]) -> str | None:
    """The LLM API key from the variable `cfg.llm_api_key_env` names (None when it names none); ConfigError when
    the named variable is unset or empty."""
    name = cfg.llm_api_key_env
    if not name:
        return None
    key = env.get(name, "")
    if not key:
        raise ConfigError(f"explain.llm_api_key_env names {name}, which is unset or empty: export the API key "
                          "in it, or set llm_api_key_env = \"\" for an endpoint without a key")
    return key


class BackgroundExplainer:
    """Runs an Explainer on a private event-loop thread; `submit` never blocks the caller."""

    def __init__(self, explainer: Explainer) -> None:
        self.explainer = explainer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="screener-explain", daemon=True)
        self._thread.start()

    def submit(self, inp: ExplainInput) -> concurrent.futures.Future[Explanation]:
        return asyncio.run_coroutine_threadsafe(self.explainer.explain(inp), self._loop)

    def close(self) -> None:
        closer = getattr(self.explainer.llm, "aclose", None)
        if closer is not None and self._loop.is_running():
            with contextlib.suppress(Exception):  # the HTTP client's pool; nothing to report at shutdown
                asyncio.run_coroutine_threadsafe(closer(), self._loop).result(timeout=5)
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> BackgroundExplainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
