"""The package is layered like open_clip / transformers: configs, then the model, then the factory, then training.

The import graph of `lexvla` (every `from .x import` / `from lexvla.x import` / `import lexvla.x`, at module level
or inside functions) has no cycles; configs import no model code; the model does not import its factory.

    python tests/test_layering.py   # prints the graph, module -> imports
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "lexvla"


def imports_of(path: Path) -> set[str]:
    "The lexvla modules that module `path` imports anywhere in its body (function-level imports included)."
    mods = {p.stem for p in (ROOT / PKG).glob("*.py")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module: name = node.module          # from .x import y
            elif node.level == 1: names = [a.name for a in node.names]; found |= {n for n in names if n in mods}; continue
            elif node.module and node.module.startswith(PKG + "."): name = node.module[len(PKG) + 1:]
            elif node.module == PKG: found |= {a.name for a in node.names if a.name in mods}; continue
            else: continue
            found.add(name.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(PKG + ".")}
    return {m for m in found if m in mods and m != path.stem}


def import_graph() -> dict[str, set[str]]:
    "module -> the lexvla modules it imports, for every module of the package except `__init__` and `_modidx`."
    return {p.stem: imports_of(p) for p in sorted((ROOT / PKG).glob("*.py")) if not p.stem.startswith("_")}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    "Every import cycle, each as a path [a, b, ..., a] (depth-first search, one cycle per back edge)."
    found, state = [], {}
    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open": found.append(path[path.index(n):] + [n])
            elif n not in state: visit(n, path + [n])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state: visit(m, [m])
    return found


def test_no_import_cycles() -> None:
    assert not cycles(import_graph()), cycles(import_graph())


def test_layers() -> None:
    g = import_graph()
    assert not g["config"] & {"model", "pretrained", "train", "text", "vision"}, g["config"]   # configs: no model code
    assert "pretrained" not in g["model"] and "train" not in g["model"], g["model"]          # the model: no factory
    assert {"config", "model"} <= g["pretrained"], g["pretrained"]                            # the factory: both


def test_cycle_finder() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


if __name__ == "__main__":
    graph = import_graph()
    for m, deps in graph.items(): print(f"{m:12} -> {', '.join(sorted(deps)) or '-'}")
    found = cycles(graph)
    print("cycles:", found or "none")
    sys.exit(1 if found else 0)
