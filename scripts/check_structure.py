"""Structural rules of the package, checked by ``scripts/test`` before the suite runs.

* no module over :data:`MAX_MODULE` lines and no function over :data:`MAX_FUNCTION` lines;
* no import cycle among ``shardfix`` modules, counting every import statement (function-level
  imports included);
* production code reads no ``SHARDFIX_TEST`` variable (fault injection goes through the task context).

Usage: ``python scripts/check_structure.py [PACKAGE_DIR]``; exits 1 listing every violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE = 400
MAX_FUNCTION = 80


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, package: str, modules: set[str]) -> list[str]:
    """Modules an import statement makes this module depend on: ``from pkg import sub`` is ``pkg.sub``
    (a parent package is always imported before its children, so that alone makes no cycle)."""
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            out += [s if s in modules else node.module for s in subs]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == package]
    return out


def _resolve(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name or None


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def check(root: Path) -> list[str]:
    problems: list[str] = []
    files = sorted(root.rglob("*.py"))
    modules = {_module_name(p, root): p for p in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        text = path.read_text()
        lines = text.count("\n") + 1
        if lines > MAX_MODULE:
            problems.append(f"{path}: {lines} lines (at most {MAX_MODULE})")
        if "SHARDFIX_TEST" in text:
            problems.append(f"{path}: mentions SHARDFIX_TEST (test hooks go through the task context)")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION:
                    problems.append(f"{path}:{node.lineno}: {node.name} is {length} lines (at most {MAX_FUNCTION})")
        for target in _imports(tree, root.name, set(modules)):
            dep = _resolve(target, set(modules))
            if dep is not None and dep != name:
                edges[name].add(dep)
    for comp in _cycles(edges):
        problems.append("import cycle: " + " <-> ".join(comp))
    return problems


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "shardfix")
    problems = check(root)
    for p in problems:
        print(p)
    print(f"structure: {len(problems)} problem(s) in {root}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
