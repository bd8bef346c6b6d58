"""Import cycles among shardfix modules, counting every import statement (function-level included)."""
import ast
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "shardfix")
mods = {}
for p in root.rglob("*.py"):
    name = ".".join(p.with_suffix("").parts)
    if name.endswith(".__init__"): name = name[: -len(".__init__")]
    mods[name] = p
edges = {m: set() for m in mods}
for m, p in mods.items():
    for n in ast.walk(ast.parse(p.read_text())):
        targets = []
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == root.name:
            for a in n.names:
                sub = f"{n.module}.{a.name}"
                targets.append(sub if sub in mods else n.module)
        elif isinstance(n, ast.Import):
            targets += [a.name for a in n.names if a.name.split(".")[0] == root.name]
        for t in targets:
            while t and t not in mods: t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != m: edges[m].add(t)
sys.setrecursionlimit(100000)
index, low, stack, on, sccs, c = {}, {}, [], set(), [], [0]
def strong(v):
    index[v] = low[v] = c[0]; c[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index: strong(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(sorted(comp))
for v in edges:
    if v not in index: strong(v)
for s in sccs:
    print("cycle:", " <-> ".join(s))
    for a in s:
        print("   ", a, "->", sorted(edges[a] & set(s)))
sys.exit(1 if sccs else 0)
