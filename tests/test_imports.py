"""No import circle inside mlx_sleep: every import (module level or inside a function) of one
of our modules, read from the sources with ast, forms a graph without cycles."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# package -> its source folder (convert/ installs as mlx_sleep.convert, see pyproject.toml)
PACKAGES = {"mlx_sleep": ROOT / "mlx_sleep", "mlx_sleep.convert": ROOT / "convert"}


def modules() -> dict:
    """{module name: source path} for every .py file of the project's packages."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imports_of(name: str, path: Path, known: dict) -> set:
    """Our modules that `name` imports: `from pkg import x` counts as pkg.x when x is a module."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict):
    """One cycle as a list of modules, or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(m):
        colour[m] = "grey"
        stack.append(m)
        for n in sorted(graph[m]):
            if colour.get(n) == "grey":
                return stack[stack.index(n) :] + [n]
            if n not in colour and (cycle := visit(n)):
                return cycle
        colour[m] = "black"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in colour and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_circle():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert len(graph) > 30 and graph["mlx_sleep.kernels"] == {"mlx_sleep.gdn_math"}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
