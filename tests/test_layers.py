"""The package's modules import one way: no cycle, function-level imports included (ast walk)."""
import ast
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


# the model stack, bottom up: a module imports only modules of lower layers
LAYERS = {"_version": 0, "fastfits": 0, "files": 0, "records": 0, "physics": 0, "resample": 0, "config": 0, "outputs": 1, "workers": 0, "devices": 0, "engine": 0,
          "dataset": 1, "matching": 0, "sdss": 1, "spectrum": 1.5, "lamost": 1.6, "desi": 1.6, "tables": 1.6, "readers": 1.7,
          "prepare": 2,
          "model": 3, "augment": 3, "finetune": 3.5, "training": 4, "uncertainty": 4, "calibrate": 5, "model_io": 5,
          "plots": 1, "baselines": 3, "train": 6, "predict": 6, "evaluate": 6,
          "acquire": 6, "simulate_surveys": 5.5, "simulate": 6, "tune": 7, "benchmark": 7, "pipeline": 8, "__init__": 9, "cli": 10}


def test_every_module_has_a_layer():
    assert set(MODULES) == set(LAYERS)


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_layers_point_down(module):
    up = {n for n in imports_of(module) if n in LAYERS and LAYERS[n] >= LAYERS[module]}
    assert not up, f"{module} (layer {LAYERS[module]}) imports {sorted(up)} at its own layer or above"
