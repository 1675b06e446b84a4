"""Every configuration option is classified, and every product option is run end to end.

An option no test ran is broken until shown otherwise. ``PRODUCT_OPTIONS`` lists the options that
change what the service writes, each with the end-to-end test (through the real CLI) that runs it with
a non-default value; ``OPERATIONAL_OPTIONS`` the others, each with why it changes no product. A new
option of ``streamer/config.py`` in neither table fails ``test_every_option_is_classified``.

The runs here share one small simulated archive (CCD 13, zg only): night 1 with its calibration and two
exposures, night 2 with biases and one exposure but no flats. Each option run is compared with one
reference run of the defaults.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import json
import math
import os
import sqlite3
import stat
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from e2e import NIGHT, backfill_args, config_for, run_cli, status_json, store_of
from in2p3_reader import apcat_path, in2p3_columns, in2p3_dtypes
from streamer import config as config_module
from streamer.demo import serve_archive
from streamer.sim.generate import generate_night

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
HERE = "tests/test_options_e2e.py"
NIGHT2 = NIGHT + dt.timedelta(days=1)
CCD = 13
UNLIMITED = 50 * 10**9
QUADRANT_ROWS, QUADRANT_COLS = 260, 256  # the "small" frame of the simulator
LEDGER_FILES = frozenset({"ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm", "ledger.sqlite-journal", "ledger.sqlite.lock"})
FLAG_MASKED, FLAG_EDGE = 1 << 8, 1 << 9  # streamer.photometry's documented flag bits
IPAC_SOURCE_BIT = 1 << 1  # IPAC mskimg BIT01, set by the simulator on stars; not in the default reject bits

# option -> (section, TOML line) of each backfill of this module that runs a non-default value
DETREND_RUNS: dict[str, str] = {
    "overscan_degree": "overscan_degree = 1",
    "overscan_columns": "overscan_columns = [12, 30]",
    "overscan_outlier_nmad": "overscan_outlier_nmad = 6.0",
    "nonlinearity_off": 'nonlinearity = "off"',
    "nonlinearity_before_overscan": 'nonlinearity = "before_overscan"',
    "clip_sigma": "clip_sigma = 1.5",
    "led_weights": 'led_weights = { "2" = 4.0 }',
}
BLOCKING_RUNS: dict[str, tuple[str, str]] = {
    # option line, the job kind it blocks first (the simulator makes 7 biases, 2 skipped, and 2 flats per LED)
    "min_bias_frames": ("min_bias_frames = 6", "master_bias"),
    "min_flats_per_led": ("min_flats_per_led = 3", "led_flat"),
}

PRODUCT_OPTIONS: dict[str, str] = {
    "detrend.overscan_columns": f"{HERE}::test_detrend_option_changes_the_catalogues[overscan_columns]",
    "detrend.overscan_degree": f"{HERE}::test_detrend_option_changes_the_catalogues[overscan_degree]",
    "detrend.overscan_outlier_nmad": f"{HERE}::test_detrend_option_changes_the_catalogues[overscan_outlier_nmad]",
    "detrend.nonlinearity": f"{HERE}::test_detrend_option_changes_the_catalogues[nonlinearity_off]",
    "detrend.bias_skip_first": "tests/test_service_e2e.py::test_backfill_writes_catalogues_and_status_shows_it",
    "detrend.min_bias_frames": f"{HERE}::test_calibration_threshold_blocks_the_night[min_bias_frames]",
    "detrend.min_flats_per_led": f"{HERE}::test_calibration_threshold_blocks_the_night[min_flats_per_led]",
    "detrend.clip_sigma": f"{HERE}::test_detrend_option_changes_the_catalogues[clip_sigma]",
    "detrend.flat_normalisation": "tests/test_focalplane_e2e.py::test_one_run_gives_both_variants_against_the_truth",
    "detrend.led_weights": f"{HERE}::test_detrend_option_changes_the_catalogues[led_weights]",
    "detrend.max_calibration_gap_days": f"{HERE}::test_calibration_gap_zero_blocks_the_night_without_flats",
    "detrend.write_detrended": "tests/test_detrended_e2e.py::test_kept_detrended_images_are_ledger_rows_on_disk",
    "detrend.detrended_quantize_step": f"{HERE}::test_background_isolation_edge_and_detrended_options",
    "detrend.pocket": "tests/test_pocket_e2e.py::test_pocket_option_end_to_end",
    "photometry.catalog_dir": f"{HERE}::test_reference_run_of_the_defaults",
    "photometry.radii": f"{HERE}::test_radii_and_mask_reject_bits",
    "photometry.mask_reject_bits": f"{HERE}::test_radii_and_mask_reject_bits",
    "photometry.isolation_arcsec": f"{HERE}::test_background_isolation_edge_and_detrended_options",
    "photometry.background_box": f"{HERE}::test_background_isolation_edge_and_detrended_options",
    "photometry.edge_margin_px": f"{HERE}::test_background_isolation_edge_and_detrended_options",
    "photometry.layout": f"{HERE}::test_in2p3_layout_is_what_the_in2p3_reader_finds_and_holds_our_fluxes",
}

_SECRET = "login to the archive: the same files whoever fetches them"
_RETENTION = "decides what stays on disk or what is fetched, not what a product holds"
OPERATIONAL_OPTIONS: dict[str, str] = {
    "storage.root": "where products go, not what they hold",
    "storage.budget": "how much may be on disk at once; tests/test_service_e2e.py checks a tight budget gives the same catalogues",
    "storage.high_watermark": "when the evictor starts",
    "storage.low_watermark": "where the evictor stops",
    "storage.ledger": "where the ledger lives",
    "storage.readonly_trees": "files found elsewhere instead of downloaded: the same bytes (checksummed)",
    "archive.base_url": "where files are downloaded from",
    "archive.max_connections": "download concurrency",
    "archive.connect_timeout_s": "download timeout",
    "archive.read_timeout_s": "download timeout",
    "archive.min_rate_bytes_per_s": "stall detection of a download",
    "archive.min_rate_window_s": "stall detection of a download",
    "archive.max_attempts": "download retries",
    "archive.missing_retry_hours": "when a file the archive refused is asked for again",
    "archive.missing_max_attempts": "how often a refused file is asked for",
    "archive.auth": _SECRET,
    "archive.auth.username": _SECRET,
    "archive.auth.password_env": _SECRET,
    "archive.auth.password_file": _SECRET,
    "compute.executor": "where the same worker functions run (local pool or dask)",
    "compute.workers": "how many run at once",
    "compute.scheduler": "the dask scheduler's address",
    "compute.worker_wait_s": "how long to wait for dask workers",
    "compute.memory_per_task": "how tasks are packed onto workers",
    "compute.slurm": "how dask workers are started",
    "compute.slurm.queue": "how dask workers are started",
    "compute.slurm.account": "how dask workers are started",
    "compute.slurm.cores": "how dask workers are started",
    "compute.slurm.processes": "how dask workers are started",
    "compute.slurm.memory": "how dask workers are started",
    "compute.slurm.walltime": "how dask workers are started",
    "compute.slurm.jobs": "how dask workers are started",
    "consumers.name": _RETENTION,
    "consumers.keep": _RETENTION + " (write_detrended decides whether detrended images are made)",
    "consumers.fields": _RETENTION,
    "consumers.start": _RETENTION,
    "consumers.end": _RETENTION,
    "consumers.targets": _RETENTION,
    "backfill.ranges": "which nights are processed, not how",
    "backfill.ccds": "which CCDs are processed, not how",
    "follow.enabled": "whether new nights are picked up as they come",
    "follow.delay_hours": "when a new night is picked up",
    "follow.poll_minutes": "how often the archive is asked for new nights",
    "service.max_task_attempts": "when a failing task is parked",
    "service.shutdown_grace_s": "how long a stop waits for running tasks",
    "service.event_retention_days": "how long ledger events are kept",
    "service.log_level": "what is logged",
    "metrics.listen": "where the Prometheus endpoint listens",
    "report.after_night": "whether the daemon writes each night's QA page (run in tests/test_report.py)",
    "report.directory": "where the QA pages go, outside the storage root (run in tests/test_report.py)",
}


# --- the classification ------------------------------------------------------------------------


def _section_classes(annotation: Any) -> list[type]:
    """The configuration dataclasses inside a field's type (``X``, ``X | None``, ``tuple[X, ...]``)."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, tuple):
        return [c for arg in typing.get_args(annotation) for c in _section_classes(arg)]
    return []


def config_options(cls: type = config_module.Config, prefix: str = "") -> list[str]:
    """Every key of the configuration as "section.key", walking the dataclasses of streamer/config.py."""
    hints = typing.get_type_hints(cls, vars(config_module))
    keys = []
    for fdef in dataclasses.fields(cls):
        if fdef.metadata.get("parse") is None:
            continue  # not read from the file (Config.source)
        name = f"{prefix}{fdef.name}"
        sections = _section_classes(hints[fdef.name])
        if not sections or prefix:
            keys.append(name)
        for section in sections:
            keys += config_options(section, name + ".")
    return keys


def _test_names(path: Path) -> set[str]:
    """Names of the test functions and methods defined in a test module (read with ast, not imported)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{m.name}" for m in node.body if isinstance(m, ast.FunctionDef) and m.name.startswith("test")}
    return names


def _node_exists(node_id: str) -> bool:
    module, _, name = node_id.partition("::")
    path = REPO / module
    if not path.is_file():
        return False
    function, _, param = name.partition("[")
    if function not in _test_names(path):
        return False
    if param and module == HERE:  # a run of this module: its id must be one of the runs
        return param.rstrip("]") in {*DETREND_RUNS, *BLOCKING_RUNS}
    return True


def test_config_walk_finds_nested_sections() -> None:
    options = config_options()
    assert "storage.budget" in options and "compute.slurm.walltime" in options and "consumers.keep" in options
    assert "archive.auth.username" in options and "detrend.nonlinearity" in options
    assert "storage" not in options and "source" not in options  # a [section] is not a key; source is not read


def test_every_option_is_classified() -> None:
    options = set(config_options())
    unclassified = sorted(options - set(PRODUCT_OPTIONS) - set(OPERATIONAL_OPTIONS))
    assert not unclassified, f"options in neither PRODUCT_OPTIONS nor OPERATIONAL_OPTIONS: {unclassified}"
    both = sorted(set(PRODUCT_OPTIONS) & set(OPERATIONAL_OPTIONS))
    assert not both, f"options in both tables: {both}"
    stale = sorted(set(OPERATIONAL_OPTIONS) - options)
    assert not stale, f"OPERATIONAL_OPTIONS lists options config.py does not have: {stale}"
    assert all(reason.strip() for reason in OPERATIONAL_OPTIONS.values())


def test_each_product_option_names_an_existing_end_to_end_test() -> None:
    """An option present in config.py must have its listed test present (detrend.pocket may come later)."""
    options = set(config_options())
    missing = sorted(f"{opt} -> {node}" for opt, node in PRODUCT_OPTIONS.items() if opt in options and not _node_exists(node))
    assert not missing, f"product options whose end-to-end test does not exist: {missing}"
    planned = sorted(opt for opt in PRODUCT_OPTIONS if opt not in options)
    assert planned in ([], ["detrend.pocket"]), f"PRODUCT_OPTIONS lists options config.py does not have: {planned}"


def test_node_check_can_fail() -> None:
    assert _node_exists(f"{HERE}::test_every_option_is_classified")
    assert _node_exists(f"{HERE}::test_detrend_option_changes_the_catalogues[clip_sigma]")
    assert not _node_exists(f"{HERE}::test_detrend_option_changes_the_catalogues[no_such_run]")
    assert not _node_exists(f"{HERE}::test_no_such_test")
    assert not _node_exists("tests/test_no_such_module.py::test_x")


# --- the runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive")
    common: dict[str, Any] = dict(ccds=(CCD,), flats_per_led=2, n_biases=7, shape="small", jobs=2, filters=("zg",))
    generate_night(out, NIGHT, n_exposures=2, seed=21, fields=(655, 656), flat_filters=("zg",), **common)
    generate_night(out, NIGHT2, n_exposures=1, seed=22, fields=(655,), flat_filters=(), **common)
    return out


@pytest.fixture(scope="module")
def base_url(archive: Path) -> Iterator[str]:
    with serve_archive(archive) as url:
        yield url


@dataclasses.dataclass(frozen=True)
class Run:
    config: Path
    returncode: int
    output: str

    @property
    def store(self) -> Path:
        return store_of(self.config)


def backfill(
    tmp: Path, archive: Path, base_url: str, name: str, *, detrend: str = "", photometry: str = "", extra: str = "",
    end: dt.date = NIGHT,
) -> Run:
    """One backfill of CCD 13 through the real CLI with the given lines added to [detrend] and [photometry]."""
    config = config_for(tmp, archive, base_url, budget=UNLIMITED, name=f"{name}.toml", extra=extra)
    text = config.read_text()
    assert "\n[detrend]\n" in text and "\n[photometry]\n" in text
    text = text.replace("\n[detrend]\n", f"\n[detrend]\n{detrend}\n", 1)
    config.write_text(text.replace("\n[photometry]\n", f"\n[photometry]\n{photometry}\n", 1))
    result = run_cli(config, *backfill_args(NIGHT, end, ccds=(CCD,)))
    return Run(config, result.returncode, result.stdout + result.stderr)


def _walk(store: Path) -> dict[str, int]:
    """Allocated bytes (st_blocks x 512) of each regular file under the store but the ledger's own, by relpath.

    The walk of tests/e2e.py's meter: no symlink followed or counted."""
    found = {}
    for directory, _dirs, names in os.walk(store, followlinks=False):
        for name in names:
            info = os.lstat(os.path.join(directory, name))
            relpath = Path(directory, name).relative_to(store).as_posix()
            if stat.S_ISREG(info.st_mode) and relpath not in LEDGER_FILES:
                found[relpath] = info.st_blocks * 512
    return found


def _ledger_files(store: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(f"file:{store / 'ledger.sqlite'}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return {r["relpath"]: dict(r) for r in conn.execute("SELECT relpath, kind, state, disk_bytes FROM files")}


def check_store(run: Run, *, exit_code: int = 0) -> dict[str, int]:
    """The exit code, every file under the root an on_disk ledger row of its allocated size, and
    status's used_bytes equal to the walk (the ledger's own files are not in the budget's count)."""
    assert run.returncode == exit_code, run.output[-3000:]
    on_disk = _walk(run.store)
    rows = _ledger_files(run.store)
    strays = sorted(p for p in on_disk if rows.get(p, {}).get("state") != "on_disk")
    assert not strays, f"files under the root that are not on_disk ledger rows: {strays}"
    ghosts = sorted(p for p, r in rows.items() if r["state"] == "on_disk" and p not in on_disk)
    assert not ghosts, f"ledger rows on_disk that are not on disk: {ghosts}"
    assert all(rows[p]["disk_bytes"] == size for p, size in on_disk.items())
    budget = status_json(run.config)["budget"]
    assert budget["used_bytes"] == sum(on_disk.values())
    assert budget["reserved_bytes"] == 0
    return on_disk


def _catalogues(store: Path, night: dt.date = NIGHT) -> dict[tuple[int, int, int], dict[str, Any]]:
    """Rows of the night's catalogues keyed by (filefracday, qid, source_id)."""
    rows = {}
    for path in sorted((store / "apcat" / f"{night:%Y}" / f"{night:%m%d}").glob("*_apcat.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows[(row["filefracday"], row["qid"], row["source_id"])] = row
    return rows


def _apcat_record(store: Path) -> dict[str, Any]:
    path = next((store / "apcat").rglob("*_apcat.parquet"))
    metadata = pq.read_schema(path).metadata
    return json.loads(metadata[b"streamer"])  # type: ignore[no-any-return]


def _radii(row: dict[str, Any]) -> list[float]:
    return [row[f"r_{k}"] for k in range(64) if f"r_{k}" in row]


def _flux_changed(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return any(not math.isclose(a[f"f_{k}"], b[f"f_{k}"], rel_tol=1e-6, abs_tol=1e-3) for k in range(len(_radii(a))))


class Runs:
    """The backfills of this module, each made once, when a test first asks for it."""

    def __init__(self, tmp: Path, archive: Path, base_url: str) -> None:
        self.tmp, self.archive, self.base_url = tmp, archive, base_url
        self.done: dict[str, Run] = {}

    def get(self, name: str, **settings: Any) -> Run:
        if name not in self.done:
            self.done[name] = backfill(self.tmp, self.archive, self.base_url, name, **settings)
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, archive: Path, base_url: str) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), archive, base_url)


@pytest.fixture(scope="module")
def reference(runs: Runs) -> Run:
    """The defaults, over both nights (night 2 is calibrated by night 1's flats, 1 day away)."""
    return runs.get("reference", end=NIGHT2)


def test_reference_run_of_the_defaults(reference: Run) -> None:
    on_disk = check_store(reference)
    report = status_json(reference.config)
    assert report["jobs"]["exposure"] == {"done": 3}
    assert sorted(p for p in on_disk if p.startswith("apcat/")) == sorted(
        p.relative_to(reference.store).as_posix() for p in (reference.store / "apcat").rglob("*.parquet")
    )
    assert len(_catalogues(reference.store)) > 50 and len(_catalogues(reference.store, NIGHT2)) > 20
    with sqlite3.connect(f"file:{reference.store / 'ledger.sqlite'}?mode=ro", uri=True) as conn:
        apcats = conn.execute("SELECT COUNT(*) FROM files WHERE kind = 'apcat' AND state = 'on_disk'").fetchone()[0]
    assert apcats == 3


@pytest.mark.parametrize("option", sorted(DETREND_RUNS))
def test_detrend_option_changes_the_catalogues(option: str, runs: Runs, reference: Run) -> None:
    run = runs.get(option, detrend=DETREND_RUNS[option])
    check_store(run)
    assert status_json(run.config)["jobs"]["exposure"] == {"done": 2}
    mine, theirs = _catalogues(run.store), _catalogues(reference.store)
    assert set(mine) == set(theirs) and len(mine) > 50
    assert all(mine[k]["x"] == theirs[k]["x"] and mine[k]["y"] == theirs[k]["y"] for k in mine)
    changed = sum(_flux_changed(mine[k], theirs[k]) for k in mine)
    assert changed > 0.5 * len(mine), f"{option}: only {changed} of {len(mine)} sources changed"
    key, _, value = DETREND_RUNS[option].partition(" = ")
    recorded = _apcat_record(run.store)["detrend_config"][key]
    assert json.dumps(recorded) != json.dumps(_apcat_record(reference.store)["detrend_config"][key])


def test_background_isolation_edge_and_detrended_options(runs: Runs, reference: Run) -> None:
    """background_box alone changes fluxes here (detrended images are written before photometry,
    isolation and the edge margin only set a column and a flag); each other option has its own mark."""
    run = runs.get(
        "photometry-1",
        detrend="write_detrended = true\ndetrended_quantize_step = 1.0",
        photometry="background_box = [64, 64]\nisolation_arcsec = 60.0\nedge_margin_px = 20.0",
        extra='\n[[consumers]]\nname = "images"\nkeep = ["detrended"]\n',
    )
    on_disk = check_store(run)
    mine, theirs = _catalogues(run.store), _catalogues(reference.store)
    assert set(mine) == set(theirs)
    # background_box: every flux moves with the background map
    changed = sum(_flux_changed(mine[k], theirs[k]) for k in mine)
    assert changed > 0.9 * len(mine), (changed, len(mine))
    # isolation_arcsec: two sources of one quadrant within 60" are both not isolated; fewer isolated than at 20"
    assert {k for k, r in mine.items() if r["isolated"]} < {k for k, r in theirs.items() if r["isolated"]}
    for (ffd, qid, _), row in mine.items():
        for (ffd2, qid2, _), other in mine.items():
            if (ffd, qid) == (ffd2, qid2) and row is not other and _separation_arcsec(row, other) < 60.0:
                assert not row["isolated"] and not other["isolated"]
    # edge_margin_px: FLAG_EDGE exactly where an aperture plus 20 px reaches past the quadrant, by its own rule
    for margin, rows in ((20.0, mine), (0.0, theirs)):
        for row in rows.values():
            for k, radius in enumerate(_radii(row)):
                reach = radius + margin
                near = min(row["x"], row["y"]) - reach < -0.5 or row["x"] + reach > QUADRANT_COLS - 0.5 or row["y"] + reach > QUADRANT_ROWS - 0.5
                assert bool(row[f"f_{k}_f"] & FLAG_EDGE) == near, (margin, row["source_id"], k)
    assert sum(bool(r["f_0_f"] & FLAG_EDGE) for r in mine.values()) > sum(bool(r["f_0_f"] & FLAG_EDGE) for r in theirs.values())
    # write_detrended and detrended_quantize_step: kept images, ledger rows, quantised with a step of 1.0
    images = sorted(p for p in on_disk if p.startswith("detrended/"))
    assert len(images) == 4 * 2
    for relpath in images[:2]:
        with fits.open(run.store / relpath, disable_image_compression=True) as hdus:
            tiles = [hdu for hdu in hdus if isinstance(hdu, fits.BinTableHDU) and "ZSCALE" in hdu.columns.names]
            assert tiles, relpath
            assert np.allclose(tiles[0].data["ZSCALE"], 1.0), relpath


def _separation_arcsec(a: dict[str, Any], b: dict[str, Any]) -> float:
    ra1, dec1, ra2, dec2 = map(math.radians, (a["ra"], a["dec"], b["ra"], b["dec"]))
    cos = math.sin(dec1) * math.sin(dec2) + math.cos(dec1) * math.cos(dec2) * math.cos(ra1 - ra2)
    return math.degrees(math.acos(min(1.0, cos))) * 3600.0


def test_radii_and_mask_reject_bits(runs: Runs, reference: Run) -> None:
    """mask_reject_bits decides which IPAC mask bits reject pixels (there is no separate switch for
    using the IPAC mask): adding BIT01 (stars) flags most apertures and shows in mask_bits."""
    run = runs.get("photometry-2", photometry="radii = [2.5, 5.0, 7.5]\nmask_reject_bits = 6143")
    check_store(run)
    mine, theirs = _catalogues(run.store), _catalogues(reference.store)
    assert set(mine) == set(theirs)
    assert all(_radii(r) == [2.5, 5.0, 7.5] and "f_3" not in r for r in mine.values())
    assert all(len(_radii(r)) == 10 for r in theirs.values())
    assert all(r["ipac_mask"] for r in mine.values())
    with_star_bit = [r for r in mine.values() if r["mask_bits"] & IPAC_SOURCE_BIT]
    assert len(with_star_bit) > 0.5 * len(mine)
    assert all(r["f_2_f"] & FLAG_MASKED for r in with_star_bit)
    assert not any(r["mask_bits"] & IPAC_SOURCE_BIT for r in theirs.values())


@pytest.mark.parametrize("option", sorted(BLOCKING_RUNS))
def test_calibration_threshold_blocks_the_night(option: str, runs: Runs, reference: Run) -> None:
    line, first_blocked = BLOCKING_RUNS[option]
    run = runs.get(option, detrend=line)
    on_disk = check_store(run, exit_code=1)
    assert "backfill incomplete" in run.output
    jobs = status_json(run.config)["jobs"]
    assert jobs["exposure"] == {"blocked": 2} and first_blocked in jobs and "blocked" in jobs[first_blocked]
    assert not any(p.startswith("apcat/") for p in on_disk)


def test_calibration_gap_zero_blocks_the_night_without_flats(runs: Runs, reference: Run) -> None:
    run = runs.get("gap-0", detrend="max_calibration_gap_days = 0", end=NIGHT2)
    check_store(run, exit_code=1)
    assert status_json(run.config)["jobs"]["exposure"] == {"blocked": 1, "done": 2}
    assert _catalogues(run.store) == _catalogues(reference.store)
    assert _catalogues(run.store, NIGHT2) == {} and len(_catalogues(reference.store, NIGHT2)) > 20
    # with the default gap (10 days) night 2 was calibrated by night 1's flat
    night2 = next((reference.store / "apcat" / f"{NIGHT2:%Y}" / f"{NIGHT2:%m%d}").glob("*_apcat.parquet"))
    record = json.loads(pq.read_schema(night2).metadata[b"streamer"])
    assert (record["master_flat_night"], record["master_bias_night"]) == (NIGHT.isoformat(), NIGHT2.isoformat())


def test_in2p3_layout_is_what_the_in2p3_reader_finds_and_holds_our_fluxes(runs: Runs, reference: Run) -> None:
    """layout = "in2p3": one file per quadrant where the IN2P3 path rule looks (tests/in2p3_reader.py),
    columns by name in its order and types, x and y in ztfimg's orientation, and the fluxes of the
    default layout up to float32 rounding, NaN exactly where a rejected pixel overlaps the aperture.
    (The fluxes divided by the focal-plane factor, checked on four CCDs in tests/test_focalplane_e2e.py.)"""
    run = runs.get("in2p3", photometry='layout = "in2p3"')
    on_disk = check_store(run)  # every file a ledger row of its size, counted in the budget
    assert not any(p.startswith("apcat/") for p in on_disk)
    rows = _ledger_files(run.store)
    ours = _catalogues(reference.store)
    raws = sorted(p.rsplit("/", 1)[1].replace("_apcat.parquet", ".fits.fz") for p in _walk(reference.store) if p.startswith("apcat/2020/0924/"))
    assert len(raws) == 2
    radii = _radii(next(iter(ours.values())))
    n = len(radii)
    found: set[tuple[int, int, int]] = set()
    nan_count = 0
    for raw in raws:
        for qid in (1, 2, 3, 4):
            path = Path(apcat_path(str(run.store), raw, qid))
            relpath = path.relative_to(run.store).as_posix()
            assert path.is_file() and rows[relpath]["kind"] == "apcat" and rows[relpath]["state"] == "on_disk", relpath
            table = pq.read_table(path, columns=in2p3_columns(n))
            assert pq.read_schema(path).names == in2p3_columns(n)
            # the IN2P3 production variant by default: focal-plane flat, here of one CCD (factor 1)
            record = json.loads(pq.read_schema(path).metadata[b"streamer"])
            assert record["detrend_config"]["flat_normalisation"] == "focalplane" and record["focalplane_factor"] == 1.0
            read = {c: table[c].to_numpy(zero_copy_only=False) for c in in2p3_columns(n)}
            assert {c: v.dtype for c, v in read.items()} == in2p3_dtypes(n)
            ffd = int(raw.split("_")[1])
            for i, source_id in enumerate(read["source_id"]):
                key = (ffd, qid, int(source_id))
                mine = ours[key]
                found.add(key)
                # ztfimg's orientation, transformed back onto the IPAC grid of our layout
                assert QUADRANT_COLS - 1 - float(read["x"][i]) == pytest.approx(mine["x"], abs=1e-4)
                assert QUADRANT_ROWS - 1 - float(read["y"][i]) == pytest.approx(mine["y"], abs=1e-4)
                assert read["ra"][i] == np.float32(mine["ra"]) and read["isolated"][i] == mine["isolated"]
                for k in range(n):
                    masked = bool(mine[f"f_{k}_f"] & FLAG_MASKED)
                    assert np.isnan(read[f"f_{k}"][i]) == masked, (key, k)
                    nan_count += masked
                    if not masked:
                        assert read[f"f_{k}"][i] == np.float32(mine[f"f_{k}"]), (key, k)
                    assert read[f"f_{k}_e"][i] == np.float32(mine[f"f_{k}_e"])
                    assert read[f"f_{k}_f"][i] == mine[f"f_{k}_f"] & 0xFF and read[f"r_{k}"][i] == int(radii[k])
    assert found == set(ours) and len(found) > 50  # the same sources, none lost or added
    assert nan_count > 0, "the simulated masks put a rejected pixel in some aperture"
    assert sum(1 for p in on_disk if p.startswith("ztfin2p3/sci/")) == 8
