"""One-way imports: core ← nn ← data/market ← systems ← (cli, demo, dashboard).

Parses every import in src/cambium and fails on an edge that points the wrong way, or between two systems.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cambium"
SYSTEMS = {"screener", "worldmodel", "moe", "nested", "morph"}
RANK = {"core": 0, "nn": 1, "data": 2, "market": 2, **dict.fromkeys(SYSTEMS, 3), "dashboard": 4, "demo": 5,
        "config_cli": 5, "cli": 6}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, src: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(("cambium", *path.relative_to(src).with_suffix("").parts))
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + ".__init__"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: -node.level]
                out.append((node.lineno, ".".join([*base, node.module] if node.module else base)))
            elif node.module:
                out.append((node.lineno, node.module))
    return [(line, name) for line, name in out if name == "cambium" or name.startswith("cambium.")]


def wrong_way_edges(src: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        src_room = rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else ""
        if src_room not in RANK:
            continue
        for line, target in _imports(path, src):
            dst_room = _room(target)
            if dst_room in ("", src_room) or dst_room == "__init__":
                continue
            if dst_room not in RANK:
                bad.append(f"{rel}:{line} imports {target}: unknown room {dst_room!r} (add it to RANK)")
            elif RANK[dst_room] >= RANK[src_room]:
                bad.append(f"{rel}:{line} imports {target}: {src_room} may not import {dst_room}")
    return bad


def test_imports_point_one_way() -> None:
    assert wrong_way_edges() == []


def test_every_room_is_ranked() -> None:
    rooms = {p.name.removesuffix(".py") for p in SRC.iterdir() if not p.name.startswith("_")}
    rooms.discard("py.typed")
    assert rooms <= set(RANK), f"rooms without a rank: {sorted(rooms - set(RANK))}"


@pytest.mark.parametrize(
    ("room", "code", "expect_bad"),
    [("core", "from cambium.nn import fsq\n", True), ("nn", "import cambium.core.config\n", False),
     ("moe", "from cambium.nested import x\n", True), ("market", "from ..core import errors\n", False)],
)
def test_checker_catches_wrong_edges(tmp_path: Path, room: str, code: str, expect_bad: bool) -> None:
    fake = tmp_path / "cambium"
    (fake / room).mkdir(parents=True)
    (fake / room / "mod.py").write_text(code)
    assert bool(wrong_way_edges(fake)) is expect_bad
