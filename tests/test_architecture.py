"""The dependency direction of DESIGN.md and the packaging pitfall of its version matrix."""

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
MODEL_MODULES = ("tower", "mixture", "heads", "model", "losses")
FORBIDDEN_IN_MODEL = ("torchrec.distributed", "mlflow", "polars")


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def test_packages_import_only_downstream_ones() -> None:
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            if pkg == "recsys_moe" and path.name == "cli.py":
                continue  # the CLI sits on top of everything
            for mod in _imports(path):
                top = mod.split(".")[0]
                if top in PACKAGES and top not in ALLOWED[pkg]:
                    bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


def test_model_modules_hold_no_sharding_tracking_or_dataframes() -> None:
    bad = []
    for name in MODEL_MODULES:
        path = ROOT / "recsys_moe" / f"{name}.py"
        for mod in _imports(path):
            if mod.startswith(FORBIDDEN_IN_MODEL):
                bad.append(f"{path.name} imports {mod}")
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
