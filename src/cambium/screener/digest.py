"""Canonical JSON of RankEvents and the chained sha256 replay digest.

A replay is deterministic when it emits the same RankEvents, so the digest hashes a canonical text of each event:
keys sorted, no whitespace, strings as ASCII-escaped JSON, integers as written, and every float in a fixed-point
form with `FLOAT_DECIMALS` decimals (no exponent, "-0" normalised to "0"). Fixed decimals rather than the shortest
round-trip repr keep the digest independent of the JSON library's float formatter, and make it insensitive to
last-bit differences of libm between machines unless they move the 9th decimal.

    digest_0 = sha256(b"")                       (the empty chain)
    digest_i = sha256(digest_{i-1} || canonical_json(event_i))   with digest_{i-1} as 32 raw bytes
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from typing import Any

from cambium.core.errors import ProtocolError
from cambium.screener.contracts import RankEvent, to_builtins

__all__ = ["FLOAT_DECIMALS", "ReplayDigest", "canonical_json", "canonical_value"]

FLOAT_DECIMALS = 9


def _float_text(value: float) -> str:
    if not math.isfinite(value):
        raise ProtocolError(f"canonical JSON cannot hold the non-finite float {value!r}")
    text = f"{value:.{FLOAT_DECIMALS}f}"
    if text.startswith("-") and text.strip("-0.") == "":
        text = text[1:]
    return text


def canonical_value(value: Any) -> str:
    """Canonical JSON text of a plain value (dict keys must be strings; tuples are arrays)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, list | tuple):
        return "[" + ",".join(canonical_value(v) for v in value) + "]"
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ProtocolError(f"canonical JSON needs string keys, got {key!r}")
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=True)}:{canonical_value(value[k])}"
                              for k in sorted(value)) + "}"
    raise ProtocolError(f"canonical JSON cannot hold a {type(value).__name__}: {value!r}")


def canonical_json(event: RankEvent) -> bytes:
    """The canonical UTF-8 (pure ASCII) JSON bytes of a RankEvent."""
    data = to_builtins(event)
    # `score` is a float field: an int-valued score must still print as a float so 1 and 1.0 hash alike.
    data["score"] = float(event.score)
    return canonical_value(data).encode("ascii")


class ReplayDigest:
    """Chained sha256 over the canonical JSON of each RankEvent, in order."""

    def __init__(self) -> None:
        self._state = hashlib.sha256(b"").digest()
        self.count = 0

    def update(self, event: RankEvent) -> str:
        self._state = hashlib.sha256(self._state + canonical_json(event)).digest()
        self.count += 1
        return self._state.hex()

    def update_all(self, events: Iterable[RankEvent]) -> str:
        for event in events:
            self.update(event)
        return self.hexdigest()

    def hexdigest(self) -> str:
        """The current digest as 64 lowercase hex characters."""
        return self._state.hex()
