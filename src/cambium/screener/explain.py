"""Explanations: a deterministic template, output validation, and the number-extraction rule behind it.

An explanation may only restate what the input says. The input (`ExplainInput`) is rendered to one text by
`render_input` — the only thing an LLM is shown — and the *allowed numbers* are the numbers found in that text. An
output is valid when (`validate_output`):
- headline, subtext and every tooltip are non-empty-where-required and within the configured lengths,
- `status_label` is the input's status (one of `contracts.STATUSES`), tooltip keys are input reason codes or
  numeric-summary keys, and there are at most `max_tooltips`,
- every number in the headline, subtext and tooltips is an allowed number (rule below).

Number extraction (`extract_numbers`): a number is an optional sign, then digits with an optional fraction — plain
(`12`, `0.25`, `.5`) or with comma thousands groups (`61,800.2`) — then an optional `%` (one space allowed before it).
A `+`, `-` or `−` (U+2212) is a sign only when not preceded by a letter, digit, `_` or `.` (so `2024-08-08` is three
numbers, `BTC-5` has the unsigned 5). Digits inside words count (`p2m` holds 2), on both sides alike.
Matching: values compare as decimals (`0.50` = `0.5`, `61,800.2` = `61800.2`). A signed output number must equal an
allowed number; an unsigned one may equal an allowed number up to sign ("fell 12 bps" for −12); a percentage p% is
allowed when p or p/100 is allowed (so a score 0.42 may read "42%").

The template (`template_output`) is valid by construction for every valid input (a hypothesis test checks it): it
copies the rendered numbers verbatim, and cuts over-long text only at spaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

import msgspec

from cambium.screener.config import ExplainConfig
from cambium.screener.contracts import STATUSES, ExplainInput, ExplainOutput, PredictionSnapshot, RankEvent

__all__ = [
    "ALERT_EVENTS",
    "REASON_PHRASES",
    "ExtractedNumber",
    "alert_input",
    "allowed_numbers",
    "extract_numbers",
    "format_number",
    "render_input",
    "template_output",
    "validate_output",
    "with_explanation",
]

_NUMBER = re.compile(
    r"(?P<sign>(?<![\w.])[+\-\u2212])?"
    r"(?P<body>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<pct>\s?%)?"
)

REASON_PHRASES: dict[str, str] = {
    "HIGH_SCORE": "score clears the tradeable bar",
    "BELOW_TRADEABLE": "score below the tradeable bar",
    "LOW_SCORE": "little chance of a move that pays its costs",
    "TOXIC_FLOW": "a move is likely but the flow looks toxic",
    "TOXIC_GATE": "toxicity too high to trade",
    "LOW_UTILITY": "expected gain too small after costs",
    "STALE_BOOK": "order book updates are stale",
    "STALE_TRADES": "no recent trades",
    "WIDE_SPREAD": "spread too wide",
    "HIGH_IMPACT": "market impact too high",
    "FLOW_BUY": "taker buying dominates",
    "FLOW_SELL": "taker selling dominates",
}
_PREFIX_PHRASES = {"MISSING_STREAM:": "stream missing", "MISSING_FEATURE:": "feature missing"}


@dataclass(frozen=True, slots=True)
class ExtractedNumber:
    value: Decimal
    signed: bool
    percent: bool
    text: str


def format_number(value: float) -> str:
    """Fixed-point text with at most 4 decimals, no exponent, no trailing zeros, no "-0"."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def extract_numbers(text: str) -> list[ExtractedNumber]:
    out = []
    for m in _NUMBER.finditer(text):
        sign = m.group("sign") or ""
        value = Decimal(m.group("body").replace(",", ""))
        if sign in ("-", "\u2212"):
            value = -value
        out.append(ExtractedNumber(value, bool(sign), bool(m.group("pct")), m.group(0)))
    return out


def render_input(inp: ExplainInput) -> str:
    """The one text an explanation is built from (what the LLM sees, and where allowed numbers come from)."""
    lines = [
        f"symbol: {inp.symbol}",
        f"timeframe: {inp.timeframe}",
        f"status: {inp.status}",
        f"score: {format_number(inp.score)}",
        "reasons: " + ("; ".join(inp.reasons) if inp.reasons else "none"),
        "numeric_summary: " + ("; ".join(f"{k} = {format_number(v)}" for k, v in inp.numeric_summary.items())
                               if inp.numeric_summary else "none"),
        f"style: {inp.style}",
    ]
    return "\n".join(lines)


def allowed_numbers(inp: ExplainInput) -> frozenset[Decimal]:
    return frozenset(n.value for n in extract_numbers(render_input(inp)))


def _number_ok(n: ExtractedNumber, allowed: frozenset[Decimal], allowed_abs: frozenset[Decimal]) -> bool:
    candidates = [n.value] + ([n.value / 100] if n.percent else [])
    pool = allowed if n.signed else allowed_abs
    return any((c if n.signed else abs(c)) in pool for c in candidates)


def validate_output(out: ExplainOutput, inp: ExplainInput, cfg: ExplainConfig) -> list[str]:
    """Every rule `out` breaks, as readable problems (empty list = valid)."""
    problems: list[str] = []
    if out.status_label not in STATUSES:
        problems.append(f"status_label={out.status_label!r} is not one of {list(STATUSES)}")
    elif out.status_label != inp.status:
        problems.append(f"status_label={out.status_label!r} contradicts the input status {inp.status!r}")
    if not out.headline.strip():
        problems.append("headline is empty")
    if len(out.headline) > cfg.max_headline_chars:
        problems.append(f"headline has {len(out.headline)} characters > max_headline_chars={cfg.max_headline_chars}")
    if len(out.subtext) > cfg.max_subtext_chars:
        problems.append(f"subtext has {len(out.subtext)} characters > max_subtext_chars={cfg.max_subtext_chars}")
    if len(out.tooltips) > cfg.max_tooltips:
        problems.append(f"{len(out.tooltips)} tooltips > max_tooltips={cfg.max_tooltips}")
    keys = set(inp.reasons) | set(inp.numeric_summary)
    for key, text in out.tooltips.items():
        if key not in keys:
            problems.append(f"tooltip key {key!r} is neither an input reason nor a numeric_summary key")
        if len(text) > cfg.max_tooltip_chars:
            problems.append(f"tooltip {key!r} has {len(text)} characters > max_tooltip_chars={cfg.max_tooltip_chars}")
    allowed = allowed_numbers(inp)
    allowed_abs = frozenset(abs(v) for v in allowed)
    for where, text in [("headline", out.headline), ("subtext", out.subtext),
                        *((f"tooltips.{k}", v) for k, v in out.tooltips.items())]:
        for n in extract_numbers(text):
            if not _number_ok(n, allowed, allowed_abs):
                problems.append(f"{where} states the number {n.text.strip()!r} which is not in the input")
    return problems


def reason_phrase(code: str) -> str:
    if code in REASON_PHRASES:
        return REASON_PHRASES[code]
    for prefix, phrase in _PREFIX_PHRASES.items():
        if code.startswith(prefix):
            return f"{phrase}: {code[len(prefix):]}"
    return code


def _fit(text: str, limit: int) -> str:
    """`text` cut at a space to at most `limit` characters, marked with an ellipsis (never splits a number)."""
    if len(text) <= limit:
        return text
    words = text.split(" ")
    kept: list[str] = []
    size = 0
    for word in words:
        extra = len(word) + (1 if kept else 0)
        if size + extra + 2 > limit:
            break
        kept.append(word)
        size += extra
    return (" ".join(kept) + " …") if kept else "…"


def template_output(inp: ExplainInput, cfg: ExplainConfig) -> ExplainOutput:
    """The deterministic explanation; always passes `validate_output`."""
    headline = _fit(f"{inp.symbol} {inp.status}: score {format_number(inp.score)} over {inp.timeframe}",
                    cfg.max_headline_chars)
    parts = [reason_phrase(code) for code in inp.reasons] or ["no specific reason"]
    if inp.style == "detailed" and inp.numeric_summary:
        parts += [f"{k} {format_number(v)}" for k, v in inp.numeric_summary.items()]
    subtext = _fit("; ".join(parts), cfg.max_subtext_chars)
    tooltips: dict[str, str] = {}
    for code in inp.reasons:
        if len(tooltips) >= cfg.max_tooltips:
            break
        tooltips[code] = _fit(reason_phrase(code), cfg.max_tooltip_chars)
    return ExplainOutput(headline=headline, subtext=subtext, status_label=inp.status, tooltips=tooltips)


ALERT_EVENTS = ("ALERT_TRADABLE", "ALERT_TRAP")


def alert_input(event: RankEvent, pred: PredictionSnapshot) -> ExplainInput:
    """What an ALERT's explanation may use: the prediction's status and reasons, its score, and a numeric summary
    (probabilities to 3 places, the utility to 1 bp place), over the 2 m horizon the score weighs most."""
    summary = {"p_inplay_2m": round(pred.p_inplay_2m, 3), "p_toxic": round(pred.p_toxic, 3),
               "utility_bps_2m": round(pred.expected_utility_bps_2m, 1)}
    return ExplainInput(symbol=event.symbol, timeframe="2m", status=pred.status, score=event.score,
                        reasons=pred.reasons[:16], numeric_summary=summary, style="detailed")


def with_explanation(event: RankEvent, out: ExplainOutput) -> RankEvent:
    """The event as the notifiers see it: `payload.headline` and `payload.explanation` added (the digest and the
    store keep the event as ranked)."""
    return msgspec.structs.replace(event, payload={**event.payload, "headline": out.headline,
                                                   "explanation": out.subtext})
