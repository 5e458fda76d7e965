"""The package's layers, checked from its source (part of `make lint`).

src/rankbias is built in layers, each a subpackage. A module may import only from its
own layer and the layers this table lets it use (rankbias/__init__'s `__version__` is
open to all; cli.py and __main__.py sit on top and load commands by name):

    core      the spec, families, dataset tables, atomic I/O, the timing log
    plan      config to runs to packs, the cost model, the container image   <- core
    store     run files and their verification, metrics, provenance records  <- core
    train     data, models, the engine, the epoch loop, theory, bench        <- core, plan, store
    analysis  figures and the claims table                                    <- core, plan, store
    verify    DVC state, audit, restore, publish, the RO-Crate                <- core, plan, store, analysis

The check reads every import, at module level and inside functions, and fails on:
  - an import of a layer the table does not allow (upward or sideways);
  - a cycle between modules (through any imports, late ones included);
  - a private name (`_x`) imported from another module;
  - torch or torchvision imported anywhere in `core` or `plan` (a Snakemake parse imports
    them; the parse must stay fast and work where torch is not installed).

Usage: python scripts/check_layers.py [SRC_DIR]   (default: src/rankbias). Exit 1 with
one line per finding, 0 when clean.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ALLOWED = {
    "core": {"core"},
    "plan": {"core", "plan"},
    "store": {"core", "store"},
    "train": {"core", "plan", "store", "train"},
    "analysis": {"core", "plan", "store", "analysis"},
    "verify": {"core", "plan", "store", "analysis", "verify"},
}
TOP = {"cli", "__main__", "__init__"}   # modules of the package's root
TORCH_FREE = ("core", "plan")
HEAVY = ("torch", "torchvision")


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, name: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every import in the file; relative imports are
    resolved against `name` (a package's own __init__ counts as the package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            out.append((node.lineno, base, names))
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "rankbias":
        return None
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in TOP):
        return "top"
    return parts[1]


def check(src: Path) -> list[str]:
    problems: list[str] = []
    modules = {module_name(p, src): p for p in sorted(src.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        rel = path.relative_to(src.parent.parent)
        layer = layer_of(mod)
        if layer not in ALLOWED and layer != "top":
            problems.append(f"{rel}: module outside the layers {', '.join(ALLOWED)}")
            continue
        for line, target, names in imports(path, mod):
            where = f"{rel}:{line}"
            if layer in TORCH_FREE and target.split(".")[0] in HEAVY:
                problems.append(f"{where}: imports {target}; the {layer} layer never imports torch")
            if not target.startswith("rankbias"):
                continue
            # `from rankbias.x import y` may name a module y or a name in x
            targets = []
            for n in names or [""]:
                sub = f"{target}.{n}" if n else target
                targets.append(sub if sub in modules else target)
            for t in set(targets):
                if t == "rankbias" and set(names) <= {"__version__"}:
                    continue
                tl = layer_of(t)
                if layer != "top" and tl not in ALLOWED[layer] and t != mod:
                    problems.append(f"{where}: {mod} ({layer}) imports {t} ({tl}); {layer} may "
                                    f"import only {', '.join(sorted(ALLOWED[layer]))}")
                if t in modules and t != mod:
                    graph[mod].add(t)
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != mod:
                    problems.append(f"{where}: imports the private name {n} from {target}")
    problems += [f"import cycle: {' -> '.join(c + [c[0]])}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(argv: list[str]) -> int:
    src = Path(argv[0] if argv else "src/rankbias").resolve()
    if not (src / "__init__.py").is_file():
        print(f"check_layers: {src} is not a package (no __init__.py)", file=sys.stderr)
        return 2
    problems = check(src)
    for p in problems:
        print(p)
    if not problems:
        n = sum(1 for _ in src.rglob("*.py"))
        print(f"check_layers: {n} modules in {len(ALLOWED)} layers, no upward import, no cycle, "
              f"no private import, core and plan torch-free")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
