"""Master calibration files (bias, per-LED flat, flat): format, atomic writing, reading.

Format (FITS):

- HDU 0: header only, provenance keywords: ``MKIND`` (bias | ledflat | flat), ``NIGHT``
  (YYYY-MM-DD), ``CCD_ID``, ``FILTER`` (flats), ``LEDS`` (comma-separated LED numbers used),
  ``NFRAMES`` and ``FRAMEnnn`` (the raw file names combined), ``NORMFACT`` (flats: the CCD-wide
  median the flat was divided by), ``LEVnn`` (flats: the CCD-wide median in ADU of LED nn's stack),
  ``WLEDnn`` (flat: the weight of LED nn), ``CFGHASH``, ``PKGVERS``, ``FORMAT`` (format version),
  and any further string provenance given by the caller (``HIERARCH`` keywords).
- For each quadrant q present: ``Q{q}_DATA`` (float32), ``Q{q}_VAR`` (float32, the variance of the
  data), ``Q{q}_MASK`` (int16, our bits, :mod:`streamer.detrend.masks`), Rice tile-compressed,
  with the quadrant's ``NFRAMES``, ``GAIN``, ``READNOI`` in the data HDU's header.

Compression: float images are quantised with a fixed step (``QSTEP`` in each header), dithered
(SUBTRACTIVE_DITHER_1, fixed seed, so identical inputs give identical files):

- data: step = 0.2 x the median per-pixel noise sqrt(variance); the quantisation error
  (uniform, rms = step / sqrt(12) = 0.058 x noise) adds 0.17 % to the noise in quadrature;
- variance: step = 0.1 x its median, an error of 2.9 % (rms) of the typical variance, far below
  the scatter of a variance estimated from a handful of frames (+-47 % for 10 frames).

So a master's size follows its noise, not its dynamic range (see BENCHMARKS.md for sizes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from streamer.detrend.calibrate import MasterQuadrant
from streamer.errors import StreamerError
from streamer.storage.atomic import write_atomically as write_durably

FORMAT_VERSION = 1
DITHER_SEED = 8191
DATA_STEP_PER_NOISE = 0.2
VARIANCE_STEP_PER_MEDIAN = 0.1


class MasterReadError(StreamerError):
    """A master file, or one of its quadrants, is missing or unreadable."""


def extension_names(qid: int) -> tuple[str, str, str]:
    """EXTNAMEs of quadrant ``qid``'s data, variance and mask."""
    return (f"Q{qid}_DATA", f"Q{qid}_VAR", f"Q{qid}_MASK")


def quantisation_steps(data: npt.NDArray[np.floating], variance: npt.NDArray[np.floating]) -> tuple[float, float]:
    """(data step, variance step) for :func:`write_master`, from the median finite variance."""
    finite = variance[np.isfinite(variance) & (variance > 0)]
    typical = float(np.median(finite)) if finite.size else 0.0
    if not typical > 0:
        scale = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
        typical = (1e-6 * max(scale, 1e-6)) ** 2
    return DATA_STEP_PER_NOISE * math.sqrt(typical), VARIANCE_STEP_PER_MEDIAN * typical


def _compressed(array: npt.NDArray[np.generic], name: str, step: float | None, header: fits.Header | None = None) -> fits.CompImageHDU:
    if step is None:
        return fits.CompImageHDU(array, header=header, name=name, compression_type="RICE_1")
    hdu = fits.CompImageHDU(
        array,
        header=header,
        name=name,
        compression_type="RICE_1",
        quantize_level=-step,
        quantize_method=1,
        dither_seed=DITHER_SEED,
    )
    hdu.header["QSTEP"] = (step, "fixed quantisation step of the compression")
    return hdu


def write_atomically(hdul: fits.HDUList, path: str | os.PathLike[str]) -> int:
    """Write ``hdul`` to ``path`` durably (:func:`streamer.storage.atomic.write_atomically`); return its size in bytes."""
    return write_durably(Path(path), hdul.writeto).stat().st_size


def write_master(
    path: str | os.PathLike[str],
    quadrants: Mapping[int, MasterQuadrant],
    *,
    primary_cards: Mapping[str, str | int | float | bool],
    quadrant_cards: Mapping[int, Mapping[str, str | int | float | bool | None]] | None = None,
) -> int:
    """Write a master file atomically (format above); returns its size in bytes."""
    primary = fits.PrimaryHDU()
    primary.header["FORMAT"] = (FORMAT_VERSION, "ztf-streamer master format version")
    for key, value in primary_cards.items():
        primary.header[key if len(key) <= 8 else f"HIERARCH {key}"] = value
    hdus: list[fits.PrimaryHDU | fits.CompImageHDU] = [primary]
    for qid in sorted(quadrants):
        data, variance, mask = quadrants[qid]
        if not data.shape == variance.shape == mask.shape:
            raise ValueError(f"quadrant {qid}: data {data.shape}, variance {variance.shape}, mask {mask.shape} differ")
        data_step, variance_step = quantisation_steps(data, variance)
        header = fits.Header()
        for key, card in (quadrant_cards or {}).get(qid, {}).items():
            if card is not None:
                header[key] = card
        names = extension_names(qid)
        hdus.append(_compressed(np.asarray(data, dtype=np.float32), names[0], data_step, header))
        hdus.append(_compressed(np.asarray(variance, dtype=np.float32), names[1], variance_step))
        if np.any(mask > np.iinfo(np.int16).max):
            raise ValueError(f"quadrant {qid}: mask bits above 14 do not fit the int16 mask HDU")
        hdus.append(_compressed(np.asarray(mask).astype(np.int16), names[2], None))
    return write_atomically(fits.HDUList(hdus), path)


def read_master_header(path: str | os.PathLike[str]) -> fits.Header:
    """The primary (provenance) header of a master file."""
    try:
        with fits.open(os.fspath(path), memmap=False) as hdul:
            return hdul[0].header.copy()
    except FileNotFoundError:
        raise MasterReadError(f"{os.fspath(path)}: no such master file") from None
    except (OSError, ValueError) as err:
        raise MasterReadError(f"{os.fspath(path)}: unreadable master file: {err}") from err


def master_quadrants(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """The quadrants present in a master file."""
    try:
        with fits.open(os.fspath(path), memmap=False) as hdul:
            names = {hdu.name for hdu in hdul}
    except (OSError, ValueError) as err:
        raise MasterReadError(f"{os.fspath(path)}: unreadable master file: {err}") from err
    return tuple(q for q in (1, 2, 3, 4) if extension_names(q)[0] in names)


def read_master(path: str | os.PathLike[str], qid: int) -> MasterQuadrant:
    """Quadrant ``qid`` of a master file: (data float32, variance float32, mask uint16), new arrays."""
    name = os.fspath(path)
    data_name, variance_name, mask_name = extension_names(qid)
    try:
        with fits.open(name, memmap=False) as hdul:
            names = {hdu.name for hdu in hdul}
            if data_name not in names:
                raise MasterReadError(f"{name}: no quadrant {qid} in this master")
            data = np.array(hdul[data_name].data, dtype=np.float32)
            variance = np.array(hdul[variance_name].data, dtype=np.float32)
            np.maximum(variance, 0.0, out=variance)  # dithered quantisation can dip just below 0
            mask = np.array(hdul[mask_name].data).astype(np.uint16)
    except MasterReadError:
        raise
    except FileNotFoundError:
        raise MasterReadError(f"{name}: no such master file") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MasterReadError(f"{name}: quadrant {qid} unreadable: {err}") from err
    return MasterQuadrant(data, variance, mask)


def read_master_quadrant_header(path: str | os.PathLike[str], qid: int) -> fits.Header:
    """The header of quadrant ``qid``'s data HDU (NFRAMES, GAIN, READNOI, QSTEP)."""
    name = os.fspath(path)
    try:
        with fits.open(name, memmap=False) as hdul:
            return hdul[extension_names(qid)[0]].header.copy()
    except KeyError:
        raise MasterReadError(f"{name}: no quadrant {qid} in this master") from None
    except (OSError, ValueError) as err:
        raise MasterReadError(f"{name}: unreadable master file: {err}") from err
