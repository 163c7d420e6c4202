"""The shape of the package, checked from its source: layers, no import circle, module sizes.

Every module of ``explaind_tl`` is parsed with ``ast`` and every import is collected, also the
ones inside functions and ``TYPE_CHECKING`` blocks (an import circle hidden in a function is
still a circle). The layers, bottom to top:

0. ``_version``, ``errors``, ``axes`` and the subpackages' ``__init__`` (which import nothing
   of ours: importing ``explaind_tl.run.storage`` must not load the recorder);
1. foundations: ``certificate``, ``attribution``, ``optim``, ``quadrature``, ``contraction``,
   ``metrics``, ``losses``;
2. the store: ``run.storage``, ``run.format``, and reading it safely: ``run.trust`` (stored
   import paths), ``run.validate`` (the manifest), ``run.checks`` (data files), ``run.codec``
   (pickle-free encodings);
3. the model seam: ``model.*`` (it stores and rebuilds models, so it sits below the run);
4. the run: ``run.*`` (recording, replay);
5. the engine: ``engine.*``;
6. results: ``questions``, ``plotting``;
7. the facade: ``explaind_tl`` itself (lazy; its imports are for type checkers).

A module may import from its own layer or lower ones, never higher, and never ``analyses``.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "explaind_tl"
MAX_LINES = 600

LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("explaind_tl._version", "explaind_tl.errors", "explaind_tl.axes",
         "explaind_tl.run", "explaind_tl.engine")),
    (1, ("explaind_tl.certificate", "explaind_tl.attribution", "explaind_tl.optim", "explaind_tl.optim_step",
         "explaind_tl.quadrature", "explaind_tl.contraction", "explaind_tl.metrics", "explaind_tl.losses")),
    (2, ("explaind_tl.run.storage", "explaind_tl.run.format", "explaind_tl.run.trust",
         "explaind_tl.run.validate", "explaind_tl.run.checks", "explaind_tl.run.codec")),
    (3, ("explaind_tl.model", "explaind_tl.model.*")),
    (4, ("explaind_tl.run.*",)),
    (5, ("explaind_tl.engine.*",)),
    (6, ("explaind_tl.questions", "explaind_tl.plotting")),
    (7, ("explaind_tl",)),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer(module: str) -> int:
    """The layer of a module (exact names first, then ``prefix.*`` patterns)."""
    for rank, names in LAYERS:
        if module in names:
            return rank
    for rank, names in LAYERS:
        if any(n.endswith(".*") and module.startswith(n[:-1]) for n in names):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


@functools.cache
def imports(module: str) -> set[str]:
    """Every module (of any package) that ``module`` imports, anywhere in its source."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if _is_package(module) else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    return out


@functools.lru_cache(maxsize=1)
def internal_graph() -> dict[str, set[str]]:
    return {m: {t for t in imports(m) if t in MODULES and t != m} for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_no_import_circle():
    graph = internal_graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    up = sorted(t for t in internal_graph()[module] if layer(t) > layer(module))
    assert not up, f"{module} (layer {layer(module)}) imports higher layers: " + ", ".join(
        f"{t} (layer {layer(t)})" for t in up
    )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_library_never_imports_the_studies(module):
    bad = sorted(t for t in imports(module) if t == "analyses" or t.startswith(("analyses.", "tests", "conftest")))
    assert not bad, f"{module} imports {bad}: explaind_tl must not depend on analyses/ or tests/"


def test_subpackages_load_nothing_themselves():
    for m in ("explaind_tl.run", "explaind_tl.engine", "explaind_tl.model"):
        ours = sorted(t for t in imports(m) if t.startswith("explaind_tl"))
        assert not ours, f"{m}/__init__.py imports {ours}; importing one submodule must not load the others"


def test_modules_stay_small():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_collector_sees_function_level_and_relative_imports(tmp_path):
    # the checks above are only as good as the import collector: it must see imports inside
    # functions and resolve relative ones
    src = "def f():\n    from .optim import build_optimizer\n    import explaind_tl.run.recorder\n"
    probe = "explaind_tl._layering_probe"
    MODULES[probe] = tmp_path / "probe.py"
    MODULES[probe].write_text(src)
    try:
        assert imports.__wrapped__(probe) >= {"explaind_tl.optim", "explaind_tl.run.recorder"}
    finally:
        del MODULES[probe]
