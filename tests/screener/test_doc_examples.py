"""docs/screener/contracts.md shows real outputs: every example block equals what the code computes from the capture."""

from __future__ import annotations

import re
from pathlib import Path

from cambium.screener.contracts import decode
from cambium.screener.digest import ReplayDigest, canonical_json
from cambium.screener.schema import FEATURE_SCHEMA_HASH

from .doc_examples import examples

DOC = Path(__file__).resolve().parents[2] / "docs" / "screener" / "contracts.md"


def test_doc_examples_match_the_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    found = dict(re.findall(r"<!-- example:(\w+) -->\n```json\n(.*?)\n```", text, flags=re.S))
    expected = examples()
    assert set(found) == set(expected)
    for name, obj in expected.items():
        assert decode(found[name], type(obj)) == obj, f"docs example {name!r} is stale; regenerate it"
    event = expected["rank_event"]
    assert canonical_json(event).decode() in text
    assert ReplayDigest().update(event) in text
    assert FEATURE_SCHEMA_HASH in text
