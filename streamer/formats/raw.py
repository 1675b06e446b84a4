"""Reading raw ZTF CCD files (``.fits.fz``): one quadrant and its overscan at a time.

Layout: HDU 0 a header only; HDU q (1..4) quadrant q's pixels; HDU q + 4 its overscan (same rows,
30 columns). Tile-compressed integers or floats are both accepted. Arrays are returned exactly as
stored (dtype and grid) and read-only, so that nobody computes in place on them: the detrending
copies into float32 itself. A missing, truncated or undecodable quadrant HDU raises
:class:`QuadrantReadError` for that quadrant only; a file that cannot be opened at all raises
:class:`RawFileError`.

Decoding: HDUs in the layout of ZTF's raws (16- or 32-bit integers, RICE_1, tiles of whole rows)
are decoded tile by tile by :mod:`.rice_tiles` (imagecodecs, bit-identical to astropy, about 1.5x
faster); any other layout is decoded by astropy.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

from streamer.detrend.readout import OVERSCAN_COLUMNS
from streamer.errors import StreamerError
from streamer.formats import rice_tiles

# What astropy raises on truncated or malformed compressed data, besides its warnings.
try:  # corrupt Rice bytes raise cfitsio's own exception, a direct subclass of Exception
    from astropy.io.fits.hdu.compressed._compression import CfitsioException
except ImportError:  # pragma: no cover - astropy without that private module
    CfitsioException = OSError
_READ_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, EOFError, AstropyWarning, CfitsioException)


class RawFileError(StreamerError):
    """A raw file that cannot be opened or whose primary header is unreadable."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple[type[RawFileError], tuple[str, str]]:
        return (type(self), (self.path, self.reason))


class QuadrantReadError(StreamerError):
    """One quadrant (or its overscan) of a raw file is missing or unreadable; the others may be fine."""

    def __init__(self, path: str, qid: int, reason: str) -> None:
        self.path = path
        self.qid = qid
        self.reason = reason
        super().__init__(f"{path}: quadrant {qid}: {reason}")

    def __reduce__(self) -> tuple[type[QuadrantReadError], tuple[str, int, str]]:
        return (type(self), (self.path, self.qid, self.reason))


@dataclass(frozen=True)
class RawQuadrant:
    """One quadrant as stored: data (rows, columns) and overscan (rows, 30), read-only, in raw ADU."""

    qid: int
    data: npt.NDArray[np.number]
    overscan: npt.NDArray[np.number]
    gain: float | None  # e-/ADU, extension header GAIN
    read_noise: float | None  # e-, extension header READNOI


def _header_float(header: fits.Header, key: str) -> float | None:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _read_only(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    array.flags.writeable = False
    return array


class RawFile:
    """An open raw CCD file. Use :func:`open_raw`; read quadrants, overscans or row bands."""

    def __init__(self, path: str, hdul: fits.HDUList, fd: int, decode_threads: int = 1) -> None:
        self.path = path
        self._hdul = hdul  # compressed images as their binary tables: headers without astropy's conversion
        self._images: fits.HDUList | None = None  # the same file with astropy's decompression, opened when needed
        self._fd = fd  # for the tile decoder's reads (os.pread), beside astropy's own file objects
        self._decode_threads = decode_threads
        self._layouts: dict[int, tuple[rice_tiles.RiceLayout, int] | None] = {}

    def close(self) -> None:
        """Close astropy's file objects (:func:`open_raw` does, and closes the descriptor)."""
        self._hdul.close()
        if self._images is not None:
            self._images.close()

    def _image_hdu(self, index: int) -> Any:
        """HDU ``index`` as astropy decompresses it, for the layouts the tile decoder leaves to astropy."""
        if self._images is None:
            self._images = fits.open(self.path, memmap=False, lazy_load_hdus=True)
        return self._images[index]

    @property
    def primary_header(self) -> fits.Header:
        """HDU 0's header (IMGTYPE, OBSJD, CCD_ID, ILUM_LED, ...)."""
        return self._hdul[0].header

    def _hdu(self, qid: int, index: int, what: str) -> Any:
        if qid not in (1, 2, 3, 4):
            raise ValueError(f"qid {qid}: expected 1..4")
        try:
            hdu = self._hdul[index]  # lazily: HDUs after this one are not parsed
        except IndexError:
            raise QuadrantReadError(self.path, qid, f"no HDU {index} ({what}) in the file") from None
        amp_id = hdu.header.get("AMP_ID")
        if isinstance(amp_id, int) and not isinstance(amp_id, bool) and amp_id != qid - 1:
            raise QuadrantReadError(self.path, qid, f"HDU {index} ({what}) has AMP_ID {amp_id}, expected {qid - 1}")
        return hdu

    def _tile_layout(self, hdu: Any, index: int) -> tuple[rice_tiles.RiceLayout, int] | None:
        """(layout, data offset) of HDU ``index`` when the tile decoder handles it, else None."""
        if index not in self._layouts:
            try:
                self._layouts[index] = rice_tiles.hdu_layout(hdu)
            except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
                self._layouts[index] = None  # astropy reads it, and reports what is wrong
        return self._layouts[index]

    def _decode_tiles(self, hdu: Any, qid: int, index: int, what: str, rows: slice | None) -> npt.NDArray[np.number] | None:
        """The stored rows by the tile decoder, or None when it does not handle this HDU or slice."""
        found = self._tile_layout(hdu, index)
        if found is None:
            return None
        layout, data_offset = found
        start, stop, step = (0, layout.rows, 1) if rows is None else rows.indices(layout.rows)
        if step != 1 or start >= stop:
            return None
        try:
            return rice_tiles.decode_rows(self._fd, data_offset, layout, start, stop, threads=self._decode_threads)
        except rice_tiles.TileLengthMismatch:
            return None  # astropy (cfitsio) decodes it again and says what is wrong, or reads what we could not
        except rice_tiles.TileDecodeError as err:
            raise QuadrantReadError(self.path, qid, f"HDU {index} ({what}) unreadable: {err}") from None

    def _read(self, qid: int, index: int, what: str, rows: slice | None) -> npt.NDArray[np.number]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", AstropyWarning)
                hdu = self._hdu(qid, index, what)
                decoded = self._decode_tiles(hdu, qid, index, what, rows)
                if decoded is not None:
                    array = decoded
                elif rows is None:
                    image = self._image_hdu(index)
                    array = image.data
                    del image.data  # astropy would keep the decoded array as long as the file is open
                else:
                    array = self._image_hdu(index).section[rows, :]
        except QuadrantReadError:
            raise
        except Exception as err:  # the C tile decoder raises its own classes (CfitsioException) on corrupt bytes
            raise QuadrantReadError(self.path, qid, f"HDU {index} ({what}) unreadable: {type(err).__name__}: {err}") from err
        if array is None or np.ndim(array) != 2:
            raise QuadrantReadError(self.path, qid, f"HDU {index} ({what}) holds no 2-D image")
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise QuadrantReadError(self.path, qid, f"HDU {index} ({what}) has data type {array.dtype}")
        return _read_only(np.asarray(array))

    def data(self, qid: int) -> npt.NDArray[np.number]:
        """Quadrant ``qid``'s pixels (HDU qid), as stored."""
        return self._read(qid, qid, "data", None)

    def data_rows(self, qid: int, start: int, stop: int) -> npt.NDArray[np.number]:
        """Stored rows [start, stop) of quadrant ``qid``; only their compressed tiles are decoded."""
        return self._read(qid, qid, "data", slice(start, stop))

    def overscan(self, qid: int) -> npt.NDArray[np.number]:
        """Quadrant ``qid``'s overscan (HDU qid + 4), as stored: (rows, 30)."""
        overscan = self._read(qid, qid + 4, "overscan", None)
        if overscan.shape[1] != OVERSCAN_COLUMNS:
            raise QuadrantReadError(self.path, qid, f"overscan of shape {overscan.shape}: expected {OVERSCAN_COLUMNS} columns")
        return overscan

    def data_shape(self, qid: int) -> tuple[int, int]:
        """(rows, columns) of quadrant ``qid`` from its header, without decoding pixels."""
        return self._data_layout(qid)[:2]

    def data_nbytes(self, qid: int) -> int:
        """Bytes of quadrant ``qid`` once decoded, from its header (BITPIX), without decoding pixels."""
        rows, columns, itemsize = self._data_layout(qid)
        return rows * columns * itemsize

    def _data_layout(self, qid: int) -> tuple[int, int, int]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", AstropyWarning)
                header = self._hdu(qid, qid, "data").header
            axis = "ZNAXIS" if header.get("ZIMAGE") is True else "NAXIS"  # a compressed image's table, or an image
            bitpix = "ZBITPIX" if axis == "ZNAXIS" else "BITPIX"
            return (int(header[f"{axis}2"]), int(header[f"{axis}1"]), abs(int(header[bitpix])) // 8)
        except QuadrantReadError:
            raise
        except _READ_ERRORS as err:
            raise QuadrantReadError(self.path, qid, f"HDU {qid} (data) header unreadable: {err}") from err

    def amplifier(self, qid: int) -> tuple[float | None, float | None]:
        """(GAIN e-/ADU, READNOI e-) of quadrant ``qid`` from its extension header, None if absent."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", AstropyWarning)
                header = self._hdu(qid, qid, "data").header
        except QuadrantReadError:
            raise
        except _READ_ERRORS as err:
            raise QuadrantReadError(self.path, qid, f"HDU {qid} (data) header unreadable: {err}") from err
        return _header_float(header, "GAIN"), _header_float(header, "READNOI")

    def quadrant(self, qid: int) -> RawQuadrant:
        """Quadrant ``qid``: data, overscan and amplifier values, checked for matching rows."""
        data = self.data(qid)
        overscan = self.overscan(qid)
        if overscan.shape[0] != data.shape[0]:
            raise QuadrantReadError(self.path, qid, f"data {data.shape} and overscan {overscan.shape} rows differ")
        gain, read_noise = self.amplifier(qid)
        return RawQuadrant(qid=qid, data=data, overscan=overscan, gain=gain, read_noise=read_noise)


@contextmanager
def open_raw(path: str | os.PathLike[str], *, decode_threads: int = 1) -> Iterator[RawFile]:
    """Open a raw CCD file for reading; RawFileError if it cannot be opened at all.

    ``decode_threads`` > 1 splits the tiles of each quadrant between that many threads: less wall
    time when cores are idle, the same CPU time (a pool worker has one core: it keeps 1).
    """
    name = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", AstropyWarning)
            hdul = fits.open(name, memmap=False, lazy_load_hdus=True, disable_image_compression=True)
            _ = hdul[0].header
    except FileNotFoundError:
        raise RawFileError(name, "no such file") from None
    except _READ_ERRORS as err:
        raise RawFileError(name, f"not a readable FITS file: {err}") from err
    try:
        fd = os.open(name, os.O_RDONLY)
    except OSError as err:
        hdul.close()
        raise RawFileError(name, f"cannot be opened: {err}") from err
    raw = RawFile(name, hdul, fd, decode_threads)
    try:
        yield raw
    finally:
        os.close(fd)
        raw.close()


def read_raw_quadrant(path: str | os.PathLike[str], qid: int) -> RawQuadrant:
    """Quadrant ``qid`` of a raw CCD file: see :meth:`RawFile.quadrant`."""
    with open_raw(path) as raw:
        return raw.quadrant(qid)


def read_primary_header(path: str | os.PathLike[str]) -> fits.Header:
    """The primary header of a raw file (a copy, usable after the file is closed)."""
    with open_raw(path) as raw:
        return raw.primary_header.copy()
