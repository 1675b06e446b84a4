"""Which masters calibrate a science frame: its own night's, else the nearest night within the gap.

Pure: given the frame's night, CCD and filter and the masters available (as small records), pick
one master bias (per night and CCD) and one master flat (per night, CCD and filter),
independently: a night may have biases and no flats for a filter. Nights are calendar dates, so
month and year boundaries need nothing special. At equal distance either side, the earlier night
wins (its calibration sequence was taken before the frame; the choice only has to be
deterministic). No master within ``max_gap_days`` raises :class:`CalibrationUnavailable` whose
message says what was missing and what the nearest candidate was.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from streamer.errors import StreamerError


class CalibrationUnavailable(StreamerError):
    """No master within the allowed gap: the science frame is blocked with this reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class AvailableMaster:
    """A master on disk: kind "bias" (filtercode None) or "flat"."""

    kind: str
    night: dt.date
    ccdid: int
    filtercode: str | None
    path: str


@dataclass(frozen=True)
class ChosenMaster:
    """A chosen master and how far its night is from the frame's (days, signed: negative = earlier)."""

    master: AvailableMaster
    offset_days: int


@dataclass(frozen=True)
class CalibrationChoice:
    bias: ChosenMaster
    flat: ChosenMaster


def nearest_night(night: dt.date, candidates: Iterable[dt.date], max_gap_days: int) -> dt.date | None:
    """The candidate night closest to ``night`` within ``max_gap_days`` (ties: the earlier), or None."""
    best: dt.date | None = None
    for candidate in candidates:
        distance = abs((candidate - night).days)
        if distance > max_gap_days:
            continue
        if best is None or (distance, candidate) < (abs((best - night).days), best):
            best = candidate
    return best


def _choose(
    kind: str,
    night: dt.date,
    ccdid: int,
    filtercode: str | None,
    available: list[AvailableMaster],
    max_gap_days: int,
) -> ChosenMaster:
    matching = [
        m for m in available if m.kind == kind and m.ccdid == ccdid and (kind == "bias" or m.filtercode == filtercode)
    ]
    what = f"master {kind} for CCD {ccdid}" + (f" filter {filtercode}" if kind == "flat" else "")
    chosen_night = nearest_night(night, (m.night for m in matching), max_gap_days)
    if chosen_night is None:
        if matching:
            closest = min(matching, key=lambda m: (abs((m.night - night).days), m.night))
            gap = abs((closest.night - night).days)
            raise CalibrationUnavailable(
                f"no {what} within {max_gap_days} days of {night.isoformat()}: "
                f"the nearest is {closest.night.isoformat()}, {gap} days away"
            )
        raise CalibrationUnavailable(f"no {what} on any night (needed for {night.isoformat()})")
    master = min((m for m in matching if m.night == chosen_night), key=lambda m: m.path)
    return ChosenMaster(master=master, offset_days=(chosen_night - night).days)


def select_calibration(
    night: dt.date,
    ccdid: int,
    filtercode: str,
    available: Iterable[AvailableMaster],
    *,
    max_gap_days: int,
) -> CalibrationChoice:
    """The master bias and master flat for a science frame; CalibrationUnavailable if either is missing."""
    if max_gap_days < 0:
        raise ValueError(f"max_gap_days = {max_gap_days}: expected >= 0")
    masters = list(available)
    reasons = []
    chosen: dict[str, ChosenMaster] = {}
    for kind in ("bias", "flat"):
        try:
            chosen[kind] = _choose(kind, night, ccdid, filtercode, masters, max_gap_days)
        except CalibrationUnavailable as err:
            reasons.append(err.reason)
    if reasons:
        raise CalibrationUnavailable("; ".join(reasons))
    return CalibrationChoice(bias=chosen["bias"], flat=chosen["flat"])


@dataclass(frozen=True)
class MasterOption:
    """A master (made, or still to be made by a job that has not failed) that an exposure could use."""

    file_id: int
    night: dt.date


@dataclass(frozen=True)
class Fallback:
    """Use the master ``file_id`` of ``night`` instead of ``replaces`` (None: add it)."""

    file_id: int
    night: dt.date
    replaces: int | None
    description: str


def describe_master(producer_kind: str, filtercode: str | None) -> str:
    """How a master kind reads in messages: "master bias", "master flat for zr"."""
    return "master bias" if producer_kind == "master_bias" else f"master flat for {filtercode}"


def choose_fallback(
    night: dt.date,
    producer_kind: str,
    filtercode: str | None,
    options: Iterable[MasterOption],
    *,
    max_gap_days: int,
    replaces: int | None,
) -> Fallback | CalibrationUnavailable:
    """The nearest night's master within the gap (ties: the earlier night), or why there is none."""
    candidates = list(options)
    what = describe_master(producer_kind, filtercode)
    chosen_night = nearest_night(night, (o.night for o in candidates), max_gap_days)
    if chosen_night is None:
        return CalibrationUnavailable(f"no {what} within {max_gap_days} days of {night.isoformat()}")
    chosen = next(o for o in candidates if o.night == chosen_night)
    return Fallback(file_id=chosen.file_id, night=chosen_night, replaces=replaces, description=what)
