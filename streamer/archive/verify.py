"""Cheap structural checks of downloaded FITS files, without decompressing anything.

A file passes when it is a whole number of 2880-byte blocks, starts with
``SIMPLE  =``, every HDU header parses up to its END card, the data sizes the
headers declare add up exactly to the file, the HDUs are the ones expected for
its kind (raw: 9 HDUs, a header-only primary and 8 tile-compressed or plain 2-D
images; mask: one int16 image), and, where an HDU carries ``CHECKSUM`` or
``DATASUM``, the ones-complement sums match.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np

BLOCK: Final = 2880
CARD: Final = 80
_CHUNK: Final = 1 << 20  # bytes summed at a time (a multiple of 4 and of BLOCK would not matter)
_END_CARD: Final = b"END" + b" " * 77


class VerificationError(ValueError):
    """A file that is not the complete FITS file it should be."""


@dataclass(frozen=True)
class HDUInfo:
    """What a header declares: where it starts, its data size and its image shape."""

    offset: int
    header_bytes: int
    data_bytes: int
    cards: dict[str, str] = field(repr=False)

    @property
    def is_compressed_image(self) -> bool:
        return self.cards.get("ZIMAGE", "").strip() == "T"

    @property
    def image_bitpix(self) -> int:
        key = "ZBITPIX" if self.is_compressed_image else "BITPIX"
        return _int_card(self.cards, key, f"HDU at byte {self.offset}")

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The (uncompressed) image shape in numpy order, () for no image; VerificationError if the cards are not integers."""
        prefix = "ZNAXIS" if self.is_compressed_image else "NAXIS"
        if self.cards.get("XTENSION", "").strip("' ") == "BINTABLE" and not self.is_compressed_image:
            return ()
        where = f"HDU at byte {self.offset}"
        naxis = _int_card(self.cards, prefix, where) if prefix in self.cards else 0
        if not 0 <= naxis <= 999:
            raise VerificationError(f"{where}: {prefix} = {naxis}")
        return tuple(_int_card(self.cards, f"{prefix}{i}", where) for i in range(naxis, 0, -1))


def header_end(data: bytes | bytearray | memoryview) -> int | None:
    """Byte length of the first header in ``data`` (a multiple of 2880), or None if END is not there yet."""
    view = memoryview(data)
    for start in range(0, len(view) - len(view) % BLOCK, BLOCK):
        block = bytes(view[start : start + BLOCK])
        for pos in range(0, BLOCK, CARD):
            if block[pos : pos + 3] == b"END" and block[pos : pos + CARD] == _END_CARD:
                return start + BLOCK
    return None


def parse_cards(header: bytes) -> dict[str, str]:
    """Keyword -> raw value text (comment stripped) of the cards of one header; strict on structure."""
    if len(header) % BLOCK:
        raise VerificationError(f"header of {len(header)} bytes: not a multiple of {BLOCK}")
    cards: dict[str, str] = {}
    for pos in range(0, len(header), CARD):
        card = header[pos : pos + CARD]
        try:
            text = card.decode("ascii")
        except UnicodeDecodeError:
            raise VerificationError(f"header card at byte {pos}: not ASCII") from None
        key = text[:8].rstrip()
        if key == "END":
            return cards
        if text[8:10] != "= " or not key:
            continue  # COMMENT, HISTORY, blank or CONTINUE cards carry no structure
        if not re.fullmatch(r"[A-Z0-9_-]{1,8}", key):
            raise VerificationError(f"header card at byte {pos}: keyword {key!r} is not a FITS keyword")
        cards.setdefault(key, _value_text(text[10:]))
    raise VerificationError("header without an END card")


def _value_text(text: str) -> str:
    text = text.strip()
    if text.startswith("'"):
        end = text.find("'", 1)
        while end != -1 and text[end + 1 : end + 2] == "'":
            end = text.find("'", end + 2)
        return text[: end + 1] if end != -1 else text
    return text.split("/", 1)[0].strip()


def _int_card(cards: dict[str, str], key: str, where: str) -> int:
    """The integer value of a card: ASCII digits with an optional sign (not Python's ``1_0`` or ``0x10``)."""
    if key not in cards:
        raise VerificationError(f"{where}: no {key} keyword")
    text = cards[key]
    if not re.fullmatch(r"[+-]?[0-9]{1,20}", text):
        raise VerificationError(f"{where}: {key} = {text[:30]!r} is not an integer")
    return int(text)


def data_size(cards: dict[str, str], where: str) -> int:
    """Bytes of data (before padding) that a header declares: |BITPIX|/8 * GCOUNT * (PCOUNT + prod NAXISn)."""
    bitpix = _int_card(cards, "BITPIX", where)
    if bitpix not in (8, 16, 32, 64, -32, -64):
        raise VerificationError(f"{where}: BITPIX = {bitpix} is not a FITS BITPIX")
    naxis = _int_card(cards, "NAXIS", where)
    if not 0 <= naxis <= 999:
        raise VerificationError(f"{where}: NAXIS = {naxis}")
    if naxis == 0:
        return 0
    n = 1
    for i in range(1, naxis + 1):
        axis = _int_card(cards, f"NAXIS{i}", where)
        if axis < 0:
            raise VerificationError(f"{where}: NAXIS{i} = {axis}")
        n *= axis
    pcount = _int_card(cards, "PCOUNT", where) if "PCOUNT" in cards else 0
    gcount = _int_card(cards, "GCOUNT", where) if "GCOUNT" in cards else 1
    if pcount < 0 or gcount < 0:
        raise VerificationError(f"{where}: PCOUNT = {pcount}, GCOUNT = {gcount}")
    return abs(bitpix) // 8 * gcount * (pcount + n)


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def walk_hdus(handle: BinaryIO, file_size: int) -> list[HDUInfo]:
    """Parse every header of a FITS file and check that the declared sizes tile the file exactly."""
    hdus: list[HDUInfo] = []
    offset = 0
    while offset < file_size:
        where = f"HDU {len(hdus)} at byte {offset}"
        handle.seek(offset)
        header = bytearray()
        end: int | None = None
        while end is None:
            block = handle.read(BLOCK)
            if len(block) < BLOCK:
                raise VerificationError(f"{where}: the file ends inside the header (no END card)")
            if not header and not hdus and block[:10] != b"SIMPLE  = ":
                raise VerificationError("does not start with 'SIMPLE  =': not a FITS file")
            header += block
            tail = header_end(block)
            if tail is not None:
                end = len(header)
        first = bytes(header[:10])
        if hdus and first != b"XTENSION= ":
            raise VerificationError(f"{where}: expected an XTENSION header, found {first!r}")
        cards = parse_cards(bytes(header))
        nbytes = data_size(cards, where)
        hdus.append(HDUInfo(offset, len(header), nbytes, cards))
        offset += len(header) + _padded(nbytes)
        if offset > file_size:
            raise VerificationError(
                f"{where}: headers declare {offset} bytes but the file has {file_size} (truncated)"
            )
    if not hdus:
        raise VerificationError("empty file")
    return hdus


def ones_complement_sum(chunks: Iterator[bytes], initial: int = 0) -> int:
    """The FITS 32-bit ones-complement checksum of big-endian words (chunk lengths multiples of 4)."""
    total = initial
    for chunk in chunks:
        words = np.frombuffer(chunk, dtype=">u4")
        total += int(words.sum(dtype=np.uint64))
        total = (total & 0xFFFFFFFF) + (total >> 32)
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


def _read_range(handle: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    handle.seek(start)
    left = length
    while left > 0:
        chunk = handle.read(min(_CHUNK, left))
        if not chunk:
            raise VerificationError(f"unexpected end of file at byte {start + length - left}")
        left -= len(chunk)
        yield chunk


def check_checksums(handle: BinaryIO, hdu: HDUInfo, index: int) -> None:
    """Check DATASUM and CHECKSUM of one HDU where present (FITS checksum convention)."""
    if "DATASUM" not in hdu.cards and "CHECKSUM" not in hdu.cards:
        return
    data_sum = ones_complement_sum(_read_range(handle, hdu.offset + hdu.header_bytes, _padded(hdu.data_bytes)))
    if "DATASUM" in hdu.cards:
        declared = hdu.cards["DATASUM"].strip("' ")
        if declared and not re.fullmatch(r"[0-9]{1,10}", declared):
            raise VerificationError(f"HDU {index}: DATASUM = {declared[:30]!r} is not an unsigned integer")
        if declared and int(declared) != data_sum:
            raise VerificationError(f"HDU {index}: DATASUM {declared} but the data sum to {data_sum}")
    if "CHECKSUM" in hdu.cards:
        total = ones_complement_sum(_read_range(handle, hdu.offset, hdu.header_bytes), data_sum)
        if total != 0xFFFFFFFF:
            raise VerificationError(f"HDU {index}: CHECKSUM does not match the header and data")


def _check_image(hdu: HDUInfo, index: int, *, ndim: int = 2) -> tuple[int, ...]:
    shape = hdu.image_shape
    if len(shape) != ndim or min(shape, default=0) <= 0:
        raise VerificationError(f"HDU {index}: expected a {ndim}-D image, found shape {shape}")
    return shape


def check_raw(hdus: list[HDUInfo], expected_shape: tuple[int, int] | None = None) -> None:
    """A raw CCD file: header-only primary, quadrants 1-4 (same shape), overscans 5-8 (same rows)."""
    if len(hdus) != 9:
        raise VerificationError(f"raw CCD file with {len(hdus)} HDUs: expected 9 (primary, 4 quadrants, 4 overscans)")
    if hdus[0].data_bytes:
        raise VerificationError("raw CCD file: the primary HDU holds data, expected a header only")
    shapes = [_check_image(h, i) for i, h in enumerate(hdus) if i > 0]
    quadrant = shapes[0]
    if expected_shape is not None and quadrant != expected_shape:
        raise VerificationError(f"raw CCD file: quadrant shape {quadrant}, expected {expected_shape}")
    for i, shape in enumerate(shapes[:4], start=1):
        if shape != quadrant:
            raise VerificationError(f"HDU {i}: quadrant shape {shape}, HDU 1 has {quadrant}")
    for i, shape in enumerate(shapes[4:], start=5):
        if shape[0] != quadrant[0]:
            raise VerificationError(f"HDU {i}: overscan with {shape[0]} rows, quadrants have {quadrant[0]}")


def check_mask(hdus: list[HDUInfo], expected_shape: tuple[int, int] | None = None) -> None:
    """A mask: one int16 image, plain in the primary HDU or tile-compressed in HDU 1."""
    images = [(i, h) for i, h in enumerate(hdus) if h.data_bytes]
    if len(images) != 1:
        raise VerificationError(f"mask file with {len(images)} data HDUs: expected one int16 image")
    index, hdu = images[0]
    shape = _check_image(hdu, index)
    if hdu.image_bitpix != 16:
        raise VerificationError(f"mask HDU {index}: BITPIX {hdu.image_bitpix}, expected 16 (int16)")
    if expected_shape is not None and shape != expected_shape:
        raise VerificationError(f"mask HDU {index}: shape {shape}, expected {expected_shape}")


def check_image(hdus: list[HDUInfo], expected_shape: tuple[int, int] | None = None) -> None:
    """A science image: one 2-D image in the primary HDU."""
    shape = _check_image(hdus[0], 0)
    if expected_shape is not None and shape != expected_shape:
        raise VerificationError(f"image shape {shape}, expected {expected_shape}")


def check_header_only(hdus: list[HDUInfo], expected_shape: tuple[int, int] | None = None) -> None:
    """A stored header: one primary HDU without data."""
    if len(hdus) != 1 or hdus[0].data_bytes:
        raise VerificationError("header file: expected a single header-only HDU")


_CHECKS: Final = {
    "raw": check_raw,
    "mskimg": check_mask,
    "sciimg": check_image,
    "sciimg_header": check_header_only,
}


def verify_fits(path: Path, kind: str, *, expected_size: int | None = None, expected_shape: tuple[int, int] | None = None) -> list[HDUInfo]:
    """Check a complete FITS file of a given kind; raise VerificationError saying what is wrong."""
    size = os.stat(path).st_size
    if expected_size is not None and size != expected_size:
        raise VerificationError(f"{size} bytes, expected {expected_size}")
    if size == 0 or size % BLOCK:
        raise VerificationError(f"{size} bytes: not a positive multiple of {BLOCK}")
    with open(path, "rb") as handle:
        hdus = walk_hdus(handle, size)
        check = _CHECKS.get(kind)
        if check is not None:
            check(hdus, expected_shape)
        for index, hdu in enumerate(hdus):
            check_checksums(handle, hdu, index)
    return hdus
