"""The package's modules import one way: no cycle, function-level imports included (ast walk)."""
import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "stellarparams"
SUBPACKAGES = ("surveys",)  # their modules are named "surveys.sdss", ...; the package's __init__ "surveys"


def _module_names() -> list:
    names = [p.stem for p in PKG.glob("*.py")]
    for sub in SUBPACKAGES:
        names += [sub if p.stem == "__init__" else f"{sub}.{p.stem}" for p in (PKG / sub).glob("*.py")]
    return sorted(names)


MODULES = _module_names()


def _source(name: str) -> Path:
    """The file of module ``name`` ("surveys" is the subpackage's __init__)."""
    if name in SUBPACKAGES:
        return PKG / name / "__init__.py"
    return PKG / (name.replace(".", "/") + ".py")


def _resolve(name: str, level: int, module: str | None) -> str:
    """The package module named by ``from <level dots><module>`` inside ``name`` ('' for the top package)."""
    parts = name.split(".")[:-1] if name not in SUBPACKAGES else [name]  # the importing module's package
    if level > 1:
        parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def _known(dotted: str) -> str:
    """The module of the table that a dotted name lies in: "surveys.sdss.x" -> "surveys.sdss", "files.x" -> "files"."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in MODULES:
            return ".".join(parts[:k])
    return parts[0]


def _reexports() -> dict:
    """Names the package facade (__init__) takes from a submodule at its top level -> that submodule."""
    tree = ast.parse((PKG / "__init__.py").read_text())
    return {a.asname or a.name: n.module for n in tree.body
            if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module for a in n.names}


def imports_of(name: str) -> set:
    """Package modules that ``name`` imports anywhere in its source (top level or inside functions)."""
    out, facade = set(), _reexports()
    for node in ast.walk(ast.parse(_source(name).read_text())):
        if isinstance(node, ast.Import):
            out |= {_known(a.name.split(".", 1)[1]) for a in node.names if a.name.startswith("stellarparams.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] != "stellarparams":
                continue
            module = _resolve(name, node.level, node.module) if node.level else \
                ".".join((node.module or "").split(".")[1:])
            if module and module not in SUBPACKAGES:
                out.add(_known(module))
            else:  # from . import x / from .surveys import x: a submodule, a facade name, or the package itself
                for a in node.names:
                    sub = f"{module}.{a.name}" if module else a.name
                    out.add(sub if sub in MODULES else module if module else facade.get(a.name, "__init__"))
    return out - {name}


def graph() -> dict:
    return {m: imports_of(m) for m in MODULES}


def find_cycle(g: dict):
    """One import cycle as a list of modules [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_walker_sees_function_level_imports_and_finds_a_planted_cycle():
    g = graph()
    assert "preprocess" in g["model_io"]       # imported inside Preprocessing.preprocessor only
    assert "prepare" not in g["model_io"]
    assert {"surveys.sdss", "surveys.base"} <= g["surveys.registry"] and "spectrum" in g["surveys.sdss"]
    assert "training" in g["calibrate"] and "uncertainty" in g["model_io"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_package_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def layer_table() -> dict:
    """{module: layer} from the table under "## Layers" in docs/design.md (the one place it is written)."""
    text = (PKG.parent / "docs" / "design.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            layers.update({m: int(cells[0]) for m in re.findall(r"`([\w.]+)`", cells[1])})
    return layers


LAYERS = layer_table()


def test_the_layer_table_is_read_from_the_docs():
    assert LAYERS["files"] < LAYERS["model"] < LAYERS["training"] < LAYERS["model_io"] < LAYERS["cli"]


def test_every_module_has_a_layer():
    assert set(MODULES) - set(LAYERS) == set(), "add these modules to the layer table in docs/design.md"
    assert set(LAYERS) - set(MODULES) == set(), "the layer table in docs/design.md names modules that do not exist"


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_layers_point_down(module):
    up = {n for n in imports_of(module) if n in LAYERS and LAYERS[n] >= LAYERS[module]}
    assert not up, f"{module} (layer {LAYERS[module]}) imports {sorted(up)} at its own layer or above"
