"""``streamer reconcile``: compare what is under the storage root with what the ledger says.

Without ``--fix`` it only reads (it works beside a running daemon) and exits 1 when it
finds a difference. With ``--fix`` it takes the writer's lock and:

- registers files present but unknown (named like archive products, catalogues or
  masters) as ``on_disk``, so that the service adopts them instead of downloading again;
- marks ledger rows whose file is gone (``on_disk -> deleting -> deleted``, through the state
  machine, so that a job that needs them fetches them again);
- removes orphan unfinished files (``.part``, ``.zpart``, ``.tmp``: no download or write of
  theirs can resume) and nothing else.

Read-only trees (``storage.readonly_trees``) are never written: ``--erasable-list FILE``
writes the files there that no consumer keeps (the archive-named ones), one path a line.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from astropy.io import fits

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
from streamer.storage.deleter import unlink_below
from streamer.storage.naming import (
    CalName,
    SciName,
    data_url,
    parse_filename,
)
from streamer.storage.paths import archive_relpath_of, kind_of
from streamer.storage.tree import walk_regular_files

LEDGER_SUFFIXES = ("", "-wal", "-shm", "-journal", ".lock")


@dataclass
class Findings:
    unknown: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    orphan_parts: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.unknown or self.gone or self.orphan_parts or self.size_mismatch)


def _ledger_names(config: Config) -> set[str]:
    ledger_path = config.storage.ledger_path
    if not ledger_path.is_relative_to(config.storage.root):
        return set()
    base = ledger_path.relative_to(config.storage.root).as_posix()
    return {base + suffix for suffix in LEDGER_SUFFIXES}


def compare(config: Config, ledger: Ledger) -> Findings:
    """What differs between the storage root and the ledger."""
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
        if is_unfinished_name(relpath.rsplit("/", 1)[-1]):
            if relpath not in resumable:
                findings.orphan_parts.append(relpath)
            continue
        seen.add(relpath)
        row = ledger.file_by_relpath(relpath)
        if row is None or row["state"] not in ("on_disk", "deleting"):
            if kind_of(relpath) is not None:
                findings.unknown.append(relpath)
        elif row["actual_size"] is not None and row["actual_size"] != info.st_size:
            findings.size_mismatch.append(relpath)
    for row in files_in_states(ledger, ("on_disk",)):
        if row["relpath"] not in seen:
            findings.gone.append(row["relpath"])
    return findings


def apply_fixes(config: Config, ledger: Ledger, findings: Findings) -> None:
    """Apply the fixes that are safe (see the module docstring)."""
    root = config.storage.root
    for relpath in findings.orphan_parts:
        unlink_below(root, relpath)
    with ledger.transaction() as conn:
        for relpath in findings.unknown:
            kind = kind_of(relpath)
            assert kind is not None
            info = os.lstat(root / relpath)
            url = data_url(config.archive.base_url, relpath) if kind in ("raw", "sciimg", "mskimg") else ""
            file_id = ledger.want_file(conn, relpath=relpath, kind=kind, url=url)
            adopt_on_disk(ledger, conn, file_id, disk_bytes=info.st_blocks * 512, actual_size=info.st_size)
        for relpath in findings.gone:
            mark_gone(ledger, conn, relpath, "gone from disk (found by reconcile)")
        ledger.event(
            "reconcile",
            f"registered {len(findings.unknown)} files, {len(findings.gone)} gone, "
            f"{len(findings.orphan_parts)} orphan .part removed",
            conn=conn,
        )


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
    """Exit 0 when disk and ledger agree (or were fixed), 1 when something differs."""
    opener = Ledger.open(config.storage.ledger_path) if fix else _open_readonly(config)
    with opener as ledger:
        findings = compare(config, ledger)
        for label, items in (
            ("unknown to the ledger", findings.unknown),
            ("in the ledger but gone from disk", findings.gone),
            ("orphan .part", findings.orphan_parts),
            ("size differs from the ledger", findings.size_mismatch),
        ):
            if items:
                print(f"{len(items)} {label}: " + ", ".join(items[:5]) + (" ..." if len(items) > 5 else ""))
        if fix and not findings.clean:
            apply_fixes(config, ledger, findings)
            print("fixed: registered unknown files, marked gone files, removed orphan .part files")
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
    return 0 if fix else 1


def _open_readonly(config: Config) -> Ledger:
    if not config.storage.ledger_path.exists():
        return Ledger.memory()
    return Ledger.open(config.storage.ledger_path, readonly=True)
