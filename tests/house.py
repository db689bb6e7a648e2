"""The package's rooms and the rules between them, read from the source (``docs/development.md``, "Rooms").

What ``tests/test_house.py`` enforces and ``benchmarks/house.py`` prints: each module's room, the imports
between rooms (at module level, inside functions, or for type checking only: a dependency either way), the
cycles among rooms, the imports that go up the order below, the third-party packages a room must not import,
and the modules over :data:`MAX_LINES` lines. Nothing is imported: the source is parsed.

The order, bottom to top. A room imports only rooms below it; rooms on one level (``record`` and
``attend``: the write side and the read side of a store) never import each other.
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Literal

PACKAGE = "lightning_dualform"
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", PACKAGE)

#: room -> level (a room may import rooms of lower levels only)
LEVELS: dict[str, int] = {
    "foundation": 0,  # errors, argument checks, the version, dependency internals, compiled-kernel loading
    "optim": 1,  # the update rules as pure functions of per-step tables
    "store": 2,  # the HDF5 format: writer, readers, the certificate's bytes
    "layers": 3,  # the layer math on torch tensors: keys, values, a convolution's unfolding, weight sums
    "record": 4,  # the write side: the recording engine and its parts
    "attend": 4,  # the read side: passes over a store, the certificate's math
    "attribute": 5,  # attribution over a store: influence, the every-step replay, the metagradient
    "analysis": 5,
    "datasets": 5,
    "plots": 6,
    "studies": 7,  # the paper authors' measures and figures
    "adapters": 8,  # DualFormCallback, DualFormRecorder, DualFormAttentionLogger: they wire the sides together
    "cli": 9,
    "front door": 10,
}
FOUNDATION = {"errors", "_args", "_version", "_compat", "_native", "_float32_products", "_lazy", "_unwrap"}
#: top-level modules that serve one room: the pickle walker behind ``datasets.load_mnist_pickle``, and the
#: runs of attention over many queries that ``analysis`` (which re-exports them), the CLI and the demo share
PRIVATE_ROOMS = {"_array_pickle": "datasets", "query_runs": "analysis"}
#: record/'s modules that adapt a training loop to the engine and hand it the read side's certificate
ADAPTERS = {"record", "record.callback", "record.recorder", "record.attention_logging"}
#: room -> third-party packages its modules never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "store": ("torch", "lightning", "pytorch_lightning"),
    "record": ("h5py",),
    "adapters": ("h5py",),
    "optim": ("h5py", "lightning", "pytorch_lightning"),
    "layers": ("h5py", "lightning", "pytorch_lightning"),
}
#: a module longer than this has outgrown one job (the house's rule of thumb)
MAX_LINES = 700
#: imports against the order that are known and wait for their fix, with why (``tests/test_house.py`` checks that
#: each is still there, so that the list cannot outlive them)
KNOWN_UPWARD: dict[tuple[str, str], str] = {
    ("attend.inference", "attribute.influence"): "DualInference.influence, a door to attribute.influence() (issue "
    "23), while attribute/ replays a store through attend/replay.py: attend <-> attribute",
}

Kind = Literal["module", "function", "type-checking"]


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted below the package (``record.engine``)
    target: str  # imported module of the package (``attend.certificate``), or a third-party top-level name
    line: int
    kind: Kind
    internal: bool


def modules() -> dict[str, str]:
    """Every module of the package: dotted name below the package (``__init__`` for the package itself,
    ``store`` for ``store/__init__.py``) -> file path."""
    out = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, SRC)[: -len(".py")].replace(os.sep, ".")
            if rel.endswith(".__init__"):
                rel = rel[: -len(".__init__")]
            out[rel] = path
    return out


def room(module: str) -> str:
    """The room of a module (dotted below the package)."""
    head = module.split(".")[0]
    if module in ADAPTERS:
        return "adapters"
    if head in ("__init__", "__main__"):
        return "front door"
    if head in FOUNDATION:
        return "foundation"
    if head in PRIVATE_ROOMS:
        return PRIVATE_ROOMS[head]
    if head in LEVELS:
        return head
    raise KeyError(f"{module}: no room; add it to tests/house.py and docs/development.md")


def _resolve(name: str, known: dict[str, str]) -> str:
    """``lightning_dualform.a.b`` -> the longest known module ``a.b`` / ``a``."""
    parts = name.split(".")[1:]
    while parts:
        dotted = ".".join(parts)
        if dotted in known:
            return dotted
        parts.pop()
    return "__init__"


def imports(module: str, path: str, known: dict[str, str]) -> Iterator[Import]:
    """The imports of one module, with where they sit."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)

    def walk(node: ast.AST, kind: Kind) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inner: Kind = kind
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and kind == "module":
                inner = "function"
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                inner = "type-checking"
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield _one(module, alias.name, child.lineno, inner, known)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == PACKAGE:  # from lightning_dualform import _native
                    for alias in child.names:
                        yield _one(module, f"{PACKAGE}.{alias.name}", child.lineno, inner, known)
                elif child.module.startswith(PACKAGE + "."):
                    for alias in child.names:  # a submodule when one has that name, else the module itself
                        full = f"{child.module}.{alias.name}"
                        target = full if full.split(".", 1)[1] in known else child.module
                        yield _one(module, target, child.lineno, inner, known)
                else:
                    yield _one(module, child.module, child.lineno, inner, known)
            yield from walk(child, inner)

    yield from walk(tree, "module")


def _one(source: str, name: str, line: int, kind: Kind, known: dict[str, str]) -> Import:
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        return Import(source, _resolve(name, known), line, kind, True)
    return Import(source, name.split(".")[0], line, kind, False)


def all_imports() -> list[Import]:
    known = modules()
    found = [imp for mod, path in sorted(known.items()) for imp in imports(mod, path, known)]
    return list(dict.fromkeys(found))  # one per statement and target (``from x import a, b`` is one)


def cross_room(found: list[Import] | None = None) -> list[Import]:
    """Imports from one room into another."""
    found = all_imports() if found is None else found
    return [i for i in found if i.internal and room(i.source) != room(i.target)]


def upward(found: list[Import] | None = None, *, known: bool = False) -> list[Import]:
    """Imports of a room on the same level or above; those of :data:`KNOWN_UPWARD` only with ``known``."""
    return [i for i in cross_room(found) if LEVELS[room(i.target)] >= LEVELS[room(i.source)]
            and (known or (i.source, i.target) not in KNOWN_UPWARD)]


def room_cycles(found: list[Import] | None = None, *, known: bool = False) -> list[list[str]]:
    """Sets of rooms that import each other, directly or through others (strongly connected, size > 1); the
    imports of :data:`KNOWN_UPWARD` count only with ``known``."""
    graph: dict[str, set[str]] = defaultdict(set)
    for i in cross_room(found):
        if not known and (i.source, i.target) in KNOWN_UPWARD:
            continue
        graph[room(i.source)].add(room(i.target))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(LEVELS):
        if v not in index:
            connect(v)
    return out


def forbidden(found: list[Import] | None = None) -> list[Import]:
    """Third-party imports a room must not make (:data:`FORBIDDEN`)."""
    found = all_imports() if found is None else found
    return [i for i in found if not i.internal and i.target in FORBIDDEN.get(room(i.source), ())]


def reaches(room_name: str, package: str, found: list[Import] | None = None) -> list[list[str]]:
    """Chains of module-level imports by which a room's modules load ``package`` through other modules of the
    library (what :data:`FORBIDDEN`'s direct check does not see)."""
    found = all_imports() if found is None else found
    deps: dict[str, set[str]] = defaultdict(set)
    direct: set[str] = set()
    for i in found:
        if i.kind != "module":
            continue
        if i.internal:
            deps[i.source].add(i.target)
        elif i.target == package:
            direct.add(i.source)
    chains = []
    for start in sorted(m for m in modules() if room(m) == room_name):
        seen = {start: [start]}
        todo = [start]
        while todo:
            m = todo.pop(0)
            if m in direct and m != start and room(m) != room_name:
                chains.append(seen[m])
                break
            for t in sorted(deps[m]):
                if t not in seen:
                    seen[t] = seen[m] + [t]
                    todo.append(t)
    return chains


def long_modules(limit: int = MAX_LINES) -> dict[str, int]:
    """Modules over ``limit`` lines, longest first."""
    counts = {m: sum(1 for _ in open(p, encoding="utf-8")) for m, p in modules().items()}
    return dict(sorted(((m, n) for m, n in counts.items() if n > limit), key=lambda kv: -kv[1]))
