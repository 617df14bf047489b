"""The package's shape: no import cycles (function-level imports included), components that never
import the layers above them, and a config/CLI layer that loads without torch or Ray."""

import ast
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "ppma_ray"
# what each component may not import: the layers that orchestrate it
FORBIDDEN = {
    "ppma_ray.data": ("ppma_ray.models", "ppma_ray.train", "ppma_ray.tune", "ppma_ray.cli", "ppma_ray.config",
                      "ppma_ray.preflight", "ppma_ray.privacy"),
    "ppma_ray.models": ("ppma_ray.data", "ppma_ray.train", "ppma_ray.tune", "ppma_ray.cli", "ppma_ray.config",
                        "ppma_ray.preflight"),
    "ppma_ray.train": ("ppma_ray.tune", "ppma_ray.cli"),
    "ppma_ray.tune": ("ppma_ray.cli",),
}


def _modules() -> dict[str, tuple[ast.Module, str]]:
    """module name -> (its syntax tree, the package its relative imports start from)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        out[name] = (ast.parse(path.read_text()), name if is_package else name.rsplit(".", 1)[0])
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the ppma_ray modules it imports anywhere in its body."""
    modules = _modules()
    graph = {}
    for name, (tree, package) in modules.items():
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # from . import x / from ..y import z
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:  # ``from pkg import submodule`` imports the submodule
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node):
        state[node], _ = 1, stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_anywhere():
    graph = import_graph()
    assert len(graph) > 30 and "ppma_ray.tune.pbt" in graph["ppma_ray.tune.search"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_components_never_import_their_orchestrators():
    graph = import_graph()
    bad = [(m, d) for m, deps in graph.items() for layer, banned in FORBIDDEN.items() if m.startswith(layer + ".")
           or m == layer for d in deps if d.startswith(banned)]
    assert not bad, bad


def test_config_and_cli_load_without_torch_or_ray():
    code = ("import sys, ppma_ray.config, ppma_ray.cli, ppma_ray.cli.pretrain, ppma_ray.cli.tune_mix, ppma_ray.models;"
            "print(sorted(m for m in ('torch', 'ray', 'torchvision') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
