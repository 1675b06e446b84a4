"""Per-consumer figures of ``status --json``, exact, for consumers whose selections overlap (real CLI backfills).

The simulated night has three science exposures on CCD 13: two of one field, one of another. The
archive refuses (404) the raw of the lone exposure: it is removed from the archive after the
simulator indexed it, so the search still lists it. Consumers:

- ``fieldfan`` keeps the raws and the sciimg headers of the two-exposure field;
- ``rawall`` keeps the raws of both fields (so it shares two raws with ``fieldfan``, and is owed the refused one);
- ``ubercal`` keeps the catalogues (so the night is processed; the lone exposure's catalogue cannot be made).

Expected figures come from the archive's own file names and an independent walk of the store
(``os.lstat``, ``st_blocks``). A second backfill adds a consumer of the first field's masks, which
had been erased: the night is planned again and they are fetched. A third one drops it again.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e import NIGHT, backfill_args, config_for, run_cli, status_json, store_of
from streamer.demo import serve_archive
from streamer.ledger.core import Ledger
from streamer.sim.generate import generate_night


def _field(relpath: str) -> int:
    return int(Path(relpath).name.split("_")[2])


def _allocated(store: Path, relpaths: set[str]) -> tuple[int, int]:
    """(regular files present, their allocated bytes) among ``relpaths`` under ``store``, by lstat."""
    files = allocated = 0
    for relpath in relpaths:
        try:
            info = os.lstat(store / relpath)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode):
            files += 1
            allocated += info.st_blocks * 512
    return files, allocated


def _walk(store: Path, top: str, suffix: str) -> set[str]:
    """Relpaths of the regular files below ``store/top`` whose names end with ``suffix``."""
    found = set()
    for directory, _dirs, names in os.walk(store / top, followlinks=False):
        for name in names:
            path = Path(directory) / name
            if name.endswith(suffix) and stat.S_ISREG(os.lstat(path).st_mode):
                found.add(path.relative_to(store).as_posix())
    return found


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The archive served with one raw refused, and what the test derives from its file names."""
    tmp = tmp_path_factory.mktemp("consumers")
    archive = tmp / "archive"
    generate_night(archive, NIGHT, ccds=(13,), n_exposures=3, flats_per_led=2, n_biases=8, seed=7, shape="small", jobs=1)
    science = sorted(p.relative_to(archive).as_posix() for p in (archive / "raw").rglob("*_o.fits.fz"))
    by_field: dict[int, list[str]] = {}
    for relpath in science:
        by_field.setdefault(_field(relpath), []).append(relpath)
    assert sorted(len(v) for v in by_field.values()) == [1, 2], by_field
    pair = next(f for f, v in by_field.items() if len(v) == 2)
    lone = next(f for f, v in by_field.items() if len(v) == 1)
    sciimgs = sorted(p.relative_to(archive).as_posix() for p in (archive / "sci").rglob("*_sciimg.fits"))
    pair_sciimgs = [s for s in sciimgs if _field(s) == pair]
    assert len(pair_sciimgs) == 8
    with serve_archive(archive) as url:
        refused = by_field[lone][0]
        (archive / refused).unlink()  # after the simulator indexed it: listed by the search, 404 when asked
        yield {
            "tmp": tmp, "archive": archive, "url": url, "pair": pair, "lone": lone, "refused": refused,
            "pair_raws": set(by_field[pair]),
            "pair_headers": {s.replace("_sciimg.fits", "_sciimg.header.fits") for s in pair_sciimgs},
            "pair_masks": {s.replace("_sciimg.fits", "_mskimg.fits.fz") for s in pair_sciimgs},
            "catalogue_names": {Path(r).name.replace(".fits.fz", "_apcat.parquet") for r in science},
        }  # fmt: skip


def _consumers(pair: int, lone: int, *, late: bool) -> str:
    text = (
        f'\n[[consumers]]\nname = "fieldfan"\nkeep = ["raw", "sciimg_header"]\nfields = [{pair}]\n'
        f'\n[[consumers]]\nname = "rawall"\nkeep = ["raw"]\nfields = [{pair}, {lone}]\n'
    )  # with the demo configuration's own consumer, ubercal, keeping the catalogues
    if late:
        text += f'\n[[consumers]]\nname = "late"\nkeep = ["mskimg"]\nfields = [{pair}]\n'
    return text


def _backfill(night: dict[str, Any], *, late: bool) -> Path:
    config = config_for(night["tmp"], night["archive"], night["url"], budget=10**10,
                        extra=_consumers(night["pair"], night["lone"], late=late))  # fmt: skip
    result = run_cli(config, *backfill_args())
    # the refused raw's exposure cannot be processed: the backfill ends incomplete (exit 1), nothing else fails
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 files missing or corrupt" in result.stdout, result.stdout
    return config


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["consumers"]}


def _ledger_rows(config: Path, sql: str) -> list[tuple[Any, ...]]:
    path = store_of(config) / "ledger.sqlite"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute(sql).fetchall()


@pytest.fixture(scope="module")
def first(night: dict[str, Any]) -> dict[str, Any]:
    config = _backfill(night, late=False)
    return {"config": config, "store": store_of(config), "report": status_json(config)}


def _expect(on_disk: tuple[int, int], *, lacking: int = 0, owed: int = 0, refusals: int = 0) -> dict[str, int]:
    return {"on_disk_files": on_disk[0], "on_disk_bytes": on_disk[1], "lacking_files": lacking, "lacking_bytes": 0,
            "owed_files": owed, "missing_files": lacking + owed, "refusals": refusals}  # fmt: skip


def _figures(consumer: dict[str, Any]) -> dict[str, int]:
    return {k: consumer[k] for k in ("on_disk_files", "on_disk_bytes", "lacking_files", "lacking_bytes", "owed_files",
                                     "missing_files", "refusals")}  # fmt: skip


def test_overlapping_consumers_get_exact_figures(night: dict[str, Any], first: dict[str, Any]) -> None:
    store, consumers = first["store"], _by_name(first["report"])
    assert set(consumers) == {"fieldfan", "rawall", "ubercal"}
    fieldfan_files = night["pair_raws"] | night["pair_headers"]
    assert _allocated(store, fieldfan_files)[0] == 2 + 8, "fieldfan's files are not all on disk"
    assert _figures(consumers["fieldfan"]) == _expect(_allocated(store, fieldfan_files))
    # rawall shares the pair's raws with fieldfan, and is owed the refused raw, asked once in a backfill
    assert not (store / night["refused"]).exists()
    assert _figures(consumers["rawall"]) == _expect(_allocated(store, night["pair_raws"]), owed=1, refusals=1)
    # every catalogue on disk, by a walk of the store, is one of the pair's exposures; the lone one's is owed
    on_disk_catalogues = _walk(store, "apcat", ".parquet")
    expected = {c for c in night["catalogue_names"] if _field(c) == night["pair"]}
    assert {Path(c).name for c in on_disk_catalogues} == expected and len(on_disk_catalogues) == 2
    assert _figures(consumers["ubercal"]) == _expect(_allocated(store, on_disk_catalogues), owed=1)
    assert first["report"]["refusals"] == 1
    # the raws nobody keeps (calibration frames) were erased at the end: the consumers' raws are all that is left
    assert _walk(store, "raw", ".fits.fz") == night["pair_raws"]


def test_the_refusal_count_survives_the_pruning_of_events(first: dict[str, Any]) -> None:
    config = first["config"]
    assert _ledger_rows(config, "SELECT COUNT(*) FROM events WHERE kind = 'file_missing'") == [(1,)]
    with Ledger.open(store_of(config) / "ledger.sqlite") as ledger:
        ledger.prune_events(older_than_s=-60.0)
    assert _ledger_rows(config, "SELECT COUNT(*) FROM events") == [(0,)]
    after = status_json(config)
    assert after["refusals"] == 1
    assert [_figures(c) for c in after["consumers"]] == [_figures(c) for c in first["report"]["consumers"]]


def test_a_consumer_added_later_reaches_the_night_and_one_removed_stops_keeping(
    night: dict[str, Any], first: dict[str, Any]
) -> None:
    store = first["store"]
    masks = night["pair_masks"]
    assert _allocated(store, masks)[0] == 0, "the masks were not erased after the first backfill: the test shows nothing"
    config = _backfill(night, late=True)
    consumers = _by_name(status_json(config))
    assert _allocated(store, masks)[0] == 8, "the night was not planned again for the new consumer"
    assert _figures(consumers["late"]) == _expect(_allocated(store, masks))
    assert _figures(consumers["rawall"]) == _expect(_allocated(store, night["pair_raws"]), owed=1, refusals=1)
    assert _figures(consumers["fieldfan"]) == _expect(_allocated(store, night["pair_raws"] | night["pair_headers"]))
    config = _backfill(night, late=False)
    assert _allocated(store, masks)[0] == 0, "the masks of a removed consumer were kept"
    assert _ledger_rows(config, "SELECT COUNT(*) FROM keeps WHERE consumer = 'late'") == [(0,)]
    assert set(_by_name(status_json(config))) == {"fieldfan", "rawall", "ubercal"}

