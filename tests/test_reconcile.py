"""reconcile: unknown files adopted, gone files marked, orphan .part removed, read-only trees never touched."""

from __future__ import annotations

import os
from pathlib import Path

from streamer.config import load_config
from streamer.ledger.core import Ledger
from streamer.storage.reconcile import compare, kind_of, run

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
        f'\n[[consumers]]\nname = "scene"\nkeep = ["sciimg"]\nfields = [655]\n'
    )
    text = minimal_config_text.replace('budget = "10 GB"', f'budget = "10 GB"\nreadonly_trees = ["{tree}"]')
    config = load_config(_config(tmp_path, text, extra))
    listing = tmp_path / "erasable.txt"
    run(config, fix=True, erasable_list=str(listing))
    assert listing.read_text().splitlines() == [str(other)]
    assert kept.exists() and other.exists()
