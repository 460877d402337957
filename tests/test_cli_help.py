"""What the CLI prints: every subcommand's --help ends with examples and where its output goes;
summaries are sentences, not Python dicts; -q turns the progress bars off."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipelines import progress
from recsys_moe import cli


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):  # noqa: ANN202
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path)
    for sub in subs:
        for name, child in sub.choices.items():
            yield from _leaves(child, (*path, name))


def test_every_subcommand_has_examples() -> None:
    assert sorted(_leaves(cli.build_parser())) == sorted(cli.EXAMPLES)


@pytest.mark.parametrize("path", sorted(cli.EXAMPLES))
def test_help_shows_examples_and_outputs(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([*path.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"recsys-moe {path}" in out  # usage line
    examples = out[out.index("examples:") :]
    assert "writes" in examples and examples.count("recsys-moe") >= 1, out


def test_synth_prints_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["data", "synth", "--workdir", str(tmp_path), "--users", "120", "--items", "30",
            "--days", "4", "-q"]  # fmt: skip
    try:
        assert cli.main(args) == 0
    finally:
        progress.set_mode(None)
    out = capsys.readouterr().out.strip()
    assert "{" not in out and "'" not in out, out
    assert out.startswith(f"wrote {tmp_path / 'data'}: 120 users (") and "attribute rows" in out
    assert "impressions in" in out and "Bayes-optimal click AUC 0." in out, out


def test_quiet_turns_progress_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_MOE_PROGRESS", "always")
    assert progress.mode() == "always" and not progress.bar(total=1, desc="x", unit="u").disable
    progress.set_mode("never")
    try:
        assert progress.bar(total=1, desc="x", unit="u").disable
    finally:
        progress.set_mode(None)
    monkeypatch.setenv("RECSYS_MOE_PROGRESS", "never")
    assert progress.mode() == "never"
