"""One-way imports: core ← nn ← data/market ← systems ← (cli, demo, dashboard); no import cycles inside nn.

Parses every import in src/cambium and fails on an edge that points the wrong way, or between two systems; and parses
every import under src/cambium/nn (lazy ones included) and fails on a cycle between its modules, so a reference never
imports the fast path it checks (fla's `naive.py` is a leaf) and dispatchers sit above both.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cambium"
SYSTEMS = {"screener", "worldmodel", "moe", "nested", "morph"}
RANK = {"core": 0, "nn": 1, "data": 2, "market": 2, **dict.fromkeys(SYSTEMS, 3), "dashboard": 4, "demo": 5,
        "config_cli": 5, "cli": 6}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_file(module: str, src: Path) -> Path | None:
    """The file of a `cambium.…` module under `src` (a package's `__init__.py`), or None."""
    base = src.joinpath(*module.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, src: Path) -> list[tuple[int, str]]:
    """Every cambium module `path` imports, at any depth (a lazy import inside a function counts).

    `from pkg import name` is an edge to `pkg.name` where that is a module, else to `pkg` (its `__init__`)."""
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
                module = ".".join([*base, node.module] if node.module else base)
            elif node.module:
                module = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out.append((node.lineno, sub if _module_file(sub, src) else module))
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


def _module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(("cambium", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def import_cycles(room: str, src: Path = SRC) -> list[str]:
    """Each import cycle among the modules under `src/room`, as 'a → b (line n) → a (line m)'; [] for a DAG.

    Tarjan's strongly connected components: a component of two or more modules (or a module importing itself) holds
    a cycle; one cycle through it is reported, with the line of each import."""
    paths = {_module_name(p, src): p for p in sorted((src / room).rglob("*.py"))}
    edges = {name: {t: line for line, t in reversed(_imports(p, src)) if t in paths} for name, p in paths.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1 or node in edges[node]:
                components.append(component)

    for name in paths:
        if name not in index:
            visit(name)
    return [_one_cycle(sorted(c), edges) for c in components]


def _one_cycle(component: list[str], edges: dict[str, dict[str, int]]) -> str:
    """A path from the component's first module back to itself, staying inside the component."""
    start, inside = component[0], set(component)

    def walk(node: str, seen: list[str]) -> Iterator[list[str]]:
        for nxt in edges[node]:
            if nxt == start:
                yield [*seen, nxt]
            elif nxt in inside and nxt not in seen:
                yield from walk(nxt, [*seen, nxt])

    path = next(walk(start, [start]))
    return start + "".join(f" → {b} (line {edges[a][b]})" for a, b in pairwise(path))


@pytest.mark.parametrize("package", ["core", "nn", "data", "market", "screener", "worldmodel", "moe", "nested",
                                     "morph"])
def test_no_import_cycles(package: str) -> None:
    assert import_cycles(package) == []


@pytest.mark.parametrize(
    ("files", "expect"),
    [({"ref.py": "import torch\n", "fast.py": "from cambium.nn import ref\n"}, []),
     ({"ref.py": "def f():\n    from cambium.nn.fast import g\n", "fast.py": "from .ref import f\n"},
      ["cambium.nn.fast → cambium.nn.ref (line 1) → cambium.nn.fast (line 2)"]),
     ({"__init__.py": "from cambium.nn.a import x\n", "a.py": "from cambium.nn import b\n", "b.py": "x = 1\n"}, []),
     ({"__init__.py": "from cambium.nn.a import x\n", "a.py": "from cambium.nn import y\n"},
      ["cambium.nn → cambium.nn.a (line 1) → cambium.nn (line 1)"])],
)
def test_cycle_checker(tmp_path: Path, files: dict[str, str], expect: list[str]) -> None:
    fake = tmp_path / "cambium"
    (fake / "nn").mkdir(parents=True)
    for name, code in files.items():
        (fake / "nn" / name).write_text(code)
    assert import_cycles("nn", fake) == expect
