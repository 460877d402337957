"""Nothing a reader of the repository follows points outside it: Markdown links resolve to files
inside the repository, and no config (including the feature definitions' headers), CLI default
or package source names a path above the repository root (``../``) or a machine's own folders."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest

from recsys_moe import cli
from recsys_moe.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = sorted(
    p
    for p in ROOT.rglob("*.md")
    if not {".venv", "node_modules", ".git"} & set(p.relative_to(ROOT).parts)
    and "egg-info" not in str(p)
    and not any(part.endswith("-run") for part in p.relative_to(ROOT).parts)
)
CONFIGS = sorted((ROOT / "configs").rglob("*.toml"))
SOURCES = sorted(
    p for pkg in ("recsys_moe", "pipelines", "feature_store", "serving") for p in
    (ROOT / pkg).rglob("*.py")
)  # fmt: skip
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
OUTSIDE = re.compile(r"(?<![\w.])\.\./|/work/|/home/|/Users/|\bshared/data\b")


def _inside(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT)


def test_the_documents_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in MARKDOWN}
    assert {"README.md", "docs/DESIGN.md", "docs/ARCHITECTURE.md"} <= names
    design = (ROOT / "docs/DESIGN.md").read_text()
    assert "| torch |" in design and "torchrec" in design  # the version matrix


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_markdown_links_stay_inside_and_resolve(doc: Path) -> None:
    text = doc.read_text()
    bad = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor of this page
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not _inside(path) or not path.exists():
            bad.append(target)
    assert not bad, f"{doc.relative_to(ROOT)}: links outside the repository or to nothing: {bad}"
    outside = [m.group(0) for m in OUTSIDE.finditer(LINK.sub("", text))]  # links checked above
    assert not outside, f"{doc.relative_to(ROOT)} names paths outside the repository: {outside}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_configs_point_inside(config: Path) -> None:
    """Values and comments (the headers' example commands included)."""
    text = config.read_text()
    lines = [f"{i}: {line}" for i, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not lines, f"{config.relative_to(ROOT)}: " + "; ".join(lines)

    def strings(value: object) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return []

    absolute = [s for s in strings(tomllib.loads(text)) if s.startswith("/")]
    assert not absolute, f"{config.relative_to(ROOT)}: absolute paths {absolute}"


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_config_paths_resolve_inside_the_workdir_or_repository(config: Path) -> None:
    cfg = load_config(config, workdir="WORKDIR")
    workdir = Path("WORKDIR").resolve()
    paths = {"features": cfg.features_path, **cfg.protected_paths()}
    for name, path in paths.items():
        p = Path(path).resolve()
        assert p.is_relative_to(workdir) or _inside(p), f"{config.name}: {name} = {path}"


def _actions(parser: argparse.ArgumentParser, prefix: str = "recsys-moe"):  # noqa: ANN202
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{prefix} {name}")
        else:
            yield prefix, action


def test_cli_defaults_point_inside() -> None:
    bad = []
    for where, action in _actions(cli.build_parser()):
        for text in (action.default, action.help):
            if isinstance(text, str | Path) and OUTSIDE.search(str(text)):
                bad.append(f"{where} {'/'.join(action.option_strings)}: {text}")
    assert not bad, bad


def test_package_sources_name_no_outside_paths() -> None:
    bad = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in SOURCES
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not bad, bad


def _readme_steps() -> list[list[str]]:
    """The README's step-by-step commands (the first bash block of "The jobs")."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## The jobs") :].split("```bash", 1)[1].split("```", 1)[0]
    return [
        line.split("#", 1)[0].split()[1:]
        for line in block.splitlines()
        if line.startswith("recsys-moe ")
    ]


def test_readme_steps_run_the_demos_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Data, training set and training of the README's steps use exactly the demo's config
    (``recsys-moe demo`` loads the embedded configs/demo.toml), so they give the demo's numbers
    (checked by hand on 2026-12-01: all 37 test metrics equal)."""
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository
    demo = cli._config(cli.build_parser().parse_args(["demo"]))
    steps = {" ".join(a[:2]) if a[0] in ("data", "features") else a[0]: a for a in _readme_steps()}
    assert {"data synth", "features build", "train", "evaluate"} <= set(steps), steps
    for name in ("data synth", "features build", "train"):
        argv = [x for x in steps[name] if not x.startswith("[")]
        args = cli.build_parser().parse_args(argv)
        cfg = cli._config(args)
        assert cfg == demo, name
        if name == "data synth":  # no flag overrides [synth]
            assert all(getattr(args, k) is None for k in cli.SYNTH_FLAGS)
