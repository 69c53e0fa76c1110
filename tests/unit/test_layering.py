"""Imports in sai_dist run one way: a module imports only modules of its own layer or below,
and no import cycle exists (docs/design.md, "Layers"). Function-level imports count too: a
lazy import is still a dependency, and the circle this test guards against (optimizer ->
layouts -> flat_param -> zero -> optimizer) was closed by one."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.paths import REPO

# Bottom to top. A module belongs to the first layer with a pattern that is its name or a
# package prefix of it ("sai_dist.layouts" covers sai_dist.layouts.zero).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "shared concepts",
        (
            "sai_dist.state_keys",
            "sai_dist.names",
            "sai_dist.warning_categories",
            "sai_dist.collectives",
            "sai_dist.native",
            "sai_dist.integration_hint",
            "sai_dist.layouts.mesh",
        ),
    ),
    (
        "storage and statistics",
        (
            "sai_dist.momentum",
            "sai_dist.probe",
            "sai_dist.stats",
            "sai_dist.native_lowp",
            "sai_dist.compiled_lowp",
            "sai_dist.consistency",
        ),
    ),
    (
        "math",
        (
            "sai_dist.gsnr",
            "sai_dist.functional",
            "sai_dist.whole_model",
            "sai_dist.stages",
            "sai_dist.layouts.base",
        ),
    ),
    ("layouts", ("sai_dist.layouts",)),
    (
        "optimizer",
        (
            "sai_dist.update",
            "sai_dist.validation",
            "sai_dist.gsnr_step",
            "sai_dist.loading",
            "sai_dist.optimizer",
        ),
    ),
    (
        "library surface and integrations",
        (
            "sai_dist.table",
            "sai_dist.checkpoint",
            "sai_dist.in_backward",
            "sai_dist.deepspeed",
            "sai_dist.fairscale",
            "sai_dist.torchtitan",
        ),
    ),
    ("package", ("sai_dist",)),
    ("tools: memory accounting, the job, the CLI", ("sai_dist.memory", "sai_dist.train", "sai_dist.cli")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """sai_dist modules ``path`` imports, anywhere in the file; ``from pkg import sub`` counts
    as importing the submodule ``pkg.sub`` (not the package) when ``sub`` is a module."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sai_dist")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "sai_dist":
                continue
            subs = {f"{mod}.{a.name}" for a in node.names} & modules
            found.update(subs if subs and len(subs) == len(node.names) else {mod, *subs})
    found.discard(name)
    return found


def layer_of(module: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in patterns):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__} and to docs/design.md")


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Upward imports and import cycles of a module graph (module -> modules it imports)."""
    found = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            here, there = layer_of(module), layer_of(dep)
            if there > here:
                found.append(f"{module} ({LAYERS[here][0]}) imports {dep} ({LAYERS[there][0]}), above it")
    state: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                found.append("import cycle: " + " -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def package_graph() -> dict[str, set[str]]:
    files = sorted((REPO / "sai_dist").rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def test_sai_dist_imports_run_one_way() -> None:
    graph = package_graph()
    assert "sai_dist.optimizer" in graph and "sai_dist.layouts.flat_segment" in graph
    assert violations(graph) == []


def test_the_old_circle_is_caught() -> None:
    """The circle the first round had: the flat-segment layout (then in layouts/zero.py, now
    layouts/flat_segment.py) took the state keys from the optimizer."""
    graph = package_graph()
    flat = "sai_dist.layouts.flat_segment"
    graph[flat] = {*graph[flat], "sai_dist.optimizer"}
    found = violations(graph)
    assert any(f"{flat} (layouts) imports sai_dist.optimizer (optimizer)" in v for v in found), found
    assert any(v.startswith("import cycle:") and flat in v for v in found), found
