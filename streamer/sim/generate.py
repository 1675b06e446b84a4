"""Write a simulated ZTF night in IRSA's layout, with the truth a correct pipeline must recover.

Layout of the output directory ``OUT`` (as below IRSA's ``/ibe/data/ztf/products/``):

- ``OUT/raw/YYYY/MMDD/FFFFFF/ztf_<ffd>_<field>_<filt>_cNN_<b|f|o>.fits.fz``: one file per CCD and exposure.
- ``OUT/sci/YYYY/MMDD/FFFFFF/ztf_<ffd>_<field>_<filt>_cNN_o_qQ_{sciimg,mskimg}.fits``: per science quadrant.
- ``OUT/refcat/gaiadr3_pix64_<ipix>.parquet``: the reference catalogue (see ``streamer.sim.sky``).
- ``OUT/truth/params.json``, ``OUT/truth/stars.parquet``, ``OUT/truth/flat_<filt>_cNN.fits``,
  ``OUT/truth/bias_cNN.fits``.

Several nights may be written into one ``OUT`` (call once per night); they must share ``shape`` and
``instrument_seed``: the instrument (flats, bias levels and structure, gains, bad columns) and the sky
(catalogue) come from ``instrument_seed`` alone, so masters of one night apply to another. Everything
that changes from night to night (plan, seeing, noise, drift) comes from ``seed`` and the night.

Raw files
    Rice tile-compressed FITS: HDU 0 header only; HDUs 1-4 quadrants 1-4 (rows x cols: 3080 x 3072 for
    ``full``, 260 x 256 for ``small``), HDUs 5-8 their overscans (rows x 30), overscan of quadrant q in
    HDU q + 4. Data uint16 (lossless), stored on the IPAC grid: the grid of the sciimg WCS and the mskimg.
    Readout order per quadrant is ``streamer.detrend.readout.to_readout`` (the only orientation convention).

Physical order of effects, per pixel of a quadrant (ADU unless stated):
    1. true linear signal ``S``: science ``(sky + stars) * T``; LED flat ``level_led * F_led * I_led``; bias 0.
       ``stars``: pixel-integrated circular Gaussians of FWHM ``seeing_fwhm_arcsec / 1.012`` px.
    2. photon noise in electrons (``S * GAIN``), back to ADU (Gaussian approximation above 20 e-).
    2b. pocket effect, only with ``generate_night(pocket="v0.1")`` (off by default): each row of charge,
       in readout order with its 30 (empty) overscan columns, goes through the serial register's pocket
       (``streamer.detrend.pocket.forward`` with the model's parameters of the CCD, amplifier and night;
       none outside the model's periods): bright pixels lose charge, the pixels read after them and the
       overscan columns get it back (the overscan part then goes through step 3 and adds to step 4-6).
       The hot columns' excess (step 8) is then dark charge added before the pocket, in biases too.
    3. nonlinearity: ``uncorrect(S_noisy, A, B)`` (``streamer.detrend.nonlinearity``; evaluated in float32,
       see ``pixels.apply_nonlinearity``) with the night's epoch table for (CCD, qid), so overscan
       subtraction followed by ``correct()`` inverts it exactly.
    4. bias: per-amplifier ``bias_level`` + a smooth row drift (zero mean over rows, a function of the
       readout row, shared by data and overscan; see ``pixels.Drift``) + a fixed per-pixel bias structure
       (data pixels only, the same in every frame: a column pattern plus a transient at the start of each
       row read, see ``Instrument.bias_structure``; truth in ``truth/bias_cNN.fits``).
    5. read noise, Gaussian, ``READNOI / GAIN`` ADU, in data and overscan.
    6. trailing charge: overscan column j (readout order, j = 0 read first) of a row gains
       ``0.01 * exp(-j / 2) * m`` where m is the value of step 3 of that row's last data pixel read.
    7. saturation: data clipped at 60000 ADU (raw, bias included); those pixels carry mskimg bit 8.
    8. dead columns: the signal is removed (value = steps 4-5 only); hot columns: a fixed excess
       ``hot_excess`` ADU is added in every frame (biases too, so a master bias holds it).
    9. rounding to integers, clipped to 0..65535.

Truth, in the units of the pipeline's output
    - ``truth/bias_cNN.fits``: HDU q (1-4) = what a master bias recovers after overscan subtraction and
      ``correct()``: the fixed bias structure plus the hot-column excess (float32, ADU, IPAC grid).
    - ``truth/flat_<filt>_cNN.fits``: HDU q = the flat ``T`` that the IN2P3 algorithm recovers and that
      science pixels were multiplied by. With ``F`` the pixel response of the filter (a smooth
      large-scale pattern times a 0.8 % pixel-to-pixel term), ``F_led = F * (1 + 0.3 % pixel term of
      the LED)`` (the response differs with the LED's wavelength) and ``I_led`` a smooth illumination
      per LED and CCD (a few % across the CCD):
      ``T = mean over the filter's LEDs of F_led * I_led / median_CCD(F_led * I_led)`` (equal weights;
      median over all 4 quadrants of the CCD). Each normalised LED stack has median exactly 1, but averaging
      LEDs with different illuminations does not keep the median: the CCD-wide median of ``T`` is 1
      within a few 1e-3, its exact value is in ``params.json`` (``flats.<filt>.<ccd>.median``); ``T`` is
      not renormalised, so that it stays exactly what the algorithm recovers (and science pixels were
      multiplied by it). ``F``, ``F_led`` and ``I_led`` are the same every night (``instrument_seed``); dead and hot
      columns are not in ``T``: compare outside them.
    - ``truth/stars.parquet``: one row per star per science quadrant whose centre lies on the quadrant
      (``-0.5 <= x < cols - 0.5``, same for y): ``filefracday`` (str), ``ccdid``, ``qid``, ``source_id``,
      ``x``, ``y`` (0-based, IPAC grid = raw HDU grid, pixel centres at integers), ``flux`` (true total
      flux in ADU after perfect detrending, i.e. before the flat and nonlinearity:
      ``10 ** (-0.4 * (mag - MAGZP))`` with MAGZP of the sciimg header and mag from ``sky.FILTER_MAG_COLUMN``).
    - ``truth/params.json``: ``shape``, ``instrument_seed``, ``saturation_raw_adu``, ``trail``,
      ``led_levels_adu`` (by LED), ``amplifiers`` (by ccd then qid: gain, read_noise_e, read_noise_adu,
      bias_level_adu, dead_columns, hot_columns, hot_excess_adu), ``flats`` (by filter then ccd: LED
      medians, median of T) and ``nights`` (by YYYY-MM-DD: seed, nonlinearity epoch and (A, B) by ccd then
      qid, and ``exposures``: filefracday, imgtype, filtercode, field, obsjd, expid, exptime, led,
      seeing_fwhm_arcsec, sky_adu, magzp, airmass, tangent point, and ``drift`` by ccd then qid), and
      with the pocket injected ``pocket``: ``model`` and ``parameters`` by ccd then qid (alpha, cmax,
      beta, nmax in ADU; null where the model has none for that night).

Science products and geometry
    ``sciimg.fits``: float32, the noise-free expectation ``sky + stars`` in ADU (what perfect detrending
    gives, before the flat), with the header keywords of IPAC's (GAIN, READNOI, SATURATE, MAGZP, EXPID,
    RCID, QID, CCDID, FIELDID, FILTER, OBSJD, OBSMJD, EXPTIME, SEEING = FWHM in pixels, MAGLIM, ...)
    and a TAN WCS (``streamer.sim.geometry``: 1.012"/px, all quadrants share CRVAL = the exposure's
    tangent point and the CD matrix, q4|q3 over q1|q2 on the IPAC grid (``ztf_camera_layout.toml``), no gap inside a
    CCD, so a sibling quadrant's WCS is CRPIX shifted by the quadrant size). ``mskimg.fits``: int16 with IPAC's BITnn definitions;
    set bits: 1 (star model above 5 sigma of the sky noise), 4 (hot columns), 8 (saturated), 9 (dead).
    Stars come from the catalogue of each (field, CCD), carried to the exposure epoch by their proper
    motions; their brightness through zg, zr, zi is BP, G, RP (``sky.FILTER_MAG_COLUMN``).

Exposures
    Every obsjd lies in [JD(night), JD(night) + 1): ``obsjd = JD(night) + (k + 0.5) / 1e6`` where the
    last 6 digits of ``filefracday`` are k. Biases (field 0, filter code ``bi``) from day fraction 0.06,
    LED flats (field 0; zg LEDs 2-5, zr 7-10, zi 11-13, ``ILUM_LED`` in the primary header) from 0.08,
    science (30 s) from 0.15; biases have EXPTIME 0, flats 5 s. Science exposure i observes ``fields[i % len(fields)]`` through
    ``filters[(i // len(fields)) % len(filters)]``. All CCDs of an exposure share its times and LED.

Random streams: one ``numpy`` Generator per effect and key (``stream``), from ``SeedSequence``.

Python API: :func:`generate_night`; the command ``streamer sim generate`` calls :func:`main`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits

from streamer.detrend import pocket as pocket_model
from streamer.detrend.nonlinearity import coefficients, correct, epoch_for
from streamer.errors import UsageError
from streamer.formats import rice_tiles
from streamer.sim import sky
from streamer.sim.geometry import (
    PIXEL_SCALE_ARCSEC,
    Shape,
    ccd_unit_coordinates,
    quadrant_origin,
    quadrant_wcs_keywords,
    shape_named,
    wcs_from_keywords,
)
from streamer.sim.pixels import SATURATION_RAW_ADU, TRAIL_FRACTION, TRAIL_SCALE_COLUMNS, Amplifier, Drift, raw_quadrant
from streamer.storage.naming import RawName, rcid_of

LEDS: Final = {"zg": (2, 3, 4, 5), "zr": (7, 8, 9, 10), "zi": (11, 12, 13)}
FILTER_IDS: Final = {"zg": 1, "zr": 2, "zi": 3, "bi": 0}
FILTER_NAMES: Final = {"zg": "ZTF_g", "zr": "ZTF_r", "zi": "ZTF_i", "bi": "NONE"}  # the wheel during biases: not known
AMP_NAMES: Final = {1: "H", 2: "G", 3: "F", 4: "E"}  # by qid = AMP_ID + 1, as in IPAC's tables
LED_WAVELENGTHS_NM: Final = {2: 400, 3: 430, 4: 470, 5: 500, 7: 590, 8: 630, 9: 660, 10: 700, 11: 780, 12: 810, 13: 850}
SKY_ADU: Final = {"zg": (150.0, 260.0), "zr": (200.0, 360.0), "zi": (300.0, 500.0)}
MAGZP: Final = {"zg": 26.3, "zr": 26.2, "zi": 25.8}
SCIENCE_EXPTIME: Final = 30.0
FLAT_EXPTIME: Final = 5.0
DEFAULT_FIELDS: Final = (655, 656)
DEFAULT_FILTERS: Final = ("zg", "zr", "zi")
STARS_PER_QUADRANT: Final = {"full": 4500, "small": 120}
STARFLAT_RESPONSE_RMS: Final = 0.01
CCD_LEVEL_RMS: Final = 0.02  # with response levels: a CCD's sensitivity, 1 +- 2 % (clipped at 5 %)
AMPLIFIER_LEVEL_RMS: Final = 0.01  # and each amplifier's within it, 1 +- 1 % (clipped at 3 %)
FOCAL_PLANE_VIGNETTING: Final = 0.03  # illumination 1 - 0.03 (r / r_corner)^2 over the focal plane
STARFLAT_DITHERS: Final = ((0.0, 0.0), (0.5, 0.0), (-0.5, 0.0), (0.0, 0.5), (0.0, -0.5), (0.5, 0.5), (-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5))
"""Offsets of a starflat sequence's pointings, in quadrant widths (RA, Dec), repeated in this order."""
NID_ORIGIN: Final = dt.date(2016, 12, 27)
FLAT_PIXEL_RMS: Final = 0.008
LED_PIXEL_RMS: Final = 0.003
BIAS_STRUCTURE_RMS: Final = 0.5
SOURCE_MASK_SIGMA: Final = 5.0

MASK_BITS: Final = {
    0: "AIRCRAFT/SATELLITE TRACK", 1: "CONTAINS SEXTRACTOR DETECTION", 2: "LOW RESPONSIVITY",
    3: "HIGH RESPONSIVITY", 4: "NOISY", 5: "GHOST FROM BRIGHT SOURCE", 6: "POSSIBLE GHOST FROM CHARGE SPILLAGE",
    7: "PIXEL SPIKE (POSSIBLE RAD HIT)", 8: "SATURATED", 9: "DEAD (UNRESPONSIVE)", 10: "NAN (not a number)",
    11: "CONTAINS PSF-EXTRACTED SOURCE POSITION", 12: "HALO FROM BRIGHT SOURCE", 13: "RESERVED FOR FUTURE USE",
    14: "RESERVED FOR FUTURE USE", 15: "RESERVED FOR FUTURE USE",
}
MASK_SOURCE, MASK_NOISY, MASK_SATURATED, MASK_DEAD = 1 << 1, 1 << 4, 1 << 8, 1 << 9

EFFECTS: Final = (
    "plan", "catalogue", "amplifier", "columns", "bias_structure", "flat_shape", "flat_pixels",
    "illumination", "led_level", "drift", "poisson", "read_noise", "led_pixels", "starflat_response",
    "ccd_level", "amplifier_level",
)


def stream(seed: int, effect: str, *keys: int) -> np.random.Generator:
    """The random stream of one effect for one key (CCD, quadrant, exposure...)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(EFFECTS.index(effect), *keys)))


def julian_date(night: dt.date) -> float:
    """JD at 0h UT of a date."""
    return night.toordinal() + 1721424.5


# --------------------------------------------------------------------------- the instrument (static)


@dataclass(frozen=True)
class Instrument:
    """What does not change from night to night: a function of ``instrument_seed`` and the shape."""

    shape: Shape
    seed: int
    stars_per_quadrant: int
    response_levels: bool = False  # per-CCD and per-amplifier levels and the focal-plane illumination

    def ccd_level(self, ccdid: int) -> float:
        """A CCD's sensitivity (1 without response levels)."""
        if not self.response_levels:
            return 1.0
        rng = stream(self.seed, "ccd_level", ccdid)
        return round(float(1.0 + np.clip(rng.normal(0.0, CCD_LEVEL_RMS), -0.05, 0.05)), 5)

    def amplifier_level(self, ccdid: int, qid: int) -> float:
        """An amplifier's sensitivity relative to its CCD's (1 without response levels)."""
        if not self.response_levels:
            return 1.0
        rng = stream(self.seed, "amplifier_level", ccdid, qid)
        return round(float(1.0 + np.clip(rng.normal(0.0, AMPLIFIER_LEVEL_RMS), -0.03, 0.03)), 5)

    def focal_plane_response(self, ccdid: int, qid: int) -> npt.NDArray[np.float32] | None:
        """``R``: CCD level x amplifier level x the focal-plane illumination at each pixel of a
        quadrant, seen alike by the sky and the LEDs; None without response levels (R = 1).

        The illumination is ``1 - FOCAL_PLANE_VIGNETTING (r / r_corner)^2``, r the distance from the
        centre of the focal plane (sim.geometry's layout, gaps included), r_corner that of its corner.
        """
        if not self.response_levels:
            return None
        ox, oy = quadrant_origin(self.shape, ccdid, qid)
        gap = self.shape.ccd_gap
        half_x, half_y = 2.0 * (2 * self.shape.cols + gap), 2.0 * (2 * self.shape.rows + gap)  # 4 x 4 CCDs
        x = (np.arange(self.shape.cols, dtype=np.float64) + ox) / half_x
        y = (np.arange(self.shape.rows, dtype=np.float64) + oy) / half_y
        r2 = (x * x)[np.newaxis, :] + (y * y)[:, np.newaxis]
        level = self.ccd_level(ccdid) * self.amplifier_level(ccdid, qid)
        return (level * (1.0 - FOCAL_PLANE_VIGNETTING * r2 / 2.0)).astype(np.float32)

    def starflat_response(self, ccdid: int, qid: int) -> float:
        """A quadrant's response that the LED flats do not see (a starflat residual): 1 +- ~1 %."""
        rng = stream(self.seed, "starflat_response", ccdid, qid)
        return round(float(1.0 + np.clip(rng.normal(0.0, STARFLAT_RESPONSE_RMS), -0.03, 0.03)), 5)

    def amplifier(self, ccdid: int, qid: int) -> Amplifier:
        rng = stream(self.seed, "amplifier", ccdid, qid)
        gain, read_noise, level = rng.uniform(5.8, 6.2), rng.uniform(8.5, 10.5), rng.uniform(800.0, 1200.0)
        cols = stream(self.seed, "columns", ccdid, qid)
        n_bad = 2 if self.shape.name == "full" else 1
        chosen = cols.choice(np.arange(10, self.shape.cols - 10), size=2 * n_bad, replace=False)
        return Amplifier(
            ccdid=ccdid,
            qid=qid,
            gain=round(float(gain), 4),
            read_noise_e=round(float(read_noise), 3),
            bias_level=round(float(level), 2),
            dead_columns=tuple(sorted(int(c) for c in chosen[:n_bad])),
            hot_columns=tuple(sorted(int(c) for c in chosen[n_bad:])),
            hot_excess=tuple(round(float(e), 1) for e in cols.uniform(200.0, 2000.0, n_bad)),
        )

    def bias_structure(self, ccdid: int, qid: int) -> npt.NDArray[np.float32]:
        """Fixed bias structure (ADU, IPAC grid), without the hot columns: a column pattern of
        ``BIAS_STRUCTURE_RMS`` rms plus a start-of-row transient ``3 exp(-c / 20)`` (c = readout column)."""
        rng = stream(self.seed, "bias_structure", ccdid, qid)
        columns = rng.standard_normal(self.shape.cols) * BIAS_STRUCTURE_RMS
        readout_column = np.arange(self.shape.cols)  # of each stored column
        if qid in (2, 3):
            readout_column = readout_column[::-1]
        columns += 3.0 * np.exp(-readout_column / 20.0)
        return np.broadcast_to(columns.astype(np.float32)[np.newaxis, :], (self.shape.rows, self.shape.cols))

    def bias_truth(self, ccdid: int, qid: int) -> npt.NDArray[np.float32]:
        """What a master bias recovers: the structure plus the hot-column excess."""
        truth = self.bias_structure(ccdid, qid).copy()
        amp = self.amplifier(ccdid, qid)
        for column, excess in zip(amp.hot_columns, amp.hot_excess, strict=True):
            truth[:, column] += np.float32(excess)
        return truth

    def pixel_response(self, ccdid: int, filtercode: str, qid: int) -> npt.NDArray[np.float32]:
        """``F``: large-scale pattern times pixel-to-pixel response of a quadrant for a filter."""
        fid = FILTER_IDS[filtercode]
        c = stream(self.seed, "flat_shape", ccdid, fid).normal(0.0, 0.01, 3)
        u, v = ccd_unit_coordinates(self.shape, qid)
        large = (1.0 - 0.04 * (u * u + v * v) + c[0] * u + c[1] * v + c[2] * u * v).astype(np.float32)
        pixels = stream(self.seed, "flat_pixels", ccdid, fid, qid).standard_normal(large.shape, dtype=np.float32)
        pixels *= np.float32(FLAT_PIXEL_RMS)
        pixels += np.float32(1.0)
        pixels *= large
        return pixels

    def illumination(self, ccdid: int, led: int, qid: int) -> npt.NDArray[np.float32]:
        """``I_led``: the smooth illumination of an LED across a CCD (about 1, a few percent of slope)."""
        c = stream(self.seed, "illumination", ccdid, led).normal(0.0, 0.02, 3)
        u, v = ccd_unit_coordinates(self.shape, qid)
        # 1 + c0 u + c1 v + c2 (u^2 + v^2), as one broadcast sum of a row and a column
        return ((c[0] * u + c[2] * u * u).astype(np.float32) + (1.0 + c[1] * v + c[2] * v * v).astype(np.float32))

    def led_level(self, led: int) -> float:
        """Linear ADU of an LED flat at the pixel response 1."""
        return round(float(stream(self.seed, "led_level", led).uniform(8000.0, 20000.0)), 1)

    def led_flat(self, ccdid: int, filtercode: str, led: int, qid: int) -> npt.NDArray[np.float32]:
        """``F_led * I_led``: the noise-free LED flat of a quadrant at level 1, where the pixel response
        under this LED's light is ``F_led = F * (1 + LED_PIXEL_RMS * N(0, 1))`` (its own pixel term)."""
        response = stream(self.seed, "led_pixels", ccdid, led, qid).standard_normal(
            (self.shape.rows, self.shape.cols), dtype=np.float32
        )
        response *= np.float32(LED_PIXEL_RMS)
        response += np.float32(1.0)
        response *= pixel_responses(self, ccdid, filtercode)[qid - 1]
        response *= self.illumination(ccdid, led, qid)
        focal_plane = self.focal_plane_response(ccdid, qid)
        if focal_plane is not None:
            response *= focal_plane
        return response

    def catalogue(self, field: int, ccdid: int) -> sky.Catalogue:
        return sky.make_catalogue(
            stream(self.seed, "catalogue", field, ccdid), self.shape, field, ccdid, 4 * self.stars_per_quadrant
        )


@lru_cache(maxsize=1)
def pixel_responses(instrument: Instrument, ccdid: int, filtercode: str) -> tuple[npt.NDArray[np.float32], ...]:
    """``F`` of the four quadrants of a CCD (cached: one CCD and filter at a time; read-only)."""
    responses = tuple(instrument.pixel_response(ccdid, filtercode, q) for q in (1, 2, 3, 4))
    for response in responses:
        response.flags.writeable = False
    return responses


def truth_flats(
    instrument: Instrument, ccdid: int, filtercode: str, medians: dict[int, float] | None = None
) -> tuple[dict[int, float], tuple[npt.NDArray[np.float32], ...]]:
    """``T`` of the four quadrants, ``mean_led(F_led * I_led / median_CCD(F_led * I_led))``, and the
    CCD-wide medians it divides by (``medians`` when given, else measured), each LED flat made once."""
    leds = LEDS[filtercode]
    flats = tuple(np.zeros((instrument.shape.rows, instrument.shape.cols), dtype=np.float32) for _ in (1, 2, 3, 4))
    used: dict[int, float] = {}
    for led in leds:
        products = [instrument.led_flat(ccdid, filtercode, led, q) for q in (1, 2, 3, 4)]
        used[led] = medians[led] if medians is not None else float(np.median(np.concatenate([p.ravel() for p in products])))
        for flat, product in zip(flats, products, strict=True):
            product /= np.float32(used[led] * len(leds))
            flat += product
    return used, flats


# --------------------------------------------------------------------------- the night plan


@dataclass(frozen=True)
class Exposure:
    """One exposure of the night, shared by all its CCD files."""

    index: int
    imgtype: str  # 'bias', 'flat' or 'object'
    filtercode: str  # 'bi' for biases
    field: int
    filefracday: str
    obsjd: float
    expid: int
    exptime: float
    led: int | None = None
    seeing_fwhm_arcsec: float | None = None
    sky_adu: float | None = None
    magzp: float | None = None
    airmass: float = 1.0
    ra0: float = 0.0
    dec0: float = 0.0

    @property
    def imgtypecode(self) -> str:
        return {"bias": "b", "flat": "f", "object": "o"}[self.imgtype]

    def raw_name(self, ccdid: int) -> RawName:
        return RawName(self.filefracday, self.field, self.filtercode, ccdid, self.imgtypecode)


def plan_night(
    night: dt.date,
    seed: int,
    *,
    n_exposures: int,
    flats_per_led: int,
    n_biases: int,
    fields: Sequence[int] = DEFAULT_FIELDS,
    filters: Sequence[str] = DEFAULT_FILTERS,
    flat_filters: Sequence[str] = DEFAULT_FILTERS,
    starflat: bool = False,
    quadrant_deg: float = 0.0,
) -> list[Exposure]:
    """The exposures of a night, in time order; with ``starflat``, science pointings offset by
    ``STARFLAT_DITHERS`` x ``quadrant_deg`` around the field centre instead of a 20" jitter."""
    jd0 = julian_date(night)
    nid = (night - NID_ORIGIN).days
    rng = stream(seed, "plan", night.toordinal())
    exposures: list[Exposure] = []

    def at(fraction: float) -> tuple[str, float, int]:
        k = int(round(fraction * 1e6))
        return f"{night:%Y%m%d}{k:06d}", jd0 + (k + 0.5) / 1e6, nid * 100000 + k // 10

    for i in range(n_biases):
        ffd, obsjd, expid = at(0.06 + i * 0.0003)
        exposures.append(Exposure(len(exposures), "bias", "bi", 0, ffd, obsjd, expid, 0.0))
    fraction = 0.08
    for filtercode in DEFAULT_FILTERS:
        if filtercode not in flat_filters:
            continue
        for led in LEDS[filtercode]:
            for _ in range(flats_per_led):
                ffd, obsjd, expid = at(fraction)
                exposures.append(Exposure(len(exposures), "flat", filtercode, 0, ffd, obsjd, expid, FLAT_EXPTIME, led=led))
                fraction += 0.0005
    step = min(0.00052, 0.40 / max(n_exposures, 1))
    for i in range(n_exposures):
        field_id = fields[i % len(fields)]
        filtercode = filters[(i // len(fields)) % len(filters)]
        ffd, obsjd, expid = at(0.15 + i * step)
        ra_c, dec_c = sky.field_center(field_id)
        jitter = rng.normal(0.0, 20.0 / 3600.0, 2)
        if starflat:
            jitter = np.asarray(STARFLAT_DITHERS[i % len(STARFLAT_DITHERS)]) * quadrant_deg
        low, high = SKY_ADU[filtercode]
        exposures.append(
            Exposure(
                len(exposures), "object", filtercode, field_id, ffd, obsjd, expid, SCIENCE_EXPTIME,
                seeing_fwhm_arcsec=round(float(rng.uniform(1.6, 2.8)), 3),
                sky_adu=round(float(rng.uniform(low, high)), 2),
                magzp=round(MAGZP[filtercode] - float(rng.uniform(0.0, 0.1)), 4),
                airmass=round(float(rng.uniform(1.0, 1.8)), 3),
                ra0=float((ra_c + jitter[0] / math.cos(math.radians(dec_c))) % 360.0),
                dec0=float(dec_c + jitter[1]),
            )
        )
    return exposures


def drift_for(seed: int, night: dt.date, exposure: Exposure, ccdid: int, qid: int) -> Drift:
    rng = stream(seed, "drift", night.toordinal(), exposure.index, ccdid, qid)
    return Drift(
        amplitude=round(float(rng.uniform(1.0, 6.0)), 3),
        cycles=round(float(rng.uniform(0.3, 1.5)), 3),
        phase=round(float(rng.uniform(0.0, 2 * np.pi)), 3),
        slope=round(float(rng.uniform(-4.0, 4.0)), 3),
    )


# --------------------------------------------------------------------------- writing files


@dataclass(frozen=True)
class NightSpec:
    """Everything a worker needs to write one CCD file of the night (picklable)."""

    out: Path
    night: dt.date
    seed: int
    instrument: Instrument
    flat_medians: dict[tuple[int, str], dict[int, float]]
    pocket: str = "off"  # "off" or a pocket model of streamer.detrend.pocket.MODELS
    starflat: bool = False  # science multiplied by Instrument.starflat_response
    #: (ccdid, filtercode): the CCD's level against the focal plane as the sky sees it (absent: 1)
    sky_levels: dict[tuple[int, str], float] = field(default_factory=dict)
    ccds: tuple[int, ...] = ()  # the night's CCDs (a starflat's frames show the stars of all of them)


@dataclass(frozen=True)
class FileResult:
    relpaths: tuple[str, ...]
    stars: dict[str, npt.NDArray[Any]] | None
    seconds: float  # wall clock
    cpu_seconds: float


def _atomic_write(hdus: fits.HDUList | bytes, path: Path) -> None:
    """Write an HDU list, or a file's bytes, to ``path`` through a temporary file beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(hdus, bytes):
        tmp.write_bytes(hdus)
    else:
        hdus.writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def _primary_bytes(header: fits.Header) -> bytes:
    """A data-less primary HDU that announces extensions, as astropy writes it at the head of a file."""
    hdu = fits.PrimaryHDU(header=header)
    hdu.header.set("EXTEND", True, after="NAXIS")
    return hdu.header.tostring().encode("ascii")


def _sexagesimal(value: float, hours: bool) -> str:
    sign = "-" if value < 0 else "+"
    total = abs(value) / 15.0 if hours else abs(value)
    d = int(total)
    m = int((total - d) * 60)
    s = ((total - d) * 60 - m) * 60
    return f"{sign}{d:02d}:{m:02d}:{s:05.2f}"


def primary_header(exposure: Exposure, ccdid: int) -> fits.Header:
    """Primary header of a raw CCD file, with the keywords of IPAC's raw headers."""
    name = exposure.raw_name(ccdid)
    shutter = dt.datetime(2000, 1, 1) + dt.timedelta(days=exposure.obsjd - 2451544.5)
    header = fits.Header()
    header["ORIGIN"] = ("Zwicky Transient Facility", "Data origin")
    header["OBSERVER"] = ("ZTF Robotic Observing Software", "Observer")
    header["INSTRUME"] = ("ZTF/MOSAIC", "Instrument name")
    header["IMGTYPE"] = (exposure.imgtype, "Image type")
    header["EXPOSURE"] = (exposure.exptime, "Total Exposure Time (s)")
    header["EXPTIME"] = (exposure.exptime, "Requested Exposure Time (s)")
    header["CCDSUM"] = ("1 1", "CCD binning")
    header["PIXSCALE"] = (PIXEL_SCALE_ARCSEC, "Pixel scale, in arcsec per pixel")
    header["FILENAME"] = (name.filename.removesuffix(".fz"), "File name")
    header["ORIGNAME"] = (name.filename.removesuffix(".fz"), "Original file name")
    header["FIELDID"] = (exposure.field, "ZTF field ID number")
    header["OBJRAD"] = (round(exposure.ra0, 6), "Object right ascension (deg)")
    header["OBJDECD"] = (round(exposure.dec0, 6), "Object declination (deg)")
    header["EQUINOX"] = (2000.0, "Equinox")
    header["PROGRMID"] = (1, "Queue program ID")
    header["FILTERID"] = (FILTER_IDS[exposure.filtercode], "Filter ID code")
    header["FILTER"] = (FILTER_NAMES[exposure.filtercode], "Filter name")
    header["FILTPOS"] = (FILTER_IDS[exposure.filtercode], "Filter position")
    header["OBSJD"] = (exposure.obsjd, "Julian day corresponds to UTC-OBS (day)")
    header["OBSMJD"] = (round(exposure.obsjd - 2400000.5, 7), "MJD corresponds to UTC-OBS (day)")
    header["RA"] = (_sexagesimal(exposure.ra0, hours=True), "Requested right ascension")
    header["DEC"] = (_sexagesimal(exposure.dec0, hours=False), "Requested declination")
    header["RAD"] = (round(exposure.ra0, 6), "Requested right ascension (deg)")
    header["DECD"] = (round(exposure.dec0, 6), "Requested declination (deg)")
    header["TELRAD"] = (round(exposure.ra0, 6), "Telescope right ascension (deg)")
    header["TELDECD"] = (round(exposure.dec0, 6), "Telescope declination (deg)")
    header["AIRMASS"] = (exposure.airmass, "Airmass (Hardie)")
    header["OBSERVAT"] = ("Palomar Observatory", "Observatory")
    header["TELESCOP"] = ("Palomar 48-inch", "Observatory telescope")
    header["SHUTOPEN"] = (shutter.isoformat(timespec="milliseconds"), "Shutter open time")
    closed = shutter + dt.timedelta(seconds=exposure.exptime)
    header["SHUTCLSD"] = (closed.isoformat(timespec="milliseconds"), "Shutter close time")
    header["PIXSCALX"] = (PIXEL_SCALE_ARCSEC, "Pixel scale in X")
    header["PIXSCALY"] = (PIXEL_SCALE_ARCSEC, "Pixel scale in Y")
    header["NFRAMES"] = (8, "number of frames in FITS file")
    header["CCD_ID"] = (ccdid, "ID value of CCD detector")
    if exposure.led is not None:
        header["ILUM_LED"] = (exposure.led, "Illuminator LED number")
        header["ILUMWAVE"] = (LED_WAVELENGTHS_NM[exposure.led], "Illuminator LED wavelength (nm)")
        header["ILUMPOWR"] = (1.0, "Illuminator LED power")
    return header


def amplifier_header(amp: Amplifier, extname: str) -> fits.Header:
    header = fits.Header()
    header["EXTNAME"] = extname
    header["CCD_ID"] = (amp.ccdid, "ID value of CCD detector")
    header["CCDNAME"] = (f"S{amp.ccdid:02d}", "Detector name or serial number")
    header["AMP_ID"] = (amp.qid - 1, "ID value of CCD amplifier")
    header["AMP_NAME"] = (AMP_NAMES[amp.qid], "Name of CCD amplifier")
    header["GAIN"] = (amp.gain, "Gain e-/adu")
    header["READNOI"] = (amp.read_noise_e, "Read noise e-")
    header["DARKCUR"] = (0.0, "Dark current e-/s @ 150 K")
    return header


@lru_cache(maxsize=16)
def _catalogue(instrument: Instrument, field_id: int, ccdid: int) -> sky.Catalogue:
    return instrument.catalogue(field_id, ccdid)


@lru_cache(maxsize=1)
def _truth_flats(instrument: Instrument, ccdid: int, filtercode: str, medians: tuple[tuple[int, float], ...]) -> tuple[npt.NDArray[np.float32], ...]:
    return truth_flats(instrument, ccdid, filtercode, dict(medians))[1]


def _science_quadrant(
    spec: NightSpec, exposure: Exposure, ccdid: int, qid: int, gain: float
) -> tuple[npt.NDArray[np.float32], dict[str, float | str], dict[str, npt.NDArray[Any]], npt.NDArray[np.bool_]]:
    """Noise-free linear model ``sky + stars`` (ADU, before the flat), its WCS keywords, its star truth,
    and the pixels where stars stand above the sky noise."""
    shape = spec.instrument.shape
    assert exposure.sky_adu is not None and exposure.magzp is not None and exposure.seeing_fwhm_arcsec is not None
    wcs_keys = quadrant_wcs_keywords(shape, ccdid, qid, exposure.ra0, exposure.dec0)
    # a starflat dithers stars across CCD edges: each CCD then shows the stars of all the night's CCDs
    rendered = spec.ccds if spec.starflat and ccdid in spec.ccds else (ccdid,)
    parts = [_catalogue(spec.instrument, exposure.field, c) for c in rendered]
    catalogue = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    ra, dec = sky.positions_at(catalogue, exposure.obsjd)
    x, y = wcs_from_keywords(wcs_keys).wcs_world2pix(ra, dec, 0)
    margin = sky.STAMP_HALF_WIDTH + 1
    near = (x > -margin) & (x < shape.cols - 1 + margin) & (y > -margin) & (y < shape.rows - 1 + margin)
    mags = np.asarray(catalogue[sky.FILTER_MAG_COLUMN[exposure.filtercode]], dtype=np.float64)
    flux = 10.0 ** (-0.4 * (mags - exposure.magzp))
    sigma = exposure.seeing_fwhm_arcsec / PIXEL_SCALE_ARCSEC / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    stars = np.zeros((shape.rows, shape.cols), dtype=np.float32)
    sky.render_stars(stars, x[near], y[near], flux[near], sigma)
    sky_noise = math.sqrt(exposure.sky_adu / gain)
    sources = stars > np.float32(SOURCE_MASK_SIGMA * sky_noise)
    on = (x >= -0.5) & (x < shape.cols - 0.5) & (y >= -0.5) & (y < shape.rows - 0.5)
    truth = {
        "filefracday": np.full(int(on.sum()), exposure.filefracday),
        "ccdid": np.full(int(on.sum()), ccdid, dtype=np.int16),
        "qid": np.full(int(on.sum()), qid, dtype=np.int16),
        "source_id": np.asarray(catalogue["source_id"])[on],
        "x": x[on],
        "y": y[on],
        "flux": flux[on],
    }
    stars += np.float32(exposure.sky_adu)
    return stars, wcs_keys, truth, sources


def _sci_headers(
    exposure: Exposure, amp: Amplifier, primary: fits.Header, wcs_keys: dict[str, float | str], saturate: float
) -> tuple[fits.Header, fits.Header]:
    assert exposure.magzp is not None and exposure.seeing_fwhm_arcsec is not None
    header = primary.copy()
    header.remove("NFRAMES", ignore_missing=True)
    header.update(amplifier_header(amp, str(amp.qid)))
    header.remove("EXTNAME")
    header["WCSVERS"] = ("2.1", "WCS version number")
    header["WCSNAME"] = ("ZTF", "Name of the WCS coordinate system")
    for key, value in wcs_keys.items():
        header[key] = value
    header["MAGZP"] = (exposure.magzp, "Magnitude zero point for PSF-photometry [mag]")
    header["MAGZPUNC"] = (1e-5, "Magnitude zero point uncertainty [mag]")
    header["MAGZPRMS"] = (0.02, "Magnitude zero point RMS deviation [mag]")
    header["SATURATE"] = (round(saturate, 3), "Saturation value in final science image [DN]")
    header["CCDID"] = amp.ccdid
    header["QID"] = amp.qid
    header["RCID"] = rcid_of(amp.ccdid, amp.qid)
    header["EXPID"] = exposure.expid
    header["INFOBITS"] = (0, "infoBits string; bit(s) = null")
    header["SEEING"] = (round(exposure.seeing_fwhm_arcsec / PIXEL_SCALE_ARCSEC, 3), "seeing FWHM [pixels]")
    header["MAGLIM"] = (round(exposure.magzp - 5.0, 2), "5-sigma mag-limit in PSF-fit catalog [mag]")
    header["STATUS"] = (1, "overall processing flag: 0 = bad; 1 = usable")
    header["DBFIELD"] = (exposure.field, "Database field")
    header["DBNID"] = (exposure.expid // 100000, "Database night ID")
    header["DBEXPID"] = (exposure.expid, "Database exposure ID")
    header["DBPID"] = (exposure.expid * 10000 + rcid_of(amp.ccdid, amp.qid) * 100 + 15, "Database processed-image ID")
    header["DBRCID"] = (rcid_of(amp.ccdid, amp.qid), "Database readout-channel ID")
    header["DBFID"] = (FILTER_IDS[exposure.filtercode], "Database filter ID")
    mask_header = header.copy()
    for key in ("MAGZP", "MAGZPUNC", "MAGZPRMS", "SATURATE", "SEEING", "MAGLIM", "INFOBITS", "STATUS"):
        mask_header.remove(key, ignore_missing=True)
    mask_header["COMMENT"] = "bit-mask definitions:"
    for bit, meaning in MASK_BITS.items():
        mask_header[f"BIT{bit:02d}"] = (bit, meaning)
    return header, mask_header


def write_ccd_file(spec: NightSpec, exposure: Exposure, ccdid: int) -> FileResult:
    """Write one raw CCD file (and for science the sciimg and mskimg of its quadrants)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    instrument = spec.instrument
    shape = instrument.shape
    name = exposure.raw_name(ccdid)
    primary = primary_header(exposure, ccdid)
    quadrants: list[bytes] = []
    overscans: list[bytes] = []
    relpaths = [name.relpath]
    star_truth: list[dict[str, npt.NDArray[Any]]] = []
    key = (spec.night.toordinal(), exposure.index, ccdid)
    for qid in (1, 2, 3, 4):
        amp = instrument.amplifier(ccdid, qid)
        nonlinearity = coefficients(spec.night, ccdid, qid)
        signal: npt.NDArray[np.float32] | None = None
        if exposure.imgtype == "flat":
            assert exposure.led is not None
            signal = instrument.led_flat(ccdid, exposure.filtercode, exposure.led, qid)
            signal *= np.float32(instrument.led_level(exposure.led))
        elif exposure.imgtype == "object":
            model, wcs_keys, truth, sources = _science_quadrant(spec, exposure, ccdid, qid, amp.gain)
            medians = tuple(sorted(spec.flat_medians[(ccdid, exposure.filtercode)].items()))
            signal = model * _truth_flats(instrument, ccdid, exposure.filtercode, medians)[qid - 1]
            if (ccdid, exposure.filtercode) in spec.sky_levels:
                signal *= np.float32(spec.sky_levels[(ccdid, exposure.filtercode)])
            if spec.starflat:
                signal *= np.float32(instrument.starflat_response(ccdid, qid))
            star_truth.append(truth)
        raw = raw_quadrant(
            signal,
            amp,
            nonlinearity,
            drift_for(spec.seed, spec.night, exposure, ccdid, qid),
            instrument.bias_structure(ccdid, qid),
            shape.overscan,
            stream(spec.seed, "poisson", *key, qid),
            stream(spec.seed, "read_noise", *key, qid),
            pocket=_pocket_parameters(spec.pocket, ccdid, qid, spec.night),
        )
        quadrants.append(rice_tiles.encode_image_hdu(raw.data, amplifier_header(amp, str(qid))))
        overscans.append(rice_tiles.encode_image_hdu(raw.overscan, amplifier_header(amp, str(qid + 4))))
        if exposure.imgtype == "object":
            saturate = float(correct(SATURATION_RAW_ADU - amp.bias_level, *nonlinearity))
            sci_header, mask_header = _sci_headers(exposure, amp, primary, wcs_keys, saturate)
            mask = np.where(raw.saturated, np.int16(MASK_SATURATED), np.int16(0)).astype(np.int16)
            mask[sources] |= np.int16(MASK_SOURCE)
            mask[:, list(amp.dead_columns)] |= np.int16(MASK_DEAD)
            mask[:, list(amp.hot_columns)] |= np.int16(MASK_NOISY)
            sci_name = name.sci(qid, "sciimg.fits")
            msk_name = name.sci(qid, "mskimg.fits")
            _atomic_write(fits.HDUList([fits.PrimaryHDU(model, header=sci_header)]), spec.out / sci_name.relpath)
            _atomic_write(fits.HDUList([fits.PrimaryHDU(mask, header=mask_header)]), spec.out / msk_name.relpath)
            relpaths += [sci_name.relpath, msk_name.relpath]
    _atomic_write(b"".join([_primary_bytes(primary), *quadrants, *overscans]), spec.out / name.relpath)
    stars = {k: np.concatenate([t[k] for t in star_truth]) for k in star_truth[0]} if star_truth else None
    return FileResult(tuple(relpaths), stars, time.perf_counter() - start, time.process_time() - cpu_start)


def _pocket_parameters(model: str, ccdid: int, qid: int, night: dt.date) -> pocket_model.Parameters | None:
    """The pocket injected into (CCD, qid) on ``night``: the model's parameters, None when off or uncovered."""
    return None if model == "off" else pocket_model.pocket_parameters(model, ccdid, qid, night)


def _write_ccd_file_job(job: tuple[NightSpec, Exposure, int]) -> FileResult:
    return write_ccd_file(*job)


def _flat_truth_job(job: tuple[Instrument, Path, int, str]) -> tuple[int, str, dict[int, float], float]:
    """Compute the LED medians of (CCD, filter), write ``truth/flat_<filt>_cNN.fits``; return the medians."""
    instrument, out, ccdid, filtercode = job
    medians, flats = truth_flats(instrument, ccdid, filtercode)
    median_truth = float(np.median(np.concatenate([f.ravel() for f in flats])))
    hdus = fits.HDUList([fits.PrimaryHDU()])
    for qid, flat in enumerate(flats, start=1):
        header = fits.Header()
        header["EXTNAME"] = f"Q{qid}"
        header["CCDID"], header["QID"], header["FILTER"] = ccdid, qid, filtercode
        header["BUNIT"] = "relative response"
        hdus.append(fits.ImageHDU(flat, header=header))
    _atomic_write(hdus, out / "truth" / f"flat_{filtercode}_c{ccdid:02d}.fits")
    return ccdid, filtercode, medians, median_truth


def _bias_truth_job(job: tuple[Instrument, Path, int]) -> int:
    instrument, out, ccdid = job
    hdus = fits.HDUList([fits.PrimaryHDU()])
    for qid in (1, 2, 3, 4):
        header = fits.Header()
        header["EXTNAME"] = f"Q{qid}"
        header["CCDID"], header["QID"], header["BUNIT"] = ccdid, qid, "ADU"
        hdus.append(fits.ImageHDU(instrument.bias_truth(ccdid, qid), header=header))
    _atomic_write(hdus, out / "truth" / f"bias_c{ccdid:02d}.fits")
    return ccdid


# --------------------------------------------------------------------------- the night


@dataclass
class NightTruth:
    """What :func:`generate_night` wrote and injected."""

    out: Path
    night: dt.date
    exposures: list[Exposure]
    relpaths: list[str]
    params: dict[str, Any]
    stars: pa.Table
    seconds_per_file: list[float] = field(default_factory=list)  # wall clock, in the worker
    cpu_seconds_per_file: list[float] = field(default_factory=list)

    def raw_relpaths(self, imgtype: str | None = None) -> list[str]:
        """Relative paths of the raw files written, optionally of one image type ('bias', 'flat', 'object')."""
        codes = {"bias": "_b.", "flat": "_f.", "object": "_o."}
        return [p for p in self.relpaths if p.startswith("raw/") and (imgtype is None or codes[imgtype] in p)]


def read_params(out: Path) -> dict[str, Any]:
    """The content of ``truth/params.json`` (empty when absent)."""
    path = out / "truth" / "params.json"
    if not path.exists():
        return {}
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _map(jobs: int, function: Any, items: list[Any], *, fork: bool = True) -> Iterable[Any]:
    """``map`` in this process, or over a pool of ``jobs`` processes (forked when this process has no
    other thread and ``fork``, so workers start at once; spawned otherwise, since forking a threaded
    process is unsafe: the pocket's compiled kernels may have started numba's threads, which
    ``threading`` does not see)."""
    if jobs <= 1 or len(items) <= 1:
        return map(function, items)
    context = multiprocessing.get_context("fork" if fork and threading.active_count() == 1 else "spawn")
    chunksize = max(1, len(items) // (4 * jobs))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as executor:
        return list(executor.map(function, items, chunksize=chunksize))


def generate_night(
    out: Path,
    night: dt.date,
    *,
    ccds: Sequence[int] = (13,),
    n_exposures: int = 5,
    flats_per_led: int = 5,
    n_biases: int = 20,
    seed: int = 0,
    shape: str = "full",
    jobs: int = 1,
    fields: Sequence[int] = DEFAULT_FIELDS,
    filters: Sequence[str] = DEFAULT_FILTERS,
    flat_filters: Sequence[str] = DEFAULT_FILTERS,
    instrument_seed: int = 0,
    stars_per_quadrant: int | None = None,
    pocket: str = "off",
    starflat: bool = False,
    response_levels: bool = False,
) -> NightTruth:
    """Write the night ``night`` of CCDs ``ccds`` under ``out`` (IRSA layout, refcat and truth).

    ``filters``: the science filters, in rotation; ``flat_filters``: the filters whose LED flats are taken
    tonight (leave one out for a night without its flats); ``pocket``: "off" or a pocket model ("v0.1")
    whose parameters are injected (step 2b); ``starflat``: a dithered sequence (``STARFLAT_DITHERS``, in
    quadrant widths) whose science frames carry a per-quadrant response the flats do not see
    (``Instrument.starflat_response``, recorded in the truth as ``starflat``); ``response_levels``: CCDs
    and amplifiers of different sensitivities under a focal-plane illumination
    (``Instrument.focal_plane_response``, seen by the LEDs and the sky alike; each science frame is
    multiplied by its CCD's level as in :func:`sky_levels_of`, recorded in the truth as ``response``).
    The same for every night of an archive. Raise UsageError on bad arguments.
    """
    _check_arguments(ccds, n_exposures, flats_per_led, n_biases, jobs, fields, filters, flat_filters)
    if pocket != "off" and pocket not in pocket_model.MODELS:
        raise UsageError(f"pocket {pocket!r}: expected \"off\" or one of {', '.join(pocket_model.MODELS)}")
    frame = shape_named(shape)
    instrument = Instrument(
        frame, instrument_seed, stars_per_quadrant or STARS_PER_QUADRANT[frame.name], response_levels=response_levels
    )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    params = read_params(out)
    if params and (
        params.get("shape", {}).get("name") != frame.name
        or params.get("instrument_seed") != instrument_seed
        or bool(params.get("response_levels", False)) != response_levels
    ):
        raise UsageError(
            f"{out}: holds nights of shape {params.get('shape', {}).get('name')!r}, instrument seed "
            f"{params.get('instrument_seed')} and response levels {bool(params.get('response_levels', False))}: "
            "expected the same shape, instrument seed and response levels for every night"
        )
    (out / "truth").mkdir(parents=True, exist_ok=True)
    exposures = plan_night(
        night, seed, n_exposures=n_exposures, flats_per_led=flats_per_led, n_biases=n_biases,
        fields=fields, filters=filters, flat_filters=flat_filters,
        starflat=starflat, quadrant_deg=frame.cols * PIXEL_SCALE_ARCSEC / 3600.0,
    )

    needed_filters = sorted({e.filtercode for e in exposures if e.imgtype != "bias"}, key=DEFAULT_FILTERS.index)
    flat_results = _map(jobs, _flat_truth_job, [(instrument, out, c, f) for c in ccds for f in needed_filters])
    flat_medians: dict[tuple[int, str], dict[int, float]] = {}
    flats_params: dict[str, dict[str, Any]] = params.get("flats", {})
    for ccdid, filtercode, medians, median_truth in flat_results:
        flat_medians[(ccdid, filtercode)] = medians
        flats_params.setdefault(filtercode, {})[str(ccdid)] = {
            "led_medians": {str(k): v for k, v in medians.items()},
            "median": median_truth,
        }
    list(_map(jobs, _bias_truth_job, [(instrument, out, c) for c in ccds]))
    sky_levels = sky_levels_of(flat_medians) if response_levels else {}

    spec = NightSpec(out, night, seed, instrument, flat_medians, pocket, starflat, sky_levels, tuple(ccds))
    order = {"bias": 0, "flat": 1, "object": 2}
    work = sorted(((spec, e, c) for e in exposures for c in ccds), key=lambda j: (j[2], order[j[1].imgtype], j[1].filtercode, j[1].index))
    results: list[FileResult] = list(_map(jobs, _write_ccd_file_job, work, fork=pocket == "off"))

    catalogues = [instrument.catalogue(f, c) for f in sorted({e.field for e in exposures if e.imgtype == "object"}) for c in ccds]
    pixels: set[int] = set()
    for catalogue, (field_id, ccdid) in zip(catalogues, [(f, c) for f in sorted({e.field for e in exposures if e.imgtype == "object"}) for c in ccds], strict=True):
        pixels |= sky.catalogue_pixels(catalogue, frame, field_id, ccdid)
    sky.write_refcat(out / "refcat", catalogues, pixels)

    stars = _write_stars(out, night, [r.stars for r in results if r.stars is not None])
    params = _night_params(params, instrument, night, seed, ccds, exposures, flats_params)
    if pocket != "off":
        params["nights"][night.isoformat()]["pocket"] = _pocket_truth(pocket, night, ccds)
    if response_levels:
        params["nights"][night.isoformat()]["response"] = _response_truth(instrument, ccds, sky_levels)
    if starflat:
        params["nights"][night.isoformat()]["starflat"] = {
            "dithers_quadrants": [list(d) for d in STARFLAT_DITHERS],
            "response": {str(c): {str(q): instrument.starflat_response(c, q) for q in (1, 2, 3, 4)} for c in ccds},
        }
    _write_json(out / "truth" / "params.json", params)
    relpaths = sorted(p for r in results for p in r.relpaths)
    return NightTruth(
        out, night, exposures, relpaths, params, stars, [r.seconds for r in results], [r.cpu_seconds for r in results]
    )


def sky_levels_of(flat_medians: dict[tuple[int, str], dict[int, float]]) -> dict[tuple[int, str], float]:
    """Each CCD's level against the focal plane, as the sky sees it: the mean over the filter's LEDs
    of the CCD's LED median over the mean of that LED's medians over the night's CCDs.

    A science frame is multiplied by its CCD's flat ``T`` (median about 1 on each CCD) and by this
    level, so that its CCD-flatfielded stars come out at ``level x true flux`` and its
    focal-plane-flatfielded ones at one focal-plane constant times the true flux. (The mean here,
    not the median the pipeline takes, is the simulator's own choice: only ratios between CCDs
    are compared.)
    """
    by_filter: dict[str, dict[int, dict[int, float]]] = {}
    for (ccdid, filtercode), medians in flat_medians.items():
        by_filter.setdefault(filtercode, {})[ccdid] = medians
    levels: dict[tuple[int, str], float] = {}
    for filtercode, by_ccd in by_filter.items():
        leds = LEDS[filtercode]
        plane = {led: float(np.mean([m[led] for m in by_ccd.values()])) for led in leds}
        for ccdid, medians in by_ccd.items():
            levels[(ccdid, filtercode)] = float(np.mean([medians[led] / plane[led] for led in leds]))
    return levels


def _response_truth(instrument: Instrument, ccds: Sequence[int], sky_levels: dict[tuple[int, str], float]) -> dict[str, Any]:
    filters = sorted({f for _, f in sky_levels})
    return {
        "ccd_levels": {str(c): instrument.ccd_level(c) for c in ccds},
        "amplifier_levels": {str(c): {str(q): instrument.amplifier_level(c, q) for q in (1, 2, 3, 4)} for c in ccds},
        "vignetting": FOCAL_PLANE_VIGNETTING,
        "sky_levels": {f: {str(c): lv for (c, ff), lv in sorted(sky_levels.items()) if ff == f} for f in filters},
    }


def _check_arguments(
    ccds: Sequence[int], n_exposures: int, flats_per_led: int, n_biases: int, jobs: int,
    fields: Sequence[int], filters: Sequence[str], flat_filters: Sequence[str],
) -> None:
    if not ccds or any(not 1 <= c <= 16 for c in ccds) or len(set(ccds)) != len(ccds):
        raise UsageError(f"ccds {tuple(ccds)}: expected distinct CCD ids 1..16")
    for label, value in (("--exposures", n_exposures), ("--flats-per-led", flats_per_led), ("--biases", n_biases)):
        if value < 0:
            raise UsageError(f"{label} {value}: expected a number >= 0")
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: expected a number >= 1")
    if not fields or any(not 1 <= f <= 999999 for f in fields):
        raise UsageError(f"fields {tuple(fields)}: expected field ids 1..999999")
    for label, chosen, allow_empty in (("filters", filters, False), ("flat_filters", flat_filters, True)):
        if (not chosen and not allow_empty) or any(f not in DEFAULT_FILTERS for f in chosen):
            raise UsageError(f"{label} {tuple(chosen)}: expected some of zg, zr, zi")


def _write_stars(out: Path, night: dt.date, parts: list[dict[str, npt.NDArray[Any]]]) -> pa.Table:
    schema = pa.schema(
        [("filefracday", pa.string()), ("ccdid", pa.int16()), ("qid", pa.int16()), ("source_id", pa.int64()),
         ("x", pa.float64()), ("y", pa.float64()), ("flux", pa.float64())]
    )
    if parts:
        table = pa.table({name: np.concatenate([p[name] for p in parts]) for name in schema.names}, schema=schema)
    else:
        table = schema.empty_table()
    path = out / "truth" / "stars.parquet"
    if path.exists():
        old = pq.read_table(path).cast(schema)
        other_nights = ~np.char.startswith(old["filefracday"].to_numpy(zero_copy_only=False).astype(str), f"{night:%Y%m%d}")
        table = pa.concat_tables([old.filter(pa.array(other_nights)), table])
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return table


def _night_params(
    params: dict[str, Any], instrument: Instrument, night: dt.date, seed: int, ccds: Sequence[int],
    exposures: list[Exposure], flats_params: dict[str, Any],
) -> dict[str, Any]:
    shape = instrument.shape
    params["format"] = 1
    params["shape"] = {"name": shape.name, "rows": shape.rows, "cols": shape.cols, "overscan": shape.overscan}
    params["instrument_seed"] = instrument.seed
    params["stars_per_quadrant"] = instrument.stars_per_quadrant
    params["response_levels"] = instrument.response_levels
    params["saturation_raw_adu"] = SATURATION_RAW_ADU
    params["trail"] = {"fraction": TRAIL_FRACTION, "scale_columns": TRAIL_SCALE_COLUMNS}
    params["led_levels_adu"] = {str(led): instrument.led_level(led) for leds in LEDS.values() for led in leds}
    amplifiers = params.setdefault("amplifiers", {})
    for ccdid in ccds:
        amplifiers[str(ccdid)] = {}
        for qid in (1, 2, 3, 4):
            amp = instrument.amplifier(ccdid, qid)
            record = asdict(amp)
            record.pop("ccdid"), record.pop("qid")
            record["bias_level_adu"] = record.pop("bias_level")
            record["hot_excess_adu"] = record.pop("hot_excess")
            record["read_noise_adu"] = amp.read_noise_adu
            amplifiers[str(ccdid)][str(qid)] = record
    params["flats"] = flats_params
    night_record: dict[str, Any] = {
        "seed": seed,
        "ccds": list(ccds),
        "nonlinearity_epoch": epoch_for(night),
        "nonlinearity": {str(c): {str(q): list(coefficients(night, c, q)) for q in (1, 2, 3, 4)} for c in ccds},
        "exposures": [],
    }
    for exposure in exposures:
        record = asdict(exposure)
        record["drift"] = {
            str(c): {str(q): asdict(drift_for(seed, night, exposure, c, q)) for q in (1, 2, 3, 4)} for c in ccds
        }
        night_record["exposures"].append(record)
    params.setdefault("nights", {})[night.isoformat()] = night_record
    return params


def _pocket_truth(model: str, night: dt.date, ccds: Sequence[int]) -> dict[str, Any]:
    parameters: dict[str, dict[str, Any]] = {}
    for ccdid in ccds:
        parameters[str(ccdid)] = {}
        for qid in (1, 2, 3, 4):
            p = _pocket_parameters(model, ccdid, qid, night)
            parameters[str(ccdid)][str(qid)] = None if p is None else asdict(p)
    return {"model": model, "parameters": parameters}


def _write_json(path: Path, content: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _filter_list(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in text.split(",") if f.strip())


def main(args: argparse.Namespace, ccds: tuple[int, ...]) -> int:
    """``streamer sim generate``: write the night and print one summary line."""
    start = time.perf_counter()
    truth = generate_night(
        Path(args.out), args.night, ccds=ccds, n_exposures=args.exposures, flats_per_led=args.flats_per_led,
        n_biases=args.biases, seed=args.seed, shape=args.shape, jobs=args.jobs,
        filters=_filter_list(args.filters), flat_filters=_filter_list(args.flat_filters),
        pocket=args.pocket, starflat=args.starflat,
        response_levels=args.response_levels,
    )
    elapsed = time.perf_counter() - start
    cpu = truth.cpu_seconds_per_file
    print(
        f"wrote {len(truth.raw_relpaths())} raw files ({len(truth.relpaths)} files in all) for {args.night} "
        f"under {args.out} in {elapsed:.1f} s; CPU per CCD file: mean {np.mean(cpu) if cpu else 0:.2f} s, "
        f"median {np.median(cpu) if cpu else 0:.2f} s",
        flush=True,
    )
    return 0
