"""reconcile: verified unknown files adopted, failing ones set aside, gone files marked, orphan .part
removed, read-only trees never touched."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from streamer.config import load_config
from streamer.ledger.core import FILE_TRANSITIONS, Ledger
from streamer.ledger.downloads import download_candidates
from streamer.service.reconcile import compare, kind_of, run

RAW = "raw/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o.fits.fz"
SCI = "sci/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits"
HEADER = SCI.replace("_sciimg.fits", "_sciimg.header.fits")
MASK = SCI.replace("_sciimg.fits", "_mskimg.fits.fz")
APCAT = "apcat/2020/0924/ztf_20200924431759_000655_zr_c13_o_apcat.parquet"
BLOCK = 2880


def _config(tmp_path: Path, minimal_config_text: str, extra: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(minimal_config_text + extra)
    return path


def _put(root: Path, relpath: str, size: int = 5000) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return path


def _raw_bytes(path: Path) -> None:
    """A raw CCD file as IRSA serves it: header-only primary, 4 quadrants and 4 overscans, RICE, with checksums."""
    rng = np.random.default_rng(11)
    hdus: list[fits.PrimaryHDU | fits.CompImageHDU] = [fits.PrimaryHDU(header=fits.Header({"IMGTYPE": "object"}))]
    hdus += [fits.CompImageHDU(rng.integers(100, 300, (40, 32)).astype(np.int32), compression_type="RICE_1") for _ in range(4)]
    hdus += [fits.CompImageHDU(rng.integers(100, 300, (40, 30)).astype(np.int32), compression_type="RICE_1") for _ in range(4)]
    fits.HDUList(hdus).writeto(path, checksum=True)


def _header_bytes(path: Path) -> None:
    """A stored sciimg header: one header-only primary HDU of more than one block (a WCS and 60 keywords)."""
    header = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 10.0, "CRVAL2": 20.0})
    for i in range(60):
        header[f"KEY{i}"] = i
    fits.PrimaryHDU(header=header).writeto(path, checksum=True)


def _mask_bytes(path: Path) -> None:
    """A stored mask: an int16 image tile-compressed in HDU 1, with checksums."""
    data = np.zeros((40, 32), dtype=np.int16)
    data[3, 4] = 2
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type="RICE_1")]).writeto(path, checksum=True)


def _apcat_bytes(path: Path) -> None:
    pq.write_table(pa.table({"flux": [1.0, 2.0]}), path)


GOOD: dict[str, tuple[str, Callable[[Path], None]]] = {
    "raw": (RAW, _raw_bytes), "sciimg_header": (HEADER, _header_bytes), "mskimg": (MASK, _mask_bytes),
    "apcat": (APCAT, _apcat_bytes),
}  # fmt: skip


def _good(root: Path, kind: str) -> Path:
    relpath, write = GOOD[kind]
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    return path


def _truncated(data: bytes) -> bytes:
    return data[: len(data) - BLOCK]  # still a whole number of blocks: only the declared sizes tell


def _nul_filled(data: bytes) -> bytes:
    return bytes(len(data))


def _html(data: bytes) -> bytes:
    return b"<!DOCTYPE html><html><head><title>IRSA</title></head><body>Please log in</body></html>\n"


DAMAGES: dict[str, Callable[[bytes], bytes]] = {"truncated": _truncated, "nul_filled": _nul_filled, "html": _html}


def _tree(root: Path) -> dict[str, str]:
    """relpath -> sha256 of every file below ``root`` (symlinks as their target text)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[path.relative_to(root).as_posix()] = "-> " + os.readlink(path)
        elif path.is_file():
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


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
    _good(root, "raw")
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
    _good(root, "raw")  # found complete on disk again, e.g. copied back by hand
    _enforce_transition_table(config.storage.ledger_path)
    assert run(config, fix=True, erasable_list=None) == 0
    with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
        row = ledger.file(gone)
        assert (row["state"], row["disk_bytes"], row["actual_size"]) == ("deleted", 0, None)
        assert row["last_error"] == "gone from disk (found by reconcile)"
        adopted = ledger.file(corrupt)
        size = (root / RAW).stat().st_size
        assert (adopted["state"], adopted["actual_size"], adopted["reserved_bytes"]) == ("on_disk", size, 0)
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


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_a_good_file_of_each_kind_is_adopted(kind: str, tmp_path: Path, minimal_config_text: str) -> None:
    config = load_config(_config(tmp_path, minimal_config_text))
    path = _good(config.storage.root, kind)
    assert run(config, fix=True, erasable_list=None) == 0
    with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
        row = ledger.file_by_relpath(GOOD[kind][0])
        assert row is not None and (row["state"], row["kind"], row["actual_size"]) == ("on_disk", kind, path.stat().st_size)
    assert not (config.storage.root / "quarantine").exists()


ARCHIVE_URLS = {
    "raw": RAW,
    "sciimg_header": SCI,  # a stored header is read from its sciimg's URL
    "mskimg": SCI.replace("_sciimg.fits", "_mskimg.fits"),  # a stored mask is downloaded as served, then compressed
}


@pytest.mark.parametrize("kind", sorted(ARCHIVE_URLS))
def test_an_adopted_archive_file_gets_the_url_it_is_served_at(kind: str, tmp_path: Path, minimal_config_text: str) -> None:
    config = load_config(_config(tmp_path, minimal_config_text))
    _good(config.storage.root, kind)
    assert run(config, fix=True, erasable_list=None) == 0
    with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
        row = ledger.file_by_relpath(GOOD[kind][0])
        assert row is not None and row["url"] == "https://irsa.ipac.caltech.edu/ibe/data/ztf/products/" + ARCHIVE_URLS[kind]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("kind", ["mskimg", "raw", "sciimg_header", "apcat"])
def test_a_damaged_unknown_file_is_never_adopted(
    kind: str, damage: str, tmp_path: Path, minimal_config_text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(_config(tmp_path, minimal_config_text))
    root = config.storage.root
    path = _good(root, kind)
    damaged = DAMAGES[damage](path.read_bytes())
    path.write_bytes(damaged)
    before = _tree(root)
    assert run(config, fix=False, erasable_list=None) == 1
    assert "1 failing verification" in capsys.readouterr().out
    assert _tree(root) == before  # without --fix nothing is written
    assert run(config, fix=True, erasable_list=None) == 0
    relpath = GOOD[kind][0]
    assert not path.exists()
    assert (root / "quarantine" / relpath).read_bytes() == damaged
    with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
        assert ledger.file_by_relpath(relpath) is None
        assert compare(config, ledger).clean
    capsys.readouterr()
    assert run(config, fix=False, erasable_list=None) == 0
    out = capsys.readouterr().out
    assert "disk and ledger agree" in out and "1 files under quarantine/" in out


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_raw_on_disk_is_set_aside_and_wanted_again(damage: str, tmp_path: Path, minimal_config_text: str) -> None:
    """The file the ledger has on disk changes under it (truncated, zeroed, replaced by a login page)."""
    config = load_config(_config(tmp_path, minimal_config_text, '\n[[consumers]]\nname = "mirror"\nkeep = ["raw"]\n'))
    root = config.storage.root
    path = _good(root, "raw")
    with Ledger.open(config.storage.ledger_path) as ledger, ledger.transaction() as conn:
        url = "https://irsa.ipac.caltech.edu/ibe/data/ztf/products/" + RAW
        file_id = ledger.want_file(conn, relpath=RAW, kind="raw", url=url, kept=True, expected_size=path.stat().st_size)
        ledger.set_file_state(conn, file_id, "on_disk", disk_bytes=path.stat().st_blocks * 512, actual_size=path.stat().st_size)
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    assert run(config, fix=True, erasable_list=None) == 0
    assert not path.exists() and (root / "quarantine" / RAW).exists()
    with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
        row = ledger.file(file_id)
        assert (row["state"], row["disk_bytes"], row["actual_size"]) == ("wanted", 0, None)
        assert "failed verification" in row["last_error"]
        due = download_candidates(ledger, limit=5, burst=False, now=0.0, max_missing=3, exclude=())
        assert [r["id"] for r in due] == [file_id]
        assert compare(config, ledger).clean


def test_a_checksum_mismatch_is_never_adopted(tmp_path: Path, minimal_config_text: str) -> None:
    config = load_config(_config(tmp_path, minimal_config_text))
    path = _good(config.storage.root, "mskimg")
    data = bytearray(path.read_bytes())
    data[-BLOCK + 7] ^= 0x40  # in the compressed data: the structure is intact, the DATASUM is not
    path.write_bytes(bytes(data))
    assert run(config, fix=True, erasable_list=None) == 0
    with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
        assert ledger.file_by_relpath(MASK) is None
    assert (config.storage.root / "quarantine" / MASK).exists()


def test_a_planted_quarantine_symlink_is_not_followed(tmp_path: Path, minimal_config_text: str) -> None:
    config = load_config(_config(tmp_path, minimal_config_text))
    root = config.storage.root
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "quarantine")
    path = _put(root, RAW)
    assert run(config, fix=True, erasable_list=None) == 1  # the damaged file stays where it is, reported
    assert path.exists() and list(outside.iterdir()) == []
    with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
        assert ledger.file_by_relpath(RAW) is None
