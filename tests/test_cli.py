"""The command line: help, version, usage errors, and no fake success for what is not there."""

from __future__ import annotations

import pytest

from streamer import __version__
from streamer.cli import main


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "backfill", "status", "reconcile", "demo", "sim"):
        assert command in out


@pytest.mark.parametrize("command", ["run", "backfill", "status", "reconcile", "demo", "sim"])
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])
    assert caught.value.code == 0
    assert "usage: streamer " + command in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["backfill", "--start", "2020-13-01", "--end", "2020-12-01"],
        ["backfill", "--start", "2020-09-01"],
        ["backfill", "--start", "2020-09-01", "--end", "2020-09-02", "--ccd", "17"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_backfill_start_after_end_is_usage_error(minimal_config, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    code = main(["--config", str(minimal_config), "backfill", "--start", "2020-09-05", "--end", "2020-09-01"])
    assert code == 2
    assert "start <= end" in capsys.readouterr().err
