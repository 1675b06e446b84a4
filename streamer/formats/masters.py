"""Master calibration files (bias, per-LED flat, flat): format, atomic writing, reading.

Format 2 (a valid FITS file, written here, read back by a small header scanner of our own so
that reading a quadrant costs little more than decompressing it):

- HDU 0: header only, provenance keywords: ``MKIND`` (bias | ledflat | flat), ``NIGHT``
  (YYYY-MM-DD), ``CCD_ID``, ``FILTER`` (flats), ``LEDS`` (comma-separated LED numbers used),
  ``NFRAMES`` and ``FRAMEnnn`` (the raw file names combined), ``NORMFACT`` (flats: the CCD-wide
  median the flat was divided by), ``LEVnn`` (flats: the CCD-wide median in ADU of LED nn's stack),
  ``WLEDnn`` (flat: the weight of LED nn), ``CFGHASH``, ``PKGVERS``, ``FORMAT`` (format version),
  and any further string provenance given by the caller (``HIERARCH`` keywords).
- For each quadrant q present: ``Q{q}_DATA``, ``Q{q}_VAR``, ``Q{q}_MASK``, each a 1-D byte image
  (BITPIX 8) holding the encoded plane; the quadrant's ``NFRAMES``, ``GAIN``, ``READNOI`` are in
  the data HDU's header. Every plane HDU has ``ZNAXIS1``/``ZNAXIS2`` (the plane's shape),
  ``CODEC``, ``CRC32`` (of its bytes), ``LENPLANE``, ``LENEXIDX``, ``LENEXVAL`` (the byte
  lengths of its three parts, in that order) and ``NEXCEPT``.
- Data and variance: integers ``u = rint(x / QSTEP) - QBASE`` in ``ZINTTYPE`` (uint8 or uint16,
  the narrower that holds all but the outer 0.1 % of each tail), read back as ``(u + QBASE) x QSTEP`` in float32; the
  ``NEXCEPT`` pixels outside that range or not finite are stored exactly (float32) at their flat
  indices. The parts: the integer plane, the index gaps (uint32), the exact values (float32).
- Mask (uint16, our bits, :mod:`streamer.detrend.masks`, all 16 usable): its nonzero pixels, as index gaps
  (uint32) and values (uint16); ``LENPLANE`` is 0.
- Each part is one blosc2 chunk (LZ4 with bit shuffle, one thread), except an integer plane that
  this saves less than a third of (``PLANECMP = 'none'``): that one is stored as it is and read in
  place, which saves its decompression (a quarter of a read) for at most 50 % more bytes
  (see BENCHMARKS.md, "Reading masters").

Quantisation, with the same steps as format 1 but without dither: rounding to the nearest step
adds an error uniform in +-step/2 (rms step / sqrt(12)), independent of the value as long as the
noise spans several steps, which the steps guarantee:

- data: step = 0.2 x the median per-pixel noise sqrt(variance); the error (rms 0.058 x noise)
  adds 0.17 % to the noise in quadrature;
- variance: step = 0.1 x its median (negative variances are stored as 0), an error of 2.9 % (rms)
  of the typical variance, far below the scatter of a variance estimated from a handful of frames
  (+-47 % for 10 frames).

Format 1 (Rice-compressed float images, quantised with subtractive dither) is still read, through
astropy, at its old cost; a format newer than this module knows is refused with one line.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, cast

import imagecodecs
import numba
import numpy as np
import numpy.typing as npt
from astropy.io import fits

from streamer.detrend.calibrate import MasterQuadrant
from streamer.detrend.selection import middle_values
from streamer.errors import StreamerError
from streamer.storage.atomic import write_atomically as write_durably

FORMAT_VERSION: Final = 2
READABLE_FORMATS: Final = (1, 2)
DATA_STEP_PER_NOISE: Final = 0.2
VARIANCE_STEP_PER_MEDIAN: Final = 0.1
CODEC: Final = "blosc2-lz4-bitshuffle"
MAX_PLANE_SIDE: Final = 1 << 15
"""Larger plane sides in a file are refused as corrupt (a ZTF quadrant is 3080 x 3072)."""
OUTLIER_PERCENT: Final = 0.1
"""The integer type is chosen to hold the values between these percentiles of each tail (of a sample)."""
MIN_COMPRESSION_RATIO: Final = 1.5
"""An integer plane whose compressed size is above 1 / this of its size is stored uncompressed."""
_BLOCK = 2880
_CARD = 80
_BLOSC: Final[dict[str, Any]] = {"compressor": "lz4", "level": 5, "shuffle": "bitshuffle", "numthreads": 1}
_INTEGER_TYPES: Final[dict[str, type[np.unsignedinteger[Any]]]] = {"uint8": np.uint8, "uint16": np.uint16}


class MasterReadError(StreamerError):
    """A master file, or one of its quadrants, is missing or unreadable."""


def extension_names(qid: int) -> tuple[str, str, str]:
    """EXTNAMEs of quadrant ``qid``'s data, variance and mask."""
    return (f"Q{qid}_DATA", f"Q{qid}_VAR", f"Q{qid}_MASK")


def quantisation_steps(data: npt.NDArray[np.floating], variance: npt.NDArray[np.floating]) -> tuple[float, float]:
    """(data step, variance step) for :func:`write_master`, from the median finite positive variance (as float32)."""
    middle = middle_values([np.asarray(variance, dtype=np.float32)], positive_only=True)
    typical = 0.0 if middle is None else float((middle[0] + middle[1]) / np.float32(2.0))  # as np.median in float32
    if not typical > 0:
        scale = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
        typical = (1e-6 * max(scale, 1e-6)) ** 2
    return DATA_STEP_PER_NOISE * math.sqrt(typical), VARIANCE_STEP_PER_MEDIAN * typical


# ----------------------------------------------------------------------------- writing


def _compress(array: npt.NDArray[Any]) -> bytes:
    # imagecodecs takes any buffer; its stubs say bytes
    return bytes(imagecodecs.blosc2_encode(cast(bytes, np.ascontiguousarray(array)), typesize=array.itemsize, **_BLOSC))


def _crc32(payload: bytes | memoryview) -> int:
    return int(imagecodecs.deflate_crc32(cast(bytes, payload)))


def _sparse_parts(flat_indices: npt.NDArray[np.intp], values: npt.NDArray[Any]) -> tuple[bytes, bytes]:
    """The compressed index gaps (uint32, the first from 0) and values of some pixels."""
    gaps = np.diff(flat_indices, prepend=0).astype(np.uint32)
    return _compress(gaps), _compress(values)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _finite_sample(plane: Any, step: float, every: int) -> Any:
    """The finite values of ``rint(x / step)`` (float64) of every ``every``-th pixel, in order: one
    pass, where numpy's formulation made five over the sample."""
    taken = (plane.size + every - 1) // every
    sample = np.empty(taken, dtype=np.float64)
    count = 0
    for i in range(taken):
        value = np.rint(np.float64(plane[i * every]) / step)
        if np.isfinite(value):
            sample[count] = value
            count += 1
    return sample[:count]


def _integer_range(plane: npt.NDArray[np.float32], step: float) -> tuple[str, int]:
    """(integer type, base) that hold the quantised values but for the outer ``OUTLIER_PERCENT`` of
    each tail (of every 7th pixel)."""
    sample = _finite_sample(plane.reshape(-1), float(step), 7)
    if sample.size == 0:
        return "uint8", 0
    low, high = (int(v) for v in np.percentile(sample, [OUTLIER_PERCENT, 100.0 - OUTLIER_PERCENT]))
    for name, top in (("uint8", 255), ("uint16", 65535)):
        if high - low <= top:
            # base 0 saves an addition per pixel on reading; else centre the slack on the bulk
            return name, 0 if low >= 0 and high <= top else low - (top - (high - low)) // 2
    return "uint16", low - (65535 - (high - low)) // 2


QUANTISE_CHUNK = 4096  # pixels whose exceptions are counted together in the first pass


@numba.njit(inline="always", error_model="numpy")
def _quantised(value: Any, step: float, offset: float, high: float) -> tuple[float, bool]:
    """``rint(value / step) - offset`` and whether it is an integer of [0, high] (NaN and
    infinities fail both comparisons)."""
    q = np.rint(np.float64(value) / step) - offset
    return q, bool((q >= 0.0) & (q <= high))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _quantise(plane: Any, step: float, base: int, top: int, integers: Any, exceptions: Any) -> int:
    """``rint(x / step) - base`` of each pixel into ``integers``; the flat index of each pixel whose
    value is not finite or falls outside [0, top] into ``exceptions`` (its integer: 0). Returns
    how many there are. The first pass writes the integers and counts the exceptions of each
    chunk (a loop that vectorises); the second lists them, in the chunks that have any."""
    size = plane.size
    chunks = (size + QUANTISE_CHUNK - 1) // QUANTISE_CHUNK
    outside = np.zeros(chunks, dtype=np.int64)
    offset = np.float64(base)
    high = np.float64(top)
    for chunk in range(chunks):
        n = 0
        for k in range(np.uint64(chunk * QUANTISE_CHUNK), np.uint64(min((chunk + 1) * QUANTISE_CHUNK, size))):
            q, inside = _quantised(plane[k], step, offset, high)
            integers[k] = q if inside else 0.0
            n += not inside
        outside[chunk] = n
    count = 0
    for chunk in range(chunks):
        if outside[chunk] == 0:
            continue
        for k in range(chunk * QUANTISE_CHUNK, min((chunk + 1) * QUANTISE_CHUNK, size)):
            if not _quantised(plane[k], step, offset, high)[1]:
                exceptions[count] = k
                count += 1
    return count


def _encode_values(values: npt.NDArray[np.floating], step: float) -> tuple[dict[str, Any], bytes]:
    """Header cards and bytes of one quantised plane (format above)."""
    plane = np.ascontiguousarray(values, dtype=np.float32)
    type_name, base = _integer_range(plane, step)
    integer_type = _INTEGER_TYPES[type_name]
    integers = np.empty(plane.shape, dtype=integer_type)
    found = np.empty(plane.size, dtype=np.int64)  # untouched beyond the (few) exceptions: no memory
    count = _quantise(plane.reshape(-1), float(step), int(base), int(np.iinfo(integer_type).max), integers.reshape(-1), found)
    exceptions = found[:count].copy()
    del found
    compressed = _compress(integers)
    stored = compressed if len(compressed) * MIN_COMPRESSION_RATIO <= integers.nbytes else integers.tobytes()
    parts = (stored, *_sparse_parts(exceptions, plane.reshape(-1)[exceptions]))
    cards = {"ZINTTYPE": type_name, "PLANECMP": "blosc2" if stored is compressed else "none", "QSTEP": step, "QBASE": base,
             "NEXCEPT": int(exceptions.size)}  # fmt: skip
    return cards, _joined(cards, plane.shape, parts)


def _encode_mask(mask: npt.NDArray[np.integer]) -> tuple[dict[str, Any], bytes]:
    """Header cards and bytes of a mask plane: its nonzero pixels only."""
    array = np.asarray(mask)
    if array.size and (int(array.min()) < 0 or int(array.max()) > 65535):
        raise ValueError(f"mask values {int(array.min())}..{int(array.max())} do not fit 16 bits")
    flat = array.reshape(-1)
    nonzero = np.flatnonzero(flat)
    cards: dict[str, Any] = {"NEXCEPT": int(nonzero.size)}
    return cards, _joined(cards, array.shape, (b"", *_sparse_parts(nonzero, flat[nonzero].astype(np.uint16))))


def _joined(cards: dict[str, Any], shape: tuple[int, ...], parts: tuple[bytes, bytes, bytes]) -> bytes:
    """Add the layout cards of ``parts`` to ``cards``; return the parts concatenated."""
    payload = b"".join(parts)
    cards.update(
        ZNAXIS1=int(shape[1]), ZNAXIS2=int(shape[0]), CODEC=CODEC, CRC32=_crc32(payload),
        LENPLANE=len(parts[0]), LENEXIDX=len(parts[1]), LENEXVAL=len(parts[2]),
    )  # fmt: skip
    return payload


def _plane_hdu(name: str, cards: Mapping[str, Any], payload: bytes, header: fits.Header | None = None) -> fits.ImageHDU:
    hdu = fits.ImageHDU(np.frombuffer(payload, dtype=np.uint8), header=header, name=name)
    for key, value in cards.items():
        hdu.header[key] = value
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
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [primary]
    for qid in sorted(quadrants):
        data, variance, mask = quadrants[qid]
        if not data.shape == variance.shape == mask.shape or len(data.shape) != 2:
            raise ValueError(f"quadrant {qid}: data {data.shape}, variance {variance.shape}, mask {mask.shape} differ or are not 2-D")
        data_step, variance_step = quantisation_steps(data, variance)
        header = fits.Header()
        for key, card in (quadrant_cards or {}).get(qid, {}).items():
            if card is not None:
                header[key] = card
        names = extension_names(qid)
        hdus.append(_plane_hdu(names[0], *_encode_values(data, data_step), header))
        hdus.append(_plane_hdu(names[1], *_encode_values(np.maximum(variance, 0.0), variance_step)))
        hdus.append(_plane_hdu(names[2], *_encode_mask(mask)))
    return write_atomically(fits.HDUList(hdus), path)


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Extension:
    """One HDU of a format-2 file: its header values and where its data lie."""

    cards: dict[str, Any]
    start: int
    length: int


def _card_value(text: bytes) -> Any:
    """The value of a FITS card (the bytes after ``= ``): str, bool, int or float."""
    text = text.strip()
    if text.startswith(b"'"):
        end = 1
        while True:
            end = text.index(b"'", end)
            if text[end + 1 : end + 2] != b"'":
                return text[1:end].replace(b"''", b"'").decode("ascii").rstrip()
            end += 2
    token = text.split(b"/", 1)[0].strip()
    if token in (b"T", b"F"):
        return token == b"T"
    try:
        return int(token)
    except ValueError:
        return float(token.replace(b"D", b"E"))


def _header(view: memoryview, offset: int, wanted: frozenset[str] | None) -> tuple[dict[str, Any], int]:
    """Values of the wanted keys (all when None) of the header at ``offset``, and the offset after it."""
    cards: dict[str, Any] = {}
    position = offset
    while True:
        if position + _BLOCK > len(view):
            raise MasterReadError("truncated inside a header")
        block = bytes(view[position : position + _BLOCK])
        position += _BLOCK
        for start in range(0, _BLOCK, _CARD):
            key = block[start : start + 8].rstrip().decode("ascii", "replace")
            if key == "END":
                return cards, position
            if block[start + 8 : start + 10] == b"= " and (wanted is None or key in wanted or key.startswith("NAXIS")):
                cards[key] = _card_value(block[start + 10 : start + _CARD])


_LAYOUT_KEYS: Final = frozenset({"FORMAT", "EXTNAME", "BITPIX", "PCOUNT", "GCOUNT"})
_PLANE_KEYS: Final = frozenset(
    {"ZNAXIS1", "ZNAXIS2", "ZINTTYPE", "PLANECMP", "QSTEP", "QBASE", "NEXCEPT", "CRC32", "LENPLANE", "LENEXIDX", "LENEXVAL", "CODEC"}
)


def _scan(view: memoryview) -> tuple[int, dict[str, _Extension]]:
    """(format version, extensions by EXTNAME) of a master file; format-1 files stop after the primary."""
    primary, position = _header(view, 0, _LAYOUT_KEYS)
    version = primary.get("FORMAT")
    if not isinstance(version, int):
        raise MasterReadError("not a master file (no FORMAT in its primary header)")
    if version not in READABLE_FORMATS:
        raise MasterReadError(f"master format {version}; this version reads formats {', '.join(map(str, READABLE_FORMATS))}")
    if version == 1:
        return version, {}
    extensions: dict[str, _Extension] = {}
    position += _data_bytes(primary)
    while position < len(view):
        cards, start = _header(view, position, _LAYOUT_KEYS | _PLANE_KEYS)
        length = _data_bytes(cards)
        if start + length > len(view):
            raise MasterReadError(f"truncated: {cards.get('EXTNAME', 'an HDU')} needs {start + length} bytes, the file has {len(view)}")
        extensions[str(cards.get("EXTNAME", ""))] = _Extension(cards, start, length)
        position = start + -(-length // _BLOCK) * _BLOCK
    return version, extensions


def _data_bytes(cards: Mapping[str, Any]) -> int:
    """Size in bytes of an HDU's data (FITS standard, section 4.4.1), without padding."""
    axes = [int(cards[f"NAXIS{i}"]) for i in range(1, int(cards.get("NAXIS", 0)) + 1)]
    if not axes:
        return 0
    return abs(int(cards["BITPIX"])) // 8 * int(cards.get("GCOUNT", 1)) * (int(cards.get("PCOUNT", 0)) + math.prod(axes))


def _decompress_into(part: memoryview, out: npt.NDArray[Any]) -> None:
    written = imagecodecs.blosc2_decode(cast(bytes, part), numthreads=1, out=cast(memoryview, out.reshape(-1).view(np.uint8)))
    if len(written) != out.nbytes:
        raise MasterReadError(f"a part decodes to {len(written)} bytes, {out.nbytes} expected")


def _sparse(
    part_gaps: memoryview, part_values: memoryview, count: int, dtype: type[np.generic], size: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[Any]]:
    """Flat indices and values of the ``count`` pixels stored one by one."""
    gaps = np.empty(count, np.uint32)
    values: npt.NDArray[Any] = np.empty(count, dtype)
    if count:
        _decompress_into(part_gaps, gaps)
        _decompress_into(part_values, values)
    indices = np.cumsum(gaps, dtype=np.int64)
    if count and indices[-1] >= size:
        raise MasterReadError(f"a stored pixel index {int(indices[-1])} lies outside the plane of {size} pixels")
    return indices, values


def _plane(view: memoryview, extension: _Extension, name: str) -> tuple[dict[str, Any], memoryview, memoryview, memoryview]:
    """The cards and the three parts of a plane HDU, after checking its size and CRC32."""
    cards = extension.cards
    try:
        lengths = [int(cards[key]) for key in ("LENPLANE", "LENEXIDX", "LENEXVAL")]
        height, width, count, crc = int(cards["ZNAXIS2"]), int(cards["ZNAXIS1"]), int(cards["NEXCEPT"]), int(cards["CRC32"])
    except (KeyError, TypeError, ValueError) as err:
        raise MasterReadError(f"{name}: a layout card is missing or malformed ({err})") from None
    if sum(lengths) != extension.length or not (0 < height <= MAX_PLANE_SIDE and 0 < width <= MAX_PLANE_SIDE) or not 0 <= count <= height * width:
        raise MasterReadError(f"{name}: layout cards disagree with its size")
    payload = view[extension.start : extension.start + extension.length]
    if _crc32(payload) != crc:
        raise MasterReadError(f"{name}: corrupt (its bytes fail their CRC32)")
    first, second = lengths[0], lengths[0] + lengths[1]
    return cards, payload[:first], payload[first:second], payload[second:]


def _read_values(view: memoryview, extension: _Extension, name: str) -> npt.NDArray[np.float32]:
    """A quantised plane as float32 (format above)."""
    cards, integers_part, gaps_part, values_part = _plane(view, extension, name)
    shape = (int(cards["ZNAXIS2"]), int(cards["ZNAXIS1"]))
    integer_type = _INTEGER_TYPES.get(str(cards.get("ZINTTYPE")))
    if integer_type is None:
        raise MasterReadError(f"{name}: ZINTTYPE {cards.get('ZINTTYPE')!r}, expected one of {', '.join(_INTEGER_TYPES)}")
    if cards.get("PLANECMP") == "none":
        if len(integers_part) != math.prod(shape) * np.dtype(integer_type).itemsize:
            raise MasterReadError(f"{name}: its plane holds {len(integers_part)} bytes, not {shape[0]} x {shape[1]} {cards['ZINTTYPE']}")
        integers = np.frombuffer(integers_part, integer_type).reshape(shape)
    else:
        integers = np.empty(shape, integer_type)
        _decompress_into(integers_part, integers)
    step, base = float(cards["QSTEP"]), int(cards["QBASE"])
    out = np.multiply(integers, np.float32(step), dtype=np.float32)
    del integers  # a view of the file's map when stored uncompressed
    if base:
        out += np.float32(base * step)
    indices, values = _sparse(gaps_part, values_part, int(cards["NEXCEPT"]), np.float32, out.size)
    out.reshape(-1)[indices] = values
    return out


def _read_mask(view: memoryview, extension: _Extension, name: str) -> npt.NDArray[np.uint16]:
    cards, _, gaps_part, values_part = _plane(view, extension, name)
    mask = np.zeros((int(cards["ZNAXIS2"]), int(cards["ZNAXIS1"])), np.uint16)
    indices, values = _sparse(gaps_part, values_part, int(cards["NEXCEPT"]), np.uint16, mask.size)
    mask.reshape(-1)[indices] = values
    return mask


def _read_quadrant(view: memoryview, extensions: Mapping[str, _Extension], qid: int) -> MasterQuadrant:
    names = extension_names(qid)
    if names[0] not in extensions:
        raise MasterReadError(f"no quadrant {qid} in this master")
    missing = [name for name in names if name not in extensions]
    if missing:
        raise MasterReadError(f"quadrant {qid} lacks {', '.join(missing)}")
    quadrant = MasterQuadrant(
        _read_values(view, extensions[names[0]], names[0]),
        _read_values(view, extensions[names[1]], names[1]),
        _read_mask(view, extensions[names[2]], names[2]),
    )
    if not quadrant.data.shape == quadrant.variance.shape == quadrant.mask.shape:
        raise MasterReadError(f"quadrant {qid}: its planes differ in shape")
    return quadrant


def _open_view(name: str) -> tuple[BinaryIO, mmap.mmap | None]:
    """(open file, read-only map of it or None when the file is empty)."""
    handle = open(name, "rb")  # noqa: SIM115 - closed by the caller
    if os.fstat(handle.fileno()).st_size == 0:
        return handle, None
    return handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def read_master(path: str | os.PathLike[str], qid: int) -> MasterQuadrant:
    """Quadrant ``qid`` of a master file: (data float32, variance float32, mask uint16), new arrays."""
    name = os.fspath(path)
    try:
        handle, mapped = _open_view(name)
    except FileNotFoundError:
        raise MasterReadError(f"{name}: no such master file") from None
    except OSError as err:
        raise MasterReadError(f"{name}: unreadable master file: {err.strerror or err}") from None
    view = memoryview(mapped) if mapped is not None else None
    try:
        if view is None:
            raise MasterReadError("empty file")
        version, extensions = _scan(view)
        if version == 2:
            return _read_quadrant(view, extensions, qid)
    except MasterReadError as err:
        raise MasterReadError(f"{name}: {err}") from None
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, UnicodeDecodeError) as err:
        raise MasterReadError(f"{name}: quadrant {qid} unreadable: {_one_line(err)}") from None
    finally:
        # on an error path the traceback may still hold views of the map: then it closes when collected
        with contextlib.suppress(BufferError):
            if view is not None:
                view.release()
            if mapped is not None:
                mapped.close()
        handle.close()
    return _read_master_format1(name, qid)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _read_master_format1(name: str, qid: int) -> MasterQuadrant:
    """Quadrant ``qid`` of a format-1 master (Rice-compressed, dithered floats), through astropy."""
    data_name, variance_name, mask_name = extension_names(qid)
    try:
        with fits.open(name, memmap=False) as hdul:
            if data_name not in {hdu.name for hdu in hdul}:
                raise MasterReadError(f"{name}: no quadrant {qid} in this master")
            data = np.array(hdul[data_name].data, dtype=np.float32)
            variance = np.array(hdul[variance_name].data, dtype=np.float32)
            np.maximum(variance, 0.0, out=variance)  # dithered quantisation can dip just below 0
            mask = np.array(hdul[mask_name].data).astype(np.uint16)
    except MasterReadError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MasterReadError(f"{name}: quadrant {qid} unreadable: {_one_line(err)}") from None
    return MasterQuadrant(data, variance, mask)


def read_master_header(path: str | os.PathLike[str]) -> fits.Header:
    """The primary (provenance) header of a master file."""
    try:
        with fits.open(os.fspath(path), memmap=False) as hdul:
            return hdul[0].header.copy()
    except FileNotFoundError:
        raise MasterReadError(f"{os.fspath(path)}: no such master file") from None
    except (OSError, ValueError, IndexError) as err:
        raise MasterReadError(f"{os.fspath(path)}: unreadable master file: {_one_line(err)}") from None


def master_quadrants(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """The quadrants present in a master file."""
    try:
        with fits.open(os.fspath(path), memmap=False) as hdul:
            names = {hdu.name for hdu in hdul}
    except FileNotFoundError:
        raise MasterReadError(f"{os.fspath(path)}: no such master file") from None
    except (OSError, ValueError, IndexError) as err:
        raise MasterReadError(f"{os.fspath(path)}: unreadable master file: {_one_line(err)}") from None
    return tuple(q for q in (1, 2, 3, 4) if extension_names(q)[0] in names)


def read_master_quadrant_header(path: str | os.PathLike[str], qid: int) -> fits.Header:
    """The header of quadrant ``qid``'s data HDU (NFRAMES, GAIN, READNOI, QSTEP)."""
    name = os.fspath(path)
    try:
        with fits.open(name, memmap=False) as hdul:
            return hdul[extension_names(qid)[0]].header.copy()
    except KeyError:
        raise MasterReadError(f"{name}: no quadrant {qid} in this master") from None
    except FileNotFoundError:
        raise MasterReadError(f"{name}: no such master file") from None
    except (OSError, ValueError, IndexError) as err:
        raise MasterReadError(f"{name}: unreadable master file: {_one_line(err)}") from None
