from __future__ import annotations

from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples" / "market"


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES
