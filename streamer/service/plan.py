"""What a night needs: exposures and wanted files, from the archive's search rows and the consumers.

:func:`plan_from_rows` is pure (rows and settings in, a :class:`NightPlan` out);
:func:`record_plan` writes it to the ledger in one transaction, idempotently (a
second run changes nothing: ``want_file`` keeps a known file's state, and
``upsert_exposure`` only fills in what was unknown); :func:`plan_night` does the
searches and the ``ILUM_LED`` header reads, then both. The work graph (jobs) is
built by the service from the exposures recorded here.

What is wanted, per CCD of the night:

- raw science frames, biases and flats, when processing is needed (some consumer keeps
  ``apcat``, ``detrended`` or ``masters``, or there are no consumers) or a consumer
  keeps ``raw``. The first ``detrend.bias_skip_first`` biases of each CCD (by obsjd) are
  not used, and are recorded only when a consumer keeps them;
- with ``detrend.write_detrended``, the four detrended quadrant images of each raw science
  file (made by its exposure job, so they have no URL);
- per science quadrant: the sciimg header (kind ``sciimg_header``, stored at
  ``..._sciimg.header.fits``) and the mask (``mskimg``, stored compressed at
  ``..._mskimg.fits.fz``) when photometry is needed or a consumer keeps them; the full
  ``sciimg`` only when a consumer keeps it.

``keeps`` (which consumers keep a file; ``kept``: some does) is set from
:func:`streamer.rules.retention.kept_by`, replacing what an earlier plan of the night said. Files already on disk (downloaded or
registered by ``reconcile``) keep their state and are not in ``to_download``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from astropy.io import fits

from streamer.archive.client import ArchiveClient, FailureCount, PermanentError, TransientError
from streamer.archive.search import RAW_COLUMNS, SCI_COLUMNS, SearchError, search_night
from streamer.archive.transfer import OnFailure, read_primary_header
from streamer.config import Config, ConsumerConfig
from streamer.errors import StreamerError
from streamer.ledger import planning as queries
from streamer.ledger.core import Ledger
from streamer.ledger.downloads import record_failed_request
from streamer.rules.bias import bias_time_order, biases_to_use
from streamer.rules.retention import FileFacts, Footprint, kept_by
from streamer.storage.naming import RawName, SciName
from streamer.storage.paths import (
    detrended_relpath,
    header_relpath,
    local_path,
    mask_relpath,
)

log = logging.getLogger(__name__)

PROCESSING_KINDS: Final = frozenset({"apcat", "detrended", "masters"})
RAW_IMGTYPES: Final = ("object", "bias", "flat")
#: Kinds that every plan of a night lists whenever a consumer keeps them: one left out is no longer kept.
UNKEPT_WHEN_UNPLANNED: Final = ("raw", "sciimg", "sciimg_header", "mskimg")


class PlanError(StreamerError):
    """A night that cannot be planned (search failure, unreadable flat header)."""


@dataclass(frozen=True)
class PlannedExposure:
    """One row of ``exposures`` (a raw CCD file's exposure)."""

    filefracday: str
    ccdid: int
    imgtypecode: str
    imgtype: str
    night: str
    field: int
    filtercode: str
    expid: int | None
    obsjd: float | None
    exptime: float | None
    led: int | None = None

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.filefracday, self.ccdid, self.imgtypecode)


@dataclass(frozen=True)
class PlannedFile:
    """One row of ``files``: where it goes, where it comes from, and whether a consumer keeps it."""

    relpath: str
    kind: str
    url: str
    exposure: tuple[str, int, str]
    qid: int | None
    night: str
    field: int
    keepers: tuple[str, ...]
    expected_size: int | None = None

    @property
    def kept(self) -> bool:
        """Whether some consumer keeps it."""
        return bool(self.keepers)


@dataclass(frozen=True)
class NightPlan:
    night: dt.date
    exposures: tuple[PlannedExposure, ...]
    files: tuple[PlannedFile, ...]
    flats_without_led: tuple[str, ...] = ()
    #: the CCDs planned (files of theirs that the plan leaves out lose their keeps rows)
    ccds: tuple[int, ...] = ()


@dataclass(frozen=True)
class PlanSummary:
    """What recording a plan did: totals, and the ids of files to download now."""

    night: str
    exposures: int
    files: int
    to_download: tuple[int, ...]
    on_disk: int
    by_kind: dict[str, int] = field(default_factory=dict)


def needs_processing(consumers: Sequence[ConsumerConfig]) -> bool:
    """Whether raws must be detrended at all (no consumers means the default: catalogues)."""
    return not consumers or any(PROCESSING_KINDS & set(c.keep) for c in consumers)


def needs_photometry(consumers: Sequence[ConsumerConfig]) -> bool:
    """Whether the exposure jobs run, and so need the IPAC headers (their WCS) and masks.

    They make the catalogues and the detrended images; without a header no quadrant has a WCS.
    """
    return not consumers or any({"apcat", "detrended"} & set(c.keep) for c in consumers)


def used_biases(rows: Sequence[dict[str, Any]], skip_first: int) -> set[tuple[str, int]]:
    """(filefracday, ccdid) of the biases the master biases use (:func:`streamer.rules.bias.biases_to_use`, per CCD)."""
    by_ccd: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["imgtype"] == "bias":
            by_ccd[row["ccdid"]].append(row)
    used: set[tuple[str, int]] = set()
    for ccd_rows in by_ccd.values():
        chosen = biases_to_use(ccd_rows, skip_first, order=lambda r: bias_time_order(r["obsjd"], r["filefracday"]))
        used.update((r["filefracday"], r["ccdid"]) for r in chosen)
    return used


def footprint_of(row: dict[str, Any], shape: tuple[int, int] | None = None) -> Footprint:
    """A quadrant footprint from a sci search row (``shape`` = (naxis2, naxis1), default full size)."""
    extra = {} if shape is None else {"naxis2": shape[0], "naxis1": shape[1]}
    return Footprint(
        row["crval1"], row["crval2"], row["crpix1"], row["crpix2"], row["cd11"], row["cd12"], row["cd21"], row["cd22"],
        **extra,
    )  # fmt: skip


def plan_from_rows(
    night: dt.date,
    ccds: Sequence[int],
    raw_rows: Sequence[dict[str, Any]],
    sci_rows: Sequence[dict[str, Any]],
    consumers: Sequence[ConsumerConfig],
    *,
    base_url: str,
    bias_skip_first: int,
    leds: dict[str, int] | None = None,
    quadrant_shape: tuple[int, int] | None = None,
    write_detrended: bool = False,
) -> NightPlan:
    """The exposures and files a night needs (pure). ``leds``: ILUM_LED by flat filefracday.

    With ``write_detrended``, each raw science file's four detrended quadrant images are
    planned too (kind ``detrended``, no URL): the work graph makes its exposure job their producer.
    """
    prefix = night.strftime("%Y%m%d")
    wanted = set(ccds)
    biases = used_biases([r for r in raw_rows if r["ccdid"] in wanted], bias_skip_first)
    raw_rows = [r for r in raw_rows if r["ccdid"] in wanted and r["filefracday"].startswith(prefix)]
    sci_rows = [r for r in sci_rows if r["ccdid"] in wanted and r["filefracday"].startswith(prefix)]
    planner = _NightPlanner(night, ccds, consumers, base_url, quadrant_shape, sci_rows)
    for row in raw_rows:
        if row["imgtype"] in RAW_IMGTYPES:
            planner.add_raw(row, biases, (leds or {}).get(row["filefracday"]), write_detrended=write_detrended)
    for row in sci_rows:
        planner.add_ipac_quadrant(row)
    return planner.plan()


class _NightPlanner:
    """The exposures and files of one night, gathered from its search rows."""

    def __init__(
        self, night: dt.date, ccds: Sequence[int], consumers: Sequence[ConsumerConfig], base_url: str,
        quadrant_shape: tuple[int, int] | None, sci_rows: Sequence[dict[str, Any]],
    ) -> None:  # fmt: skip
        self.night = night
        self.ccds = tuple(sorted(set(ccds)))
        self.night_text = night.isoformat()
        self.consumers = consumers
        self.base_url = base_url
        self.quadrant_shape = quadrant_shape
        self.processing = needs_processing(consumers)
        self.photometry = needs_photometry(consumers)
        self.exposures: dict[tuple[str, int, str], PlannedExposure] = {}
        self.files: dict[str, PlannedFile] = {}
        self.flats_without_led: set[str] = set()
        self.footprints: dict[tuple[str, int], list[Footprint]] = defaultdict(list)
        self.quadrant_footprints: dict[tuple[str, int, int], Footprint] = {}
        for row in sci_rows:
            quadrant = footprint_of(row, quadrant_shape)
            self.footprints[(row["filefracday"], row["ccdid"])].append(quadrant)
            self.quadrant_footprints[(row["filefracday"], row["ccdid"], row["qid"])] = quadrant

    def add_raw(self, row: dict[str, Any], biases: set[tuple[str, int]], led: int | None, *, write_detrended: bool) -> None:
        name = RawName(row["filefracday"], row["field"], row["filtercode"], row["ccdid"], row["imgtypecode"])
        footprints = tuple(self.footprints.get((name.filefracday, name.ccdid), ()))
        keepers = tuple(kept_by(self.consumers, FileFacts("raw", row["field"], self.night, footprints)))
        kept = bool(keepers)
        used = row["imgtype"] != "bias" or (name.filefracday, name.ccdid) in biases
        wanted = kept or (self.processing and used)
        if not wanted and not (self.processing and row["imgtype"] == "bias"):
            return
        led = led if row["imgtype"] == "flat" else None
        if row["imgtype"] == "flat" and led is None:
            self.flats_without_led.add(name.filefracday)
        exposure = PlannedExposure(
            name.filefracday, name.ccdid, name.imgtypecode, row["imgtype"], self.night_text, row["field"],
            row["filtercode"], row.get("expid"), row.get("obsjd"), row.get("exptime"), led,
        )  # fmt: skip
        self.exposures[exposure.key] = exposure
        if not wanted:
            return  # a skipped bias: its exposure is recorded (the graph skips by position), its file is not wanted
        self.files[name.relpath] = PlannedFile(
            name.relpath, "raw", name.url(self.base_url), exposure.key, None, self.night_text, row["field"], keepers
        )
        if write_detrended and row["imgtype"] == "object":
            self.add_detrended(name, exposure.key, row["field"])

    def add_detrended(self, name: RawName, exposure_key: tuple[str, int, str], field_id: int) -> None:
        for qid in (1, 2, 3, 4):
            quadrant = self.quadrant_footprints.get((name.filefracday, name.ccdid, qid))
            facts = FileFacts("detrended", field_id, self.night, (quadrant,) if quadrant is not None else ())
            relpath = detrended_relpath(name, qid)
            self.files[relpath] = PlannedFile(
                relpath, "detrended", "", exposure_key, qid, self.night_text, field_id, tuple(kept_by(self.consumers, facts))
            )

    def add_ipac_quadrant(self, row: dict[str, Any]) -> None:
        """The IPAC header and mask a catalogue needs, and whatever of the quadrant a consumer keeps."""
        sci = SciName(row["filefracday"], row["field"], row["filtercode"], row["ccdid"], row["qid"], "sciimg.fits")
        mask = SciName(row["filefracday"], row["field"], row["filtercode"], row["ccdid"], row["qid"], "mskimg.fits")
        key = (sci.filefracday, sci.ccdid, "o")
        if key not in self.exposures:
            self.exposures[key] = PlannedExposure(
                sci.filefracday, sci.ccdid, "o", "object", self.night_text, row["field"], row["filtercode"],
                row.get("expid"), row.get("obsjd"), row.get("exptime"),
            )  # fmt: skip
        footprint = (footprint_of(row, self.quadrant_shape),)
        candidates = (
            ("sciimg_header", header_relpath(sci.relpath), sci.url(self.base_url), self.photometry),
            ("mskimg", mask_relpath(mask.relpath), mask.url(self.base_url), self.photometry),
            ("sciimg", sci.relpath, sci.url(self.base_url), False),
        )
        for kind, relpath, url, needed in candidates:
            keepers = tuple(kept_by(self.consumers, FileFacts(kind, row["field"], self.night, footprint)))
            if keepers or needed:
                self.files[relpath] = PlannedFile(relpath, kind, url, key, row["qid"], self.night_text, row["field"], keepers)

    def plan(self) -> NightPlan:
        used_keys = {f.exposure for f in self.files.values()}
        return NightPlan(
            self.night,
            tuple(e for k, e in sorted(self.exposures.items()) if k in used_keys or e.imgtype == "bias"),
            tuple(self.files[k] for k in sorted(self.files)),
            tuple(sorted(self.flats_without_led)),
            self.ccds,
        )


def record_plan(ledger: Ledger, plan: NightPlan) -> PlanSummary:
    """Write a plan to the ledger in one transaction (idempotent); return what is left to download."""
    by_kind: dict[str, int] = defaultdict(int)
    with ledger.transaction() as conn:
        exposure_ids = {}
        for exposure in plan.exposures:
            row = {k: getattr(exposure, k) for k in exposure.__dataclass_fields__}
            exposure_ids[exposure.key] = ledger.upsert_exposure(conn, **row)
        file_ids = []
        for planned in plan.files:
            file_ids.append(
                ledger.want_file(
                    conn, relpath=planned.relpath, kind=planned.kind, url=planned.url,
                    exposure_id=exposure_ids[planned.exposure], qid=planned.qid, night=planned.night,
                    field=planned.field, expected_size=planned.expected_size, keepers=planned.keepers,
                )  # fmt: skip
            )
            by_kind[planned.kind] += 1
        # detrended images are left out: a plan lists them only with detrend.write_detrended
        queries.unkeep_unplanned(conn, plan.night.isoformat(), plan.ccds, UNKEPT_WHEN_UNPLANNED, file_ids)
        states = queries.file_states(conn, file_ids)
    downloaded = {i for i, planned in zip(file_ids, plan.files, strict=True) if planned.url}
    to_download = tuple(
        i for i in file_ids if i in downloaded and states[i] in ("wanted", "reserved", "downloading", "corrupt")
    )
    on_disk = sum(1 for i in file_ids if states[i] == "on_disk")
    return PlanSummary(plan.night.isoformat(), len(plan.exposures), len(plan.files), to_download, on_disk, dict(by_kind))


def _failure_recorder(ledger: Ledger, file_id: int) -> OnFailure:
    """The ``on_failure`` callback of a header read: each failed request counts against the file."""

    def record(err: TransientError, _count: FailureCount) -> None:
        record_failed_request(ledger, file_id, err)

    return record


async def fill_flat_leds(
    client: ArchiveClient, ledger: Ledger, night: str, ccds: Sequence[int], *, root: Path
) -> dict[str, int | None]:
    """Set ``exposures.led`` of the night's flats from ``ILUM_LED``, read once per flat exposure.

    The header comes from a CCD file already on disk, else from a header-only read of one CCD
    file of the exposure (failed requests count in that file's ``attempts``; when the archive
    refuses one CCD file the next is tried). A flat whose LED cannot be read keeps ``led`` NULL.
    """
    rows = queries.flats_without_led(ledger, night, ccds)
    candidates: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        candidates[row["filefracday"]].append(row)
    leds: dict[str, int | None] = {}
    for ffd, files in candidates.items():
        leds[ffd] = None
        for row in files:
            try:
                if row["state"] == "on_disk":
                    header = fits.getheader(local_path(root, row["relpath"]))
                else:
                    header = await read_primary_header(
                        client, row["url"], on_failure=_failure_recorder(ledger, row["file_id"])
                    )
            except PermanentError as err:
                record_failed_request(ledger, row["file_id"], err)
                continue
            except TransientError as err:
                log.warning("flat %s: ILUM_LED unreadable: %s", row["relpath"], err.reason)
                continue
            if "ILUM_LED" in header:
                leds[ffd] = int(header["ILUM_LED"])
                break
        if leds[ffd] is None:
            ledger.event("plan", f"flat exposure {ffd}: no ILUM_LED could be read; its LED stays unknown", level="warning")
    with ledger.transaction() as conn:
        for ffd, led in leds.items():
            if led is not None:
                queries.set_flat_led(conn, ffd, led)
    return leds


async def read_quadrant_shape(client: ArchiveClient, sci_row: dict[str, Any]) -> tuple[int, int] | None:
    """(rows, columns) of the night's science quadrants, from one sciimg header (the search has no NAXIS).

    Target footprints need it; None (full size assumed) when the header cannot be read.
    """
    name = SciName(
        sci_row["filefracday"], sci_row["field"], sci_row["filtercode"], sci_row["ccdid"], sci_row["qid"], "sciimg.fits"
    )
    try:
        header = await read_primary_header(client, name.url(client.base_url))
    except (PermanentError, TransientError) as err:
        log.warning("%s: cannot read the quadrant size (%s); assuming full-size quadrants", name.filename, err.reason)
        return None
    if "NAXIS1" not in header or "NAXIS2" not in header:
        return None
    return int(header["NAXIS2"]), int(header["NAXIS1"])


async def plan_night(
    client: ArchiveClient,
    ledger: Ledger,
    config: Config,
    night: dt.date,
    ccds: Sequence[int],
    *,
    quadrant_shape: tuple[int, int] | None = None,
) -> PlanSummary:
    """Search the night, read the flats' LEDs, and record exposures and wanted files in the ledger."""
    try:
        raw_rows = await search_night(client, "raw", night, ccds, RAW_COLUMNS, imgtypes=RAW_IMGTYPES)
        sci_rows = await search_night(client, "sci", night, ccds, SCI_COLUMNS)
    except SearchError as err:
        raise PlanError(f"night {night}: {err}") from None
    if quadrant_shape is None and sci_rows and any(c.targets for c in config.consumers):
        quadrant_shape = await read_quadrant_shape(client, sci_rows[0])  # only target footprints need it
    plan = plan_from_rows(
        night, ccds, raw_rows, sci_rows, config.consumers, base_url=client.base_url,
        bias_skip_first=config.detrend.bias_skip_first, quadrant_shape=quadrant_shape,
        write_detrended=config.detrend.write_detrended,
    )  # fmt: skip
    summary = record_plan(ledger, plan)
    await fill_flat_leds(client, ledger, night.isoformat(), ccds, root=config.storage.root)
    log.info(
        "night %s, CCDs %s: %d exposures, %d files (%d to download, %d on disk)",
        night, ",".join(map(str, ccds)), summary.exposures, summary.files, len(summary.to_download), summary.on_disk,
    )  # fmt: skip
    if not raw_rows:
        ledger.event("plan", f"night {night}: the archive lists no raw files for CCDs {list(ccds)}", level="warning")
    return summary

