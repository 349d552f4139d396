#!/usr/bin/env python3
"""List imports that go up the floors of the `posterior` package, and import circles.

The package is built in floors: a module may import from its own floor and the floors below it,
never from a floor above (a prior must not need a sampler, a diagnostic must not run one). Every
import counts, also one inside a function or under ``if TYPE_CHECKING``: a deferred import still
makes the lower floor depend on the upper one, and hides the dependency from a reader.

    python3 .ci/floors.py            # prints each up-import and each circle; exit 1 if any

Plain Python (ast), no dependencies; tests/test_floors.py runs it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "posterior"

#: The floors, lowest first. A module belongs to the floor of the longest prefix that names it
#: (``posterior.priors`` covers ``posterior.priors.hf``); the bare package ``posterior`` (its lazy
#: facade, ``import posterior as pst``) is the top floor.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("validate", "errors", "lazy", "seeds", "streams", "threads", "offline", "export", "kernels")),
    ("priors", ("priors",)),
    ("rewards", ("rewards",)),
    ("twists", ("twists",)),
    ("diagnostics", ("diagnostics",)),
    ("exact", ("exact", "results", "fingerprints")),
    ("samplers", ("samplers",)),
    ("posterior", ("posterior", "generate")),  # posterior/posterior.py
    ("train", ("train",)),
    ("compare/overopt", ("compare", "overopt", "bounds")),
    ("batch", ("batch",)),
    ("serve", ("serve",)),
    # serve/cli.py is the `posterior serve` command: it builds on the shared CLI options.
    ("cli", ("cli", "serve.cli", "__main__", "testing", "")),  # "": the package facade itself
]


def floor_of(module: str) -> int:
    """Index into FLOORS of a dotted module name under PACKAGE; KeyError if no floor names it."""
    rel = module.split(".")[1:]
    for length in range(len(rel), -1, -1):
        key = ".".join(rel[:length])
        for i, (_, prefixes) in enumerate(FLOORS):
            if key in prefixes:
                return i
    raise KeyError(module)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(root: Path, path: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every import of a PACKAGE module in ``path``, wherever it sits.

    ``from a.b import c`` counts as an import of ``a.b.c`` when that is a module, else of ``a.b``.
    """
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in modules else base))
    return [(line, m) for line, m in out if m == PACKAGE or m.startswith(PACKAGE + ".")]


def scan(root: Path):
    """(up_imports, circles): up_imports are (file, line, importer, imported) tuples; circles are
    lists of modules, each a strongly connected component of the import graph (sorted)."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(root, f) for f in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    up = []
    for f in files:
        me = module_name(root, f)
        for line, target in imports(root, f, modules):
            if target == me:
                continue
            if target in modules:
                graph[me].add(target)
            if floor_of(target) > floor_of(me):
                up.append((str(f.relative_to(root)), line, me, target))
    return sorted(set(up)), circles(graph)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return sorted(out)


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    up, loops = scan(root)
    for path, line, me, target in up:
        print(f"up: {path}:{line}: {me} ({FLOORS[floor_of(me)][0]}) imports {target} ({FLOORS[floor_of(target)][0]})")
    for comp in loops:
        print("circle: " + " <-> ".join(comp))
    print(f"floors: {len(up)} up-import(s), {len(loops)} circle(s)")
    return 1 if up or loops else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
