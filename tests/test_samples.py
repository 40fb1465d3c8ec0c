"""data/samples/: every committed file is listed in SOURCES.md with its sha256, and the total stays under 40 MB."""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def _listed() -> dict[str, tuple[int, str]]:
    rows = {}
    for line in (SAMPLES / "SOURCES.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and len(cells[6]) == 64 and cells[5].isdigit():
            rows[cells[0]] = (int(cells[5]), cells[6])
    return rows


def test_every_sample_is_listed_with_its_sha256() -> None:
    listed = _listed()
    files = {p.relative_to(SAMPLES).as_posix() for p in SAMPLES.rglob("*") if p.is_file()} - {"SOURCES.md"}
    assert files == set(listed), f"unlisted: {sorted(files - set(listed))}, missing: {sorted(set(listed) - files)}"
    for rel, (size, sha) in listed.items():
        data = (SAMPLES / rel).read_bytes()
        assert len(data) == size, rel
        assert hashlib.sha256(data).hexdigest() == sha, rel


def test_samples_stay_under_40_mb() -> None:
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < 40_000_000, f"data/samples holds {total / 1e6:.1f} MB; the budget is 40 MB"
