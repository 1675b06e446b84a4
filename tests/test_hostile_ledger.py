"""A ledger that cannot be used (not SQLite, truncated, a directory, a newer schema) is one line, exit 2."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from streamer.cli import main
from streamer.ledger.core import Ledger

CONFIG = """\
[storage]
root = "{root}"
budget = "10 GB"

[archive]
base_url = "http://127.0.0.1:9"

[photometry]
catalog_dir = "{catalog}"
"""


def _not_sqlite(path: Path) -> None:
    path.write_bytes(b"this is a text file, not a database\n" * 200)


def _truncated(path: Path) -> None:
    with Ledger.open(path) as ledger, ledger.transaction() as conn:
        for i in range(300):
            ledger.event("test", "x" * 500 + str(i), conn=conn)
    for extra in ("-wal", "-shm"):
        Path(str(path) + extra).unlink(missing_ok=True)
    data = path.read_bytes()
    path.write_bytes(data[:100] + bytes(len(data) // 3))  # the header survives, the pages do not


def _directory(path: Path) -> None:
    path.mkdir()


def _newer_schema(path: Path) -> None:
    Ledger.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()


DAMAGES: dict[str, Callable[[Path], None]] = {
    "not_sqlite": _not_sqlite, "truncated": _truncated, "directory": _directory, "newer_schema": _newer_schema,
}  # fmt: skip
COMMANDS = {
    "backfill": ["backfill", "--start", "2020-09-24", "--end", "2020-09-24"],
    "status": ["status"],
    "status_json": ["status", "--json"],
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unusable_ledger_is_one_line_and_exit_2(
    damage: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "store"
    root.mkdir()
    ledger = root / "ledger.sqlite"
    DAMAGES[damage](ledger)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(root=root, catalog=tmp_path / "refcat"))
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["--config", str(config), *COMMANDS[command]])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "ledger.sqlite" in lines[0], captured.err
    assert "Traceback" not in captured.out + captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
