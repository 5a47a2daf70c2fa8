"""The package import rule (README "Architecture"), read from every import in the source.

Every ``import``/``from ... import`` statement is parsed with ``ast``, also those inside
functions, methods and ``if TYPE_CHECKING`` blocks: a lazy import is still a dependency. Each
subpackage may import only the ones below it in :data:`ORDER`; a family may import only its own
package (``families/__init__.py``, the family list, imports them all).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import medfuse

SRC = Path(medfuse.__file__).parent

ORDER = [
    "errors", "fileio", "dist", "config", "registry",                # bottom (dist: DDP collectives)
    "ssm", "layers", "text", "metrics", "losses", "data", "reports",  # blocks, data, metrics, reports
    "encoders",                                                      # foundation encoders
    "engine",                                                        # tasks, trainer, evaluate/predict, demo
    "families",                                                      # one package per family
    "cli", "api",                                                    # entry points (register the families)
    "__main__",                                                      # python -m medfuse (torchrun -m medfuse)
]
RANK = {name: i for i, name in enumerate(ORDER)}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, relative ones resolved."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # ``from medfuse import families`` names a subpackage through its parent
            if target == "medfuse":
                found += [(node.lineno, f"medfuse.{a.name}") for a in node.names]
    return [(line, t) for line, t in found if t == "medfuse" or t.startswith("medfuse.")]


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _family(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "families" else None


FILES = sorted(SRC.rglob("*.py"))


def test_every_subpackage_has_a_place_in_the_order():
    units = {_unit(_module_name(f)) for f in FILES} - {None}
    assert units <= set(ORDER), f"add {sorted(units - set(ORDER))} to ORDER (and to the README's architecture section)"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    me = _module_name(path)
    unit = _unit(me)
    bad = []
    for line, target in _imports(path):
        other = _unit(target)
        if other is None or unit is None or other == unit:
            if unit == "families" and other == "families":
                mine, theirs = _family(me), _family(target)
                if mine is not None and theirs is not None and mine != theirs:
                    bad.append(f"line {line}: family '{mine}' imports family '{theirs}' ({target})")
                if mine is not None and theirs is None:
                    bad.append(f"line {line}: a family imports the family list ({target})")
            continue
        if other not in RANK:
            continue  # the subpackage test above names it
        if RANK[other] >= RANK[unit]:
            bad.append(f"line {line}: {unit} imports {other} ({target}), which sits above it or beside it")
    assert not bad, f"{path.relative_to(SRC)}: " + "; ".join(bad)


def test_no_package_level_cycle():
    edges: dict[str, set[str]] = {}
    for f in FILES:
        u = _unit(_module_name(f))
        for _, target in _imports(f):
            v = _unit(target)
            if u and v and u != v:
                edges.setdefault(u, set()).add(v)
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(m):], m]))
            if m not in state:
                visit(m, [*stack, m])
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])


def test_the_engine_never_looks_up_hooks_on_a_model():
    hits = []
    for f in sorted((SRC / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("hasattr", "getattr"):
                hits.append(f"{f.name}:{node.lineno}")
    assert hits == [], f"hasattr/getattr in the engine: {hits}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    probe = SRC / "data" / "datamodule.py"
    lazy = [t for line, t in _imports(probe) if t.startswith("medfuse.data.")]
    assert lazy, "datamodule.py imports data modules inside functions; the parser must see them"
