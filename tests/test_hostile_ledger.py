"""A ledger that cannot be used (not SQLite, truncated, a directory, a newer schema, on a read-only
filesystem) or a storage root that is a file: one line, exit 2, and nothing changed on disk."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
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


def tree_state(top: Path) -> dict[str, tuple[int, str]]:
    """relpath -> (mode, sha256 of the content, or a symlink's target) of everything below ``top``."""
    state: dict[str, tuple[int, str]] = {}
    for directory, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(directory) / name
            info = path.lstat()
            if path.is_symlink():
                digest = "-> " + os.readlink(path)
            elif path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                digest = ""
            state[path.relative_to(top).as_posix()] = (info.st_mode, digest)
    return state


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
    "reconcile": ["reconcile"],
    "reconcile_fix": ["reconcile", "--fix"],
    "explain": ["explain", "ztf_20200924431759_000655_zr_c13_o.fits.fz"],
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
    before = tree_state(tmp_path)
    code = main(["--config", str(config), *COMMANDS[command]])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "ledger.sqlite" in lines[0], captured.err
    assert "Traceback" not in captured.out + captured.err
    assert tree_state(tmp_path) == before


def _run(config: Path, command: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["--config", str(config), *COMMANDS[command]])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.err


@pytest.fixture
def readonly_store(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs holding a store with a valid ledger, remounted read-only; yields the configuration file."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.decode().strip()}")
    try:
        root = mount_point / "store"
        root.mkdir()
        Ledger.open(root / "ledger.sqlite").close()
        config = tmp_path / "config.toml"
        config.write_text(CONFIG.format(root=root, catalog=tmp_path / "refcat"))
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        yield config
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_ledger_on_a_readonly_filesystem_is_one_line_and_exit_2(
    command: str, readonly_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree_state(tmp_path)
    code, err = _run(readonly_store, command, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "read-only filesystem" in lines[0] and "ledger.sqlite" in lines[0], err
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_storage_root_that_is_a_file_is_one_line_and_exit_2(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "store"
    root.write_text("not a directory\n")
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(root=root, catalog=tmp_path / "refcat"))
    before = tree_state(tmp_path)
    code, err = _run(config, command, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "storage.root" in lines[0] and "is not one" in lines[0], err
    assert tree_state(tmp_path) == before
