"""The package's layers: every import inside `dcfast/` runs downward (or stays in its own layer), and no two
modules import each other in a circle, lazy imports inside functions included.

Layers, bottom to top; each `__init__.py` says what its folder owns and may import.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dcfast"
LAYERS = (
    ("kernels", ("dcfast._backend", "dcfast._C", "dcfast.kernels", "dcfast.ops")),
    ("engine", ("dcfast.engine",)),
    ("models", ("dcfast.models",)),
    ("io", ("dcfast.io",)),
    ("world", ("dcfast.world",)),
    ("eval", ("dcfast.eval",)),
    ("training", ("dcfast.training",)),
    ("experiments", ("dcfast.experiments",)),
    ("bench", ("dcfast.bench",)),
    ("cli", ("dcfast.cli",)),
    ("facade", ("dcfast",)),  # dcfast/__init__.py: the lazy public API, above everything
)


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest matching prefix."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no layer; add its folder to LAYERS"
    return best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: Set[str]) -> List[Tuple[str, int]]:
    """(dcfast module imported, line) for every import statement in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "dcfast"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "dcfast":
            for alias in node.names:  # `from dcfast.x import y`: y may be a module of its own
                child = f"{node.module}.{alias.name}"
                found.append((child if child in known else node.module, node.lineno))
    return found


def graph() -> Dict[str, List[Tuple[str, int]]]:
    known = modules()
    names = set(known) | {"dcfast._C"}  # the compiled extension
    return {name: imports_of(path, names) for name, path in known.items()}


def test_every_import_runs_down_the_layers():
    upward = []
    for source, targets in graph().items():
        if source == "dcfast":
            continue  # the facade imports every layer lazily, by design
        for target, line in targets:
            if target != "dcfast" and layer_of(target) > layer_of(source):
                upward.append(f"{source}:{line} imports {target} ({LAYERS[layer_of(source)][0]} -> "
                              f"{LAYERS[layer_of(target)][0]})")
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_module_imports_the_facade():
    """`dcfast/__init__.py` loads every layer lazily; a module importing it would tie itself to all of them."""
    offenders = [f"{s}:{line}" for s, targets in graph().items() for t, line in targets if t == "dcfast" and s != "dcfast"]
    assert not offenders, "modules importing dcfast's facade (import the module you need instead): " + ", ".join(offenders)


def test_no_import_circles():
    edges = {s: {t for t, _ in targets if t != s and t != "dcfast"} for s, targets in graph().items() if s != "dcfast"}
    # a package imports its own submodules through __init__; a submodule importing its package is an edge back
    state: Dict[str, int] = {}
    circles = []

    def visit(node: str, path: List[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_every_layer_says_what_it_owns_and_may_import(folder):
    doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
    assert doc and "import" in doc.lower(), f"dcfast/{folder}/__init__.py: say what it owns and what it may import"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself: an engine module importing the trainer is reported."""
    fake = tmp_path / "dcfast" / "engine" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from dcfast.training.trainer import train\n")
    [(target, line)] = imports_of(fake, {"dcfast.training.trainer"})
    assert target == "dcfast.training.trainer" and line == 2
    assert layer_of(target) > layer_of("dcfast.engine.bad")
