"""The package's modules import one way: no cycle, function-level imports included (ast walk)."""
import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "stellarparams"
MODULES = sorted(p.stem for p in PKG.glob("*.py"))


def _reexports() -> dict:
    """Names the package facade (__init__) takes from a submodule at its top level -> that submodule."""
    tree = ast.parse((PKG / "__init__.py").read_text())
    return {a.asname or a.name: n.module for n in tree.body
            if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module for a in n.names}


def imports_of(name: str) -> set:
    """Package modules that ``name`` imports anywhere in its source (top level or inside functions)."""
    out, facade = set(), _reexports()
    for node in ast.walk(ast.parse((PKG / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("stellarparams.")}
        elif isinstance(node, ast.ImportFrom):
            inside = node.level == 1 or (node.level == 0 and (node.module or "").split(".")[0] == "stellarparams")
            if not inside:
                continue
            module = node.module if node.level == 1 else ".".join((node.module or "").split(".")[1:])
            if module:
                out.add(module.split(".")[0])
            else:  # from . import x: a submodule, a name the facade re-exports, or the facade itself
                out |= {a.name if a.name in MODULES else facade.get(a.name, "__init__") for a in node.names}
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
    assert "prepare" in g["model_io"]          # imported inside Preprocessing.preprocessor only
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
            layers.update({m: int(cells[0]) for m in re.findall(r"`([\w]+)`", cells[1])})
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
