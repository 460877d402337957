"""The import rules of docs/ARCHITECTURE.md and the packaging pitfall of the version matrix.

Every import statement counts (module level, inside functions, under ``TYPE_CHECKING``): a
cycle that only lazy imports keep from failing at run time is still a cycle in the design.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("feature_store", "pipelines", "recsys_moe", "serving")
# a package may import only those to its left (feature_store ← pipelines ← recsys_moe ← serving)
ALLOWED = {
    "feature_store": {"feature_store"},
    "pipelines": {"feature_store", "pipelines"},
    "recsys_moe": {"feature_store", "pipelines", "recsys_moe"},
    "serving": {"feature_store", "pipelines", "recsys_moe", "serving"},
}
CLI = "recsys_moe.cli"
# inside recsys_moe, the stages each subpackage may not import
NOT_FROM = {
    "recsys_moe.model": ("recsys_moe.training", "recsys_moe.evaluation", "recsys_moe.tracking",
                         "recsys_moe.registry", "recsys_moe.bundle", "recsys_moe.data",
                         "recsys_moe.dataset"),
    "recsys_moe.evaluation": ("recsys_moe.training", "recsys_moe.registry"),
    "recsys_moe.training": ("recsys_moe.registry",),
}  # fmt: skip
FORBIDDEN_IN_MODEL = ("torchrec.distributed", "mlflow", "polars")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports: ``from a.b import c`` is ``a.b.c`` where that is a
    module, else ``a.b``; every import statement, wherever it sits."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                for a in node.names
            ]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in {k.split(".")[0] for k in known}}
    return out


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    known = set(paths)
    return {mod: imports(path, known) & known - {mod} for mod, path in sorted(paths.items())}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or ``[]``."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


GRAPH = import_graph(ROOT, PACKAGES)


def test_no_import_cycle_between_modules() -> None:
    assert not find_cycle(GRAPH), " -> ".join(find_cycle(GRAPH))


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg.c import g\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
    )
    graph = import_graph(tmp_path, ("pkg",))
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("")
    assert find_cycle(import_graph(tmp_path, ("pkg",))) == []


def test_packages_import_only_downstream_ones() -> None:
    bad = []
    for mod, deps in GRAPH.items():
        if mod == CLI:
            continue  # the CLI sits on top of everything
        top = mod.split(".")[0]
        bad += [f"{mod} imports {d}" for d in deps if d.split(".")[0] not in ALLOWED[top]]
    assert not bad, bad


def test_the_cli_is_the_top_floor() -> None:
    """Nothing imports the CLI; below serving/, only the CLI imports serving."""
    assert not [m for m, deps in GRAPH.items() if CLI in deps]
    below = [m for m in GRAPH if m.split(".")[0] != "serving" and m != CLI]
    assert not [m for m in below if any(d.startswith("serving") for d in GRAPH[m])]


def test_stages_of_recsys_moe_import_downwards_only() -> None:
    bad = []
    for mod, deps in GRAPH.items():
        for stage, banned in NOT_FROM.items():
            if mod == stage or mod.startswith(stage + "."):
                bad += [f"{mod} imports {d}" for d in deps if d.startswith(banned)]
    assert not bad, bad


def test_model_modules_hold_no_sharding_tracking_or_dataframes() -> None:
    bad = []
    for path in sorted((ROOT / "recsys_moe" / "model").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            else:
                continue
            bad += [f"{path.name} imports {m}" for m in mods if m.startswith(FORBIDDEN_IN_MODEL)]
    assert not bad, bad


def test_torchrec_stays_out_of_the_project_resolver_path() -> None:
    """`pip install .` must not re-resolve torchrec (it would pull the CUDA fbgemm-gpu)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [
        d for extra in project.get("optional-dependencies", {}).values() for d in extra
    ]
    installed = md.requires("recsys-moe") or []
    for dep in declared + installed:
        assert not dep.lower().startswith(("torchrec", "fbgemm", "torch")), dep


def test_installed_stack_is_one_consistent_pair() -> None:
    """Exactly one fbgemm variant, matching the torch minor per the version matrix."""
    dists = {d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}
    variants = {"fbgemm-gpu", "fbgemm-gpu-cpu"} & dists
    assert len(variants) == 1, variants
    pairs = {"2.13": "1.8", "2.11": "1.6"}
    torch_minor = ".".join(md.version("torch").split(".")[:2])
    assert md.version(variants.pop()).startswith(pairs[torch_minor])
