"""``streamer reconcile``: compare what is under the storage root with what the ledger says.

Without ``--fix`` it only reads (it works beside a running daemon) and exits 1 when it
finds a difference. Every file it would adopt is verified first, with the checks of a download
(FITS structure and sizes, CHECKSUM/DATASUM where present, the size the archive announced), a
readable footer for a parquet catalogue and valid JSON for a focal-plane file. With ``--fix``
it takes the writer's lock and:

- registers files present but unknown (named like archive products, catalogues or
  masters) that pass verification as ``on_disk``, so that the service adopts them instead of
  downloading again; a file on disk whose size differs from the ledger's, or whose first bytes
  are not those of its format, is verified and recorded with its real size;
- moves a file that fails verification to ``quarantine/<relpath>`` below the root (never through
  a symlink) and never records it ``on_disk``: an archive file the ledger had ``on_disk`` is
  ``wanted`` again (downloaded again when needed), a product is marked gone. Quarantined files
  are not ledger rows and not counted against the budget: inspect them, then remove them;
- marks ledger rows whose file is gone (``on_disk -> deleting -> deleted``, through the state
  machine, so that a job that needs them fetches them again);
- removes orphan unfinished files (``.part``, ``.zpart``, ``.tmp``: no download or write of
  theirs can resume) and nothing else.

Read-only trees (``storage.readonly_trees``) are never written: ``--erasable-list FILE``
writes the files there that no consumer keeps (the archive-named ones), one path a line.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits

from streamer.archive.verify import verify_fits
from streamer.config import Config, ConsumerConfig
from streamer.ledger.core import Ledger
from streamer.ledger.files import adopt_on_disk, files_in_states, mark_gone
from streamer.rules.retention import (
    FileFacts,
    Footprint,
    footprint_from_header,
    is_kept,
)
from streamer.service.budget import record_minimum
from streamer.storage.atomic import is_unfinished_name
from streamer.storage.deleter import UnsafePathError, unlink_below
from streamer.storage.naming import (
    CalName,
    SciName,
    data_url,
    parse_filename,
)
from streamer.storage.paths import archive_relpath_of, kind_of
from streamer.storage.quarantine import QUARANTINE_DIRECTORY, is_quarantined, quarantine_below
from streamer.storage.tree import walk_regular_files

LEDGER_SUFFIXES = ("", "-wal", "-shm", "-journal", ".lock")
#: Kinds stored as the archive serves them, so that a size the archive announced must match.
_AS_SERVED: Final = ("raw", "sciimg")
#: Kinds downloaded from the archive (a stored header from its sciimg's URL, a stored mask from its mskimg's).
_ARCHIVE_KINDS: Final = ("raw", "sciimg", "sciimg_header", "mskimg")


@dataclass
class Findings:
    unknown: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    orphan_parts: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)
    #: relpath -> why the file fails verification (unknown or size-mismatched files only).
    failed: dict[str, str] = field(default_factory=dict)
    quarantined: int = 0

    @property
    def clean(self) -> bool:
        return not (self.unknown or self.gone or self.orphan_parts or self.size_mismatch or self.failed)


def _ledger_names(config: Config) -> set[str]:
    ledger_path = config.storage.ledger_path
    if not ledger_path.is_relative_to(config.storage.root):
        return set()
    base = ledger_path.relative_to(config.storage.root).as_posix()
    return {base + suffix for suffix in LEDGER_SUFFIXES}


def verification_failure(path: Path, kind: str, expected_size: int | None) -> str | None:
    """Why a file found under the root is not a complete file of its kind; None when it is.

    The checks of a download (``archive.verify``: FITS structure, sizes, CHECKSUM/DATASUM where
    present; the announced size for files stored as served), a readable footer for a parquet
    catalogue, and valid JSON for a focal-plane file.
    """
    try:
        if path.name.endswith(".parquet"):
            pq.read_metadata(path)
        elif path.name.endswith(".json"):
            json.loads(path.read_bytes())
        else:
            verify_fits(path, kind, expected_size=expected_size if kind in _AS_SERVED else None)
    except (OSError, ValueError, pa.ArrowException) as err:  # VerificationError, JSON and parquet errors are ValueErrors
        return " ".join(str(err).split()) or type(err).__name__
    return None


def _starts_like_its_kind(path: Path) -> bool:
    """The one-read check of every file the ledger has on disk: the magic bytes of FITS, parquet or JSON."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(16)
    except OSError:
        return False
    if path.name.endswith(".parquet"):
        return start.startswith(b"PAR1")
    if path.name.endswith(".json"):
        return start.lstrip()[:1] in (b"{", b"[")
    return start.startswith(b"SIMPLE  = ")


def compare(config: Config, ledger: Ledger) -> Findings:
    """What differs between the storage root and the ledger; found files are verified (read-only)."""
    root = config.storage.root
    findings = Findings()
    skip = _ledger_names(config)
    resumable = {
        r["relpath"] + suffix
        for r in files_in_states(ledger, ("reserved", "downloading"))
        for suffix in (".part", ".zpart")
    }
    seen: set[str] = set()
    for relpath, info in walk_regular_files(root):
        if relpath in skip:
            continue
        if is_quarantined(relpath):
            findings.quarantined += 1
            continue
        if is_unfinished_name(relpath.rsplit("/", 1)[-1]):
            if relpath not in resumable:
                findings.orphan_parts.append(relpath)
            continue
        seen.add(relpath)
        row = ledger.file_by_relpath(relpath)
        kind = kind_of(relpath)
        if row is None or row["state"] not in ("on_disk", "deleting"):
            found = findings.unknown if kind is not None else None
        elif row["state"] == "on_disk" and row["actual_size"] is not None and row["actual_size"] != info.st_size:
            found = findings.size_mismatch
        elif row["state"] == "on_disk" and kind is not None and not _starts_like_its_kind(root / relpath):
            found = findings.size_mismatch  # same size, other bytes (zeroed, overwritten): verified below, fails
        else:
            continue
        if found is None or kind is None:
            continue
        reason = verification_failure(root / relpath, kind, row["expected_size"] if row else None)
        if reason is None:
            found.append(relpath)
        else:
            findings.failed[relpath] = reason
    for row in files_in_states(ledger, ("on_disk",)):
        if row["relpath"] not in seen:
            findings.gone.append(row["relpath"])
    return findings


def apply_fixes(config: Config, ledger: Ledger, findings: Findings) -> list[str]:
    """Apply the fixes that are safe (see the module docstring); return the failed files left in place."""
    root = config.storage.root
    for relpath in findings.orphan_parts:
        unlink_below(root, relpath)
    left_in_place = _quarantine(root, findings.failed)
    with ledger.transaction() as conn:
        for relpath in findings.unknown + findings.size_mismatch:
            kind = kind_of(relpath)
            assert kind is not None
            info = os.lstat(root / relpath)
            url = data_url(config.archive.base_url, archive_relpath_of(relpath)) if kind in _ARCHIVE_KINDS else ""
            file_id = ledger.want_file(conn, relpath=relpath, kind=kind, url=url)
            adopt_on_disk(ledger, conn, file_id, disk_bytes=info.st_blocks * 512, actual_size=info.st_size)
        for relpath in findings.gone:
            mark_gone(ledger, conn, relpath, "gone from disk (found by reconcile)")
        for relpath, reason in findings.failed.items():
            _set_aside(ledger, conn, relpath, f"failed verification (found by reconcile): {reason}")
        ledger.event(
            "reconcile",
            f"registered {len(findings.unknown) + len(findings.size_mismatch)} verified files, "
            f"{len(findings.failed)} failing verification set aside ({len(left_in_place)} left in place), "
            f"{len(findings.gone)} gone, {len(findings.orphan_parts)} orphan .part removed",
            level="warning" if findings.failed else "info",
            conn=conn,
        )
    return left_in_place


def _set_aside(ledger: Ledger, conn: sqlite3.Connection, relpath: str, reason: str) -> None:
    """The row of a file that failed verification: an archive file on disk is wanted again, a product gone."""
    row = ledger.file_by_relpath(relpath)
    if row is None or row["state"] != "on_disk":
        return  # never adopted: the row (if any) keeps its state, the download loop fetches what is needed
    if row["url"]:
        ledger.set_file_state(conn, row["id"], "wanted", expect=("on_disk",), disk_bytes=0, actual_size=None, last_error=reason)
    else:
        mark_gone(ledger, conn, relpath, reason)


def _quarantine(root: Path, failed: dict[str, str]) -> list[str]:
    """Move each failing file below ``quarantine/``; return those that could not be moved (reported)."""
    left_in_place = []
    for relpath, reason in failed.items():
        try:
            moved_to = quarantine_below(root, relpath)
        except FileNotFoundError:
            continue
        except (OSError, UnsafePathError) as err:
            print(f"{relpath}: fails verification ({reason}) and cannot be moved aside: {err}", file=sys.stderr)
            left_in_place.append(relpath)
            continue
        print(f"{relpath}: fails verification ({reason}); moved to {moved_to}")
    return left_in_place


def _kept_by_someone(consumers: tuple[ConsumerConfig, ...], tree: Path, relpath: str) -> bool:
    """The retention rule of the service (``retention.is_kept``) applied to a file of a read-only tree.

    A file whose footprint is needed (a consumer with targets) and cannot be read counts as kept.
    """
    kind = kind_of(relpath)
    if kind is None:
        return True  # not ours to judge
    name = parse_filename(archive_relpath_of(relpath).rsplit("/", 1)[-1])
    night = dt.datetime.strptime(name.night if isinstance(name, CalName) else name.filefracday[:8], "%Y%m%d").date()
    footprints: tuple[Footprint, ...] = ()
    if any(c.targets is not None and kind in c.keep for c in consumers) and isinstance(name, SciName):
        try:
            footprints = (footprint_from_header(fits.getheader(tree / relpath)),)
        except (OSError, KeyError, ValueError):
            return True
    return is_kept(consumers, FileFacts(kind, getattr(name, "field", None), night, footprints))


def erasable_in_readonly_trees(config: Config) -> Iterator[Path]:
    """Archive-named files in the read-only trees that no consumer keeps (kind, field, dates, targets)."""
    for tree in config.storage.readonly_trees:
        for relpath, _info in walk_regular_files(tree):
            if kind_of(relpath) is not None and not _kept_by_someone(config.consumers, tree, relpath):
                yield tree / relpath


def run(config: Config, *, fix: bool, erasable_list: str | None) -> int:
    """Exit 0 when disk and ledger agree (or were fixed), 1 when something differs or stays damaged."""
    opener = Ledger.open(config.storage.ledger_path) if fix else _open_readonly(config)
    left_in_place: list[str] = []
    with opener as ledger:
        findings = compare(config, ledger)
        _report(findings)
        if fix and not findings.clean:
            left_in_place = apply_fixes(config, ledger, findings)
            print(
                "fixed: registered verified unknown files, set aside files failing verification "
                f"(under {QUARANTINE_DIRECTORY}/, archive files to be downloaded again), "
                "marked gone files, removed orphan .part files"
            )
        if fix:
            record_minimum(config, ledger)  # drops recorded sizes no file can have, and the minimum they made
    if erasable_list:
        count = 0
        with open(erasable_list, "w", encoding="utf-8") as out:
            for path in erasable_in_readonly_trees(config):
                out.write(f"{path}\n")
                count += 1
        print(f"{count} files in read-only trees that no consumer keeps: listed in {erasable_list}", file=sys.stderr)
    if findings.clean:
        print("disk and ledger agree")
        return 0
    return 0 if fix and not left_in_place else 1


def _report(findings: Findings) -> None:
    failed = [f"{relpath} ({reason})" for relpath, reason in findings.failed.items()]
    for label, items in (
        ("unknown to the ledger", findings.unknown),
        ("in the ledger but gone from disk", findings.gone),
        ("orphan .part", findings.orphan_parts),
        ("size differs from the ledger", findings.size_mismatch),
        ("failing verification (never adopted)", failed),
    ):
        if items:
            print(f"{len(items)} {label}: " + ", ".join(items[:5]) + (" ..." if len(items) > 5 else ""))
    if findings.quarantined:
        print(f"note: {findings.quarantined} files under {QUARANTINE_DIRECTORY}/ (set aside earlier: inspect, then remove)")


def _open_readonly(config: Config) -> Ledger:
    if not config.storage.ledger_path.exists():
        return Ledger.memory()
    return Ledger.open(config.storage.ledger_path, readonly=True)
