"""The package's import graph, from its source (``ast``; imports inside functions count too):
modules at the top level, packages, import circles (strongly connected components of more than
one module), and imports that run upward through the rooms of ``LAYERS``.

    python bench/import_graph.py [--json bench/results/import_graph.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "autoquant"

#: the package's rooms, top to bottom (README, "Layout"): a module imports its own room and the
#: rooms below it, never one above. ``helpers`` are the ``autoquant._*`` modules.
LAYERS = ("cli", "explore", "search", "scoring", "export", "plans", "runtime", "generation",
          "models", "backends", "helpers")


def room(mod: str) -> str | None:
    """The room of ``autoquant.x...`` (None: a module no room holds -- add it to ``LAYERS``)."""
    part = mod.split(".")[1] if "." in mod else ""
    if part == "__main__":
        return "cli"
    if part.startswith("_"):
        return "helpers"
    return part if part in LAYERS else None


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a room into one above it (and from or into a module of no room)."""
    out = []
    for a, targets in edges.items():
        for b in targets:
            ra, rb = room(a), room(b)
            if ra is None or rb is None or LAYERS.index(rb) < LAYERS.index(ra):
                out.append((a, b))
    return sorted(out)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """``autoquant.x.y`` -> file, for every module of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, mods: dict) -> str | None:
    """The package module ``name`` refers to (itself, or the nearest enclosing module)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> the package modules it imports`` (anywhere in its body)."""
    mods = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[:len(up) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                found = _resolve(t, mods)
                if found and found != mod and found.startswith("autoquant"):
                    edges[mod].add(found)
    # a package's __init__ that is only reached through ``from . import x`` forms no real edge:
    # keep the edge to the submodule, drop the one to the package itself when both are there
    for mod, targets in edges.items():
        for t in list(targets):
            if any(o.startswith(t + ".") for o in targets) and t != "autoquant":
                targets.discard(t)
    edges.pop("autoquant", None)  # the lazy top-level namespace imports nothing at import time
    for targets in edges.values():
        targets.discard("autoquant")
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
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

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def summary(root: Path = ROOT) -> dict:
    mods = modules(root)
    edges = graph(root)
    top = [m for m, p in mods.items() if m.count(".") == 1 and p.name != "__init__.py"]
    packages = sorted(m for m, p in mods.items() if p.name == "__init__.py" and m != "autoquant")
    found = cycles(edges)
    return {"modules": len(mods), "top_level_modules": len(top), "packages": packages,
            "cycles": found, "modules_in_cycles": sum(len(c) for c in found),
            "edges": sum(len(t) for t in edges.values()),
            "upward": [list(e) for e in upward(edges)],
            "rooms": {r: sorted(m for m in mods if room(m) == r) for r in LAYERS}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    s = summary()
    print(f"{s['modules']} modules, {s['top_level_modules']} flat in autoquant/, "
          f"{len(s['packages'])} packages ({', '.join(s['packages'])}), {s['edges']} imports")
    print(f"{len(s['cycles'])} import circle(s), {s['modules_in_cycles']} modules in them")
    for c in s["cycles"]:
        print("  circle:", " ".join(c))
    print(f"{len(s['upward'])} import(s) running upward through the rooms "
          f"({' > '.join(LAYERS)})")
    for a, b in s["upward"]:
        print(f"  upward: {a} -> {b}")
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
