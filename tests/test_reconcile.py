"""reconcile: unknown files adopted, gone files marked, orphan .part removed, read-only trees never touched."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from streamer.config import load_config
from streamer.ledger.core import FILE_TRANSITIONS, Ledger
from streamer.service.reconcile import compare, kind_of, run

RAW = "raw/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o.fits.fz"
SCI = "sci/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits"


def _config(tmp_path: Path, minimal_config_text: str, extra: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(minimal_config_text + extra)
    return path


def _put(root: Path, relpath: str, size: int = 5000) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return path


def test_kind_of_names() -> None:
    assert kind_of(RAW) == "raw"
    assert kind_of(SCI) == "sciimg"
    assert kind_of(SCI.replace("_sciimg.fits", "_sciimg.header.fits")) == "sciimg_header"
    assert kind_of("apcat/2020/0924/ztf_20200924431759_000655_zr_c13_o_apcat.parquet") == "apcat"
    assert kind_of("notes.txt") is None
    assert kind_of("raw/2020/0924/431759/junk.fits.fz") is None


def test_reconcile_finds_and_fixes(tmp_path: Path, minimal_config_text: str, capsys) -> None:  # type: ignore[no-untyped-def]
    config = load_config(_config(tmp_path, minimal_config_text))
    root = config.storage.root
    with Ledger.open(config.storage.ledger_path) as ledger, ledger.transaction() as conn:
        gone = ledger.want_file(conn, relpath="raw/2020/0924/000001/ztf_20200924000001_000000_bi_c13_b.fits.fz", kind="raw")
        ledger.set_file_state(conn, gone, "on_disk", disk_bytes=4096, actual_size=4000)
    _put(root, RAW)
    _put(root, RAW + ".part", 100)
    _put(root, "notes.txt")
    os.symlink("/etc", root / "raw" / "escape")
    assert run(config, fix=False, erasable_list=None) == 1
    assert (root / (RAW + ".part")).exists()
    assert run(config, fix=True, erasable_list=None) == 0
    assert not (root / (RAW + ".part")).exists()
    assert (root / "notes.txt").exists() and (root / "raw" / "escape").is_symlink()
    with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
        adopted = ledger.file_by_relpath(RAW)
        assert adopted is not None and adopted["state"] == "on_disk" and adopted["kind"] == "raw"
        assert adopted["url"].endswith("/ibe/data/ztf/products/" + RAW)
        assert ledger.file(gone)["state"] == "deleted"
        assert compare(config, ledger).clean
    assert run(config, fix=False, erasable_list=None) == 0
    assert "disk and ledger agree" in capsys.readouterr().out


def test_erasable_list_of_a_readonly_tree(tmp_path: Path, minimal_config_text: str) -> None:
    tree = tmp_path / "ipac"
    kept = _put(tree, SCI)
    other = _put(tree, SCI.replace("000655", "000700"))
    extra = (
        '\n[[consumers]]\nname = "scene"\nkeep = ["sciimg"]\nfields = [655]\n'
    )
    text = minimal_config_text.replace('budget = "10 GB"', f'budget = "10 GB"\nreadonly_trees = ["{tree}"]')
    config = load_config(_config(tmp_path, text, extra))
    listing = tmp_path / "erasable.txt"
    run(config, fix=True, erasable_list=str(listing))
    assert listing.read_text().splitlines() == [str(other)]
    assert kept.exists() and other.exists()


def _enforce_transition_table(ledger_path: Path) -> None:
    """A trigger that aborts any change of ``files.state`` outside FILE_TRANSITIONS, raw SQL included."""
    allowed = ", ".join(f"'{old}>{new}'" for old, news in FILE_TRANSITIONS.items() for new in news)
    with sqlite3.connect(ledger_path) as conn:
        conn.execute(
            "CREATE TRIGGER test_state_machine BEFORE UPDATE OF state ON files "
            f"WHEN old.state != new.state AND (old.state || '>' || new.state) NOT IN ({allowed}) "
            "BEGIN SELECT RAISE(ABORT, 'transition outside the state machine'); END"
        )


def test_fix_moves_gone_and_found_files_through_the_state_machine(tmp_path: Path, minimal_config_text: str) -> None:
    config = load_config(_config(tmp_path, minimal_config_text))
    root = config.storage.root
    gone_path = "raw/2020/0924/000001/ztf_20200924000001_000000_bi_c13_b.fits.fz"
    with Ledger.open(config.storage.ledger_path) as ledger, ledger.transaction() as conn:
        gone = ledger.want_file(conn, relpath=gone_path, kind="raw")
        ledger.set_file_state(conn, gone, "on_disk", disk_bytes=4096, actual_size=4000)
        corrupt = ledger.want_file(conn, relpath=RAW, kind="raw")
        ledger.set_file_state(conn, corrupt, "reserved")
        ledger.set_file_state(conn, corrupt, "downloading")
        ledger.set_file_state(conn, corrupt, "corrupt")
    _put(root, RAW, 6000)  # found complete on disk again, e.g. copied back by hand
    _enforce_transition_table(config.storage.ledger_path)
    assert run(config, fix=True, erasable_list=None) == 0
    with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
        row = ledger.file(gone)
        assert (row["state"], row["disk_bytes"], row["actual_size"]) == ("deleted", 0, None)
        assert row["last_error"] == "gone from disk (found by reconcile)"
        adopted = ledger.file(corrupt)
        assert (adopted["state"], adopted["actual_size"], adopted["reserved_bytes"]) == ("on_disk", 6000, 0)
        assert adopted["disk_bytes"] == os.lstat(root / RAW).st_blocks * 512
        totals = ledger.bytes_by_kind_and_state()
        assert totals[("raw", "deleted")]["files"] == 1 and ("raw", "corrupt") not in totals
        assert compare(config, ledger).clean


def test_erasable_list_names_raw_files_of_a_readonly_tree(tmp_path: Path, minimal_config_text: str) -> None:
    tree = tmp_path / "ipac"
    raw = _put(tree, RAW)
    mask = _put(tree, SCI.replace("_sciimg.fits", "_mskimg.fits.fz"))
    header = _put(tree, SCI.replace("_sciimg.fits", "_sciimg.header.fits"))
    text = minimal_config_text.replace('budget = "10 GB"', f'budget = "10 GB"\nreadonly_trees = ["{tree}"]')
    config = load_config(_config(tmp_path, text, '\n[[consumers]]\nname = "masks"\nkeep = ["mskimg"]\n'))
    listing = tmp_path / "erasable.txt"
    run(config, fix=False, erasable_list=str(listing))
    assert sorted(listing.read_text().splitlines()) == sorted([str(raw), str(header)])
    assert raw.exists() and mask.exists() and header.exists()
