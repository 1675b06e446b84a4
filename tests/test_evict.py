"""Eviction: watermark decisions, victims in order, and a deleter that never leaves the root or follows a link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streamer.ledger.core import Ledger
from streamer.rules.eviction import Watermarks, bytes_to_free, choose_victims
from streamer.storage.deleter import (
    UnsafePathError,
    delete_files,
    disk_usage,
    recover_deletions,
    unlink_below,
)

MARKS = Watermarks(budget=1000, high=0.9, low=0.5)


def test_nothing_to_free_below_high_watermark() -> None:
    assert bytes_to_free(800, MARKS) == 0


def test_free_down_to_low_watermark_above_high() -> None:
    assert bytes_to_free(950, MARKS) == 450


def test_free_enough_for_a_reservation_that_does_not_fit() -> None:
    assert bytes_to_free(400, MARKS, need=700) == 600
    assert bytes_to_free(400, MARKS, need=100) == 0


def test_force_frees_everything() -> None:
    assert bytes_to_free(300, MARKS, force=True) == 300


def test_choose_victims_stops_when_enough() -> None:
    rows = [{"id": i, "disk_bytes": 100} for i in range(5)]
    assert [r["id"] for r in choose_victims(rows, 250)] == [0, 1, 2]
    assert choose_victims(rows, 0) == []


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    (root / "raw" / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.fits").write_bytes(b"x" * 5000)
    return root, outside


def test_unlink_below_deletes_regular_file(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    target = root / "raw" / "a" / "f.fits"
    target.write_bytes(b"x" * 10000)
    assert unlink_below(root, "raw/a/f.fits") >= 10000
    assert not target.exists()
    assert unlink_below(root, "raw/a/f.fits") == 0


@pytest.mark.parametrize("relpath", ["../outside/precious.fits", "/etc/passwd", "raw/../../outside/precious.fits", ""])
def test_unlink_below_refuses_escapes(tmp_path: Path, relpath: str) -> None:
    root, outside = _tree(tmp_path)
    with pytest.raises(UnsafePathError):
        unlink_below(root, relpath)
    assert (outside / "precious.fits").exists()


def test_unlink_below_never_follows_symlinks(tmp_path: Path) -> None:
    root, outside = _tree(tmp_path)
    os.symlink(outside, root / "raw" / "link")
    os.symlink(outside / "precious.fits", root / "raw" / "a" / "file-link.fits")
    with pytest.raises(UnsafePathError):
        unlink_below(root, "raw/link/precious.fits")
    with pytest.raises(UnsafePathError):
        unlink_below(root, "raw/a/file-link.fits")
    assert (outside / "precious.fits").exists()
    assert (root / "raw" / "a" / "file-link.fits").is_symlink()


def test_disk_usage_counts_allocated_bytes_and_skips_links(tmp_path: Path) -> None:
    root, outside = _tree(tmp_path)
    (root / "raw" / "a" / "f").write_bytes(b"y" * 8192)
    os.symlink(outside, root / "raw" / "link")
    used = disk_usage(root)
    assert 8192 <= used < 8192 + 3 * 4096


def test_two_phase_deletion_and_recovery(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    ledger = Ledger.memory()
    paths = []
    with ledger.transaction() as conn:
        ids = []
        for name in ("one", "two", "pinned"):
            relpath = f"raw/a/{name}.fits"
            (root / relpath).write_bytes(b"z" * 4096)
            paths.append(root / relpath)
            fid = ledger.want_file(conn, relpath=relpath, kind="raw")
            ledger.set_file_state(conn, fid, "on_disk", disk_bytes=4096)
            ids.append(fid)
        ledger.add_job(conn, kind="exposure", key="j", pins=[ids[2]])
    freed = delete_files(ledger, root, [ledger.file(i) for i in ids])
    assert freed == 8192
    assert [ledger.file(i)["state"] for i in ids] == ["deleted", "deleted", "on_disk"]
    assert paths[2].exists() and not paths[0].exists()
    # a crash between the two phases: the row says deleting, the file is still there
    with ledger.transaction() as conn:
        ledger.set_file_state(conn, ids[2], "deleting")
    assert recover_deletions(ledger, root) == 1
    assert ledger.file(ids[2])["state"] == "deleted" and not paths[2].exists()
