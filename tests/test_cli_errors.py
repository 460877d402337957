"""Every user mistake through the CLI ends with an ``error: ...`` line on stderr, exit status 2
and no traceback: unknown run ids, experiments, registered models, versions and aliases; a
missing store or training set (the message names the command that makes it); every kind of bad
``--set``. The MLflow store is a real SQLite store in a temporary folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from recsys_moe import cli
from recsys_moe.config import load_config
from recsys_moe.tracking import client_for, ensure_experiment


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``recsys-moe ARGS`` in this process: (exit status, stderr)."""
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    err = capsys.readouterr().err
    return code, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error:") or "\nerror:" in err or "error: " in err.splitlines()[-1], err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir whose MLflow store has the experiment and a registered model ``m`` (version 1,
    alias champion), but no run ``deadbeef``; a candidates file."""
    tmp_path = tmp_path_factory.mktemp("store")
    pl.DataFrame({"user_id": [1, 2], "item_id": [3, 4]}).write_parquet(tmp_path / "c.parquet")
    cfg = load_config(None, workdir=tmp_path)
    ensure_experiment(cfg)
    client = client_for(cfg)
    client.create_registered_model("m")
    version = client.create_model_version("m", source=(tmp_path / "nowhere").as_uri())
    client.set_registered_model_alias("m", "champion", version.version)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("job", ["evaluate", "register"])
def test_unknown_run_id(job: str, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli([job, "--workdir", str(store), "--run-id", "deadbeef"], capsys)
    assert_user_error(code, err, "deadbeef", "not found", str(store / "mlflow.db"))


@pytest.mark.slow
def test_unknown_experiment(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["evaluate", "--workdir", str(store), "--set", "mlflow.experiment=nope"]
    code, err = run_cli(args, capsys)
    assert_user_error(code, err, "'nope'", "recsys-moe train")


@pytest.mark.slow
def test_unknown_alias(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["score", "--workdir", str(store), "--model", "models:/m@nope", "--candidates",
            str(store / "c.parquet"), "--output", str(store / "out")]  # fmt: skip
    code, err = run_cli(args, capsys)
    assert_user_error(code, err, "nope")


@pytest.mark.slow
@pytest.mark.parametrize(("model", "version", "needle"), [("m", "9", "9"), ("nope", "1", "nope")])
def test_unknown_version_or_model(
    model: str, version: str, needle: str, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["promote", "--workdir", str(store), "--model", model, "--version", version]
    code, err = run_cli(args, capsys)
    assert_user_error(code, err, needle)


@pytest.mark.slow
def test_missing_training_set_names_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["train", "--workdir", str(tmp_path)], capsys)
    assert_user_error(code, err, "recsys-moe features build", str(tmp_path / "dataset"))


def test_missing_store_names_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["features", "build", "--workdir", str(tmp_path)], capsys)
    assert_user_error(code, err, "recsys-moe data synth", str(tmp_path / "data"))


@pytest.mark.parametrize(
    ("setting", "needles"),
    [
        ("train.epoch=3", ["train:", "'epoch'", "did you mean", "'epochs'"]),  # unknown key
        ("train.epochs=three", ["train.epochs", "integer", "'three'"]),  # wrong type
        ("train.epochs=0", ["train.epochs", "0"]),  # out of range
        ("train.loader=disk", ["'auto'", "'memory'", "'stream'", "'disk'"]),  # unknown choice
        ("model.mixture=moe", ["model.mixture", "'mmoe'", "'shared_bottom'"]),
        ("train.epochs", ["train.epochs", "key=value"]),  # no value
    ],
)
def test_bad_set(
    setting: str, needles: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["train", "--workdir", str(tmp_path), "--set", setting], capsys)
    assert_user_error(code, err, *needles)
    assert not (tmp_path / "mlflow.db").exists()  # nothing ran


def test_flags_after_the_subcommand_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["train", "-v", "-q"])
    assert args.verbose and args.quiet
    args = cli.build_parser().parse_args(["-v", "train"])
    assert args.verbose and not getattr(args, "quiet", False)
    args = cli.build_parser().parse_args(["data", "import", "census", "--src", "x", "--out", "y",
                                          "-v"])  # fmt: skip
    assert args.verbose
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("recsys-moe ")


@pytest.mark.slow
def test_as_a_process_no_traceback_and_no_library_notices(store: Path) -> None:
    """The installed entry point: the error line alone on stderr (no MLflow database notices)."""
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_moe.cli", "register", "--workdir", str(store),
         "--run-id", "deadbeef"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: Run with id=deadbeef not found"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    version = subprocess.run(
        [sys.executable, "-m", "recsys_moe.cli", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("recsys-moe "), version
