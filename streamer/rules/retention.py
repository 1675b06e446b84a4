"""Does some consumer keep this file? Pure functions of a file's facts and the consumers' settings.

A consumer keeps a file when the file's kind is in its ``keep`` list and the file
matches every selection the consumer gives: ``fields``, the ``start``/``end`` dates
(inclusive, against the night), and ``targets`` (a quadrant whose footprint comes
within a target's radius, on a night inside the target's own dates). The planner
uses :func:`kept_by` to write the ledger's ``keeps`` rows (and ``files.kept``); the evictor may reuse it.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from streamer.config import ConsumerConfig, Target

QUADRANT_NAXIS1 = 3072
QUADRANT_NAXIS2 = 3080


@dataclass(frozen=True)
class Footprint:
    """A quadrant's sky footprint from the linear (TAN) WCS of its sci search row."""

    crval1: float
    crval2: float
    crpix1: float
    crpix2: float
    cd11: float
    cd12: float
    cd21: float
    cd22: float
    naxis1: int = QUADRANT_NAXIS1
    naxis2: int = QUADRANT_NAXIS2

    @property
    def pixel_scale_deg(self) -> float:
        return math.sqrt(abs(self.cd11 * self.cd22 - self.cd12 * self.cd21))

    def pixel_of(self, ra: float, dec: float) -> tuple[float, float] | None:
        """1-based pixel coordinates of a sky position (gnomonic), or None on the far hemisphere."""
        a0, d0 = math.radians(self.crval1), math.radians(self.crval2)
        a, d = math.radians(ra), math.radians(dec)
        cos_c = math.sin(d0) * math.sin(d) + math.cos(d0) * math.cos(d) * math.cos(a - a0)
        if cos_c <= 1e-6:
            return None
        xi = math.degrees(math.cos(d) * math.sin(a - a0) / cos_c)
        eta = math.degrees((math.cos(d0) * math.sin(d) - math.sin(d0) * math.cos(d) * math.cos(a - a0)) / cos_c)
        det = self.cd11 * self.cd22 - self.cd12 * self.cd21
        if det == 0:
            return None
        dx = (self.cd22 * xi - self.cd12 * eta) / det
        dy = (-self.cd21 * xi + self.cd11 * eta) / det
        return self.crpix1 + dx, self.crpix2 + dy

    def covers(self, ra: float, dec: float, radius_deg: float) -> bool:
        """Whether the circle (ra, dec, radius) touches the quadrant's pixel area."""
        pixel = self.pixel_of(ra, dec)
        if pixel is None:
            return False
        x, y = pixel
        out_x = max(0.5 - x, 0.0, x - (self.naxis1 + 0.5))
        out_y = max(0.5 - y, 0.0, y - (self.naxis2 + 0.5))
        return math.hypot(out_x, out_y) * self.pixel_scale_deg <= radius_deg


def footprint_from_header(header: Mapping[str, Any]) -> Footprint:
    """A footprint from an image header's linear WCS (CRVALn, CRPIXn, CDi_j; NAXISn when present).

    For the evictor: a stored sciimg header (``fetch.read_stored_header``) gives the footprint
    without the search row. The TPV distortion terms are ignored (well under a pixel's worth
    of arcseconds at the scale of a target radius).
    """
    return Footprint(
        float(header["CRVAL1"]), float(header["CRVAL2"]), float(header["CRPIX1"]), float(header["CRPIX2"]),
        float(header["CD1_1"]), float(header.get("CD1_2", 0.0)), float(header.get("CD2_1", 0.0)),
        float(header["CD2_2"]), int(header.get("NAXIS1", QUADRANT_NAXIS1)), int(header.get("NAXIS2", QUADRANT_NAXIS2)),
    )  # fmt: skip


@dataclass(frozen=True)
class FileFacts:
    """What retention looks at: kind, field, night, and the footprints of the quadrants the file holds."""

    kind: str
    field: int | None
    night: dt.date
    footprints: tuple[Footprint, ...] = ()


def _target_matches(target: Target, facts: FileFacts) -> bool:
    if target.start is not None and facts.night < target.start:
        return False
    if target.end is not None and facts.night > target.end:
        return False
    return any(fp.covers(target.ra, target.dec, target.radius_deg) for fp in facts.footprints)


def consumer_keeps(consumer: ConsumerConfig, facts: FileFacts) -> bool:
    """Whether ``consumer`` keeps the file described by ``facts``."""
    if facts.kind not in consumer.keep:
        return False
    if consumer.fields is not None and facts.field not in consumer.fields:
        return False
    if consumer.start is not None and facts.night < consumer.start:
        return False
    if consumer.end is not None and facts.night > consumer.end:
        return False
    if consumer.targets is not None:
        return any(_target_matches(t, facts) for t in consumer.targets)
    return True


def kept_by(consumers: Iterable[ConsumerConfig], facts: FileFacts) -> list[str]:
    """Names of the consumers that keep the file."""
    return [c.name for c in consumers if consumer_keeps(c, facts)]


def is_kept(consumers: Iterable[ConsumerConfig], facts: FileFacts) -> bool:
    return any(consumer_keeps(c, facts) for c in consumers)
