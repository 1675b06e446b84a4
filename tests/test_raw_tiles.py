"""The tile-by-tile RICE decoder of the raw reader: bit-identical to astropy on raw-format files,
astropy for every layout it does not handle, and one-line errors on corrupt tiles."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from astropy.io import fits

from simhelpers import small_night
from streamer.formats import rice_tiles
from streamer.formats.raw import QuadrantReadError, open_raw


def astropy_hdus(path: Path) -> list[npt.NDArray[Any]]:
    with fits.open(path) as hdus:
        return [np.array(hdus[i].data) for i in range(1, len(hdus))]


def table_header(path: Path, index: int) -> fits.Header:
    with fits.open(path, disable_image_compression=True) as hdus:
        return hdus[index].header.copy()


@pytest.fixture(scope="module")
def simulated_raws(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("night")
    small_night(out, n_exposures=1, flats_per_led=1, n_biases=1)
    raws = sorted(out.rglob("*.fits.fz"))
    assert raws
    return raws


def test_simulated_raws_decode_bit_identical_to_astropy(simulated_raws: list[Path]) -> None:
    for path in simulated_raws:
        expected = astropy_hdus(path)
        for index in range(1, 9):
            assert rice_tiles.rice_layout(table_header(path, index)) is not None, "the raw layout is the one decoded by tile"
        with open_raw(path) as raw:
            for qid in (1, 2, 3, 4):
                quadrant = raw.quadrant(qid)
                for ours, theirs in ((quadrant.data, expected[qid - 1]), (quadrant.overscan, expected[qid + 3])):
                    assert ours.dtype == theirs.dtype == np.uint16
                    np.testing.assert_array_equal(ours, theirs)
                    assert not ours.flags.writeable
                rows = raw.data_rows(qid, 37, 130)
                np.testing.assert_array_equal(rows, expected[qid - 1][37:130])


@pytest.mark.parametrize(
    ("dtype", "tile_rows"), [(np.uint16, 1), (np.int16, 1), (np.uint16, 16), (np.int32, 7), (np.uint32, 1)]
)
def test_integer_layouts_match_astropy_in_threads_and_row_bands(tmp_path: Path, dtype: type, tile_rows: int) -> None:
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    values = np.clip(rng.normal(1000, 300, (101, 64)), info.min, info.max).astype(dtype)
    values[0, :4] = (info.min, info.max, 0, 1)  # the ends of the range survive the unsigned convention
    path = tmp_path / "raw.fits.fz"
    hdu = fits.CompImageHDU(values, compression_type="RICE_1", tile_shape=(tile_rows, 64))
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    layout = rice_tiles.rice_layout(table_header(path, 1))
    assert layout is not None and layout.tile_rows == tile_rows
    (expected,) = astropy_hdus(path)
    for threads in (1, 3):
        with open_raw(path, decode_threads=threads) as raw:
            decoded = raw.data(1)
            assert decoded.dtype == expected.dtype
            np.testing.assert_array_equal(decoded, expected)
            np.testing.assert_array_equal(decoded, values)
            for start, stop in ((0, 1), (5, 23), (15, 17), (90, 101)):
                np.testing.assert_array_equal(raw.data_rows(1, start, stop), expected[start:stop])


def astropy_file_bytes(primary: fits.Header, images: list[tuple[npt.NDArray[Any], fits.Header]]) -> bytes:
    """The file astropy's own writer makes of these images, each a RICE_1 ``CompImageHDU`` (the reference)."""
    compressed = [fits.CompImageHDU(values, header=header, compression_type="RICE_1") for values, header in images]
    hdus = fits.HDUList([fits.PrimaryHDU(header=primary), *compressed])
    buffer = io.BytesIO()
    hdus.writeto(buffer)
    return buffer.getvalue()


def test_the_simulators_raw_files_are_the_bytes_astropy_writes(simulated_raws: list[Path]) -> None:
    """The simulator writes its raws with :func:`rice_tiles.encode_image_hdu`: byte for byte what astropy
    writes for the same pixels and keywords."""
    for path in simulated_raws:
        with fits.open(path) as hdus:
            primary = hdus[0].header.copy()
            images = [(np.array(hdus[i].data), hdus[i].header.copy()) for i in range(1, len(hdus))]
        assert len(images) == 8
        expected = astropy_file_bytes(primary, images)
        assert path.read_bytes() == expected, path.name
        extensions = b"".join(rice_tiles.encode_image_hdu(values, header) for values, header in images)
        assert expected.endswith(extensions), "headers read from a file (NAXIS, BZERO...) give the same extensions"


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int32, np.uint32])
@pytest.mark.parametrize("shape", [(57, 64), (3, 1), (1, 200)])
def test_encoded_images_read_back_exactly_and_in_astropys_bytes(tmp_path: Path, dtype: type, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(5)
    info = np.iinfo(dtype)
    values = np.clip(rng.normal(1000, 3000, shape), info.min, info.max).astype(dtype)
    values.flat[:2] = (info.min, info.max)[: values.size]  # the ends of the range, a jump of the whole range
    if shape[0] > 2:
        values[1] = values[1, 0]  # a constant row: Rice blocks of code 0
        values[2] = rng.integers(info.min, info.max, shape[1], endpoint=True, dtype=dtype)  # noise: the raw blocks
    header = fits.Header([("EXTNAME", "7"), ("GAIN", 5.8, "Gain e-/adu")])
    ours = rice_tiles.encode_image_hdu(values, header)
    assert len(ours) % 2880 == 0
    path = tmp_path / "encoded.fits.fz"
    path.write_bytes(astropy_file_bytes(fits.Header(), []) + ours)  # behind a data-less primary HDU
    with fits.open(path) as hdus:
        assert hdus[1].name == "7" and hdus[1].header["GAIN"] == 5.8
        assert hdus[1].data.dtype == values.dtype
        np.testing.assert_array_equal(hdus[1].data, values)
    layout = rice_tiles.rice_layout(table_header(path, 1))
    assert layout is not None
    with open_raw(path) as raw:
        np.testing.assert_array_equal(raw.data(1), values)
    theirs = astropy_file_bytes(fits.Header(), [(values, header)])
    assert ours == theirs[len(theirs) - len(ours) :]


def test_encoding_refuses_what_the_layout_does_not_hold() -> None:
    for values in (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8), np.zeros(16, np.int16), np.zeros((0, 4), np.int16)):
        with pytest.raises(ValueError, match="expected a non-empty 2-d 16- or 32-bit integer array"):
            rice_tiles.encode_image_hdu(values, fits.Header())


def other_layouts(tmp_path: Path) -> dict[str, tuple[Path, npt.NDArray[Any]]]:
    """Files in layouts the tile decoder leaves to astropy, with the values written."""
    rng = np.random.default_rng(4)
    ints = rng.integers(0, 3000, (40, 32)).astype(np.int16)
    floats = rng.normal(100, 5, (40, 32)).astype(np.float32)
    cases: dict[str, tuple[fits.ImageHDU | fits.CompImageHDU, npt.NDArray[Any]]] = {
        "square tiles": (fits.CompImageHDU(ints, compression_type="RICE_1", tile_shape=(16, 16)), ints),
        "gzip": (fits.CompImageHDU(ints, compression_type="GZIP_1"), ints),
        "quantised floats": (fits.CompImageHDU(floats, compression_type="RICE_1", quantize_level=16.0), floats),
        "8-bit": (fits.CompImageHDU(ints.astype(np.uint8), compression_type="RICE_1"), ints.astype(np.uint8)),
        "uncompressed": (fits.ImageHDU(ints), ints),
    }
    files = {}
    for name, (hdu, values) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.fits"
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
        files[name] = (path, values)
    scaled = tmp_path / "scaled.fits"
    hdu = fits.CompImageHDU(ints.copy(), compression_type="RICE_1")  # scale() rewrites the array it holds
    hdu.scale("int16", bscale=2.0, bzero=10.0)
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(scaled)
    files["scaled (BSCALE 2)"] = (scaled, astropy_hdus(scaled)[0])
    return files


def test_other_layouts_are_read_by_astropy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tile decoder was used for a layout it does not handle")

    monkeypatch.setattr(rice_tiles, "decode_rows", refuse)
    for name, (path, values) in other_layouts(tmp_path).items():
        expected = astropy_hdus(path)[0]
        assert rice_tiles.rice_layout(table_header(path, 1)) is None, name
        with open_raw(path) as raw:
            decoded = raw.data(1)
            np.testing.assert_array_equal(decoded, expected, err_msg=name)
            if name != "quantised floats":
                np.testing.assert_array_equal(decoded, values, err_msg=name)
            np.testing.assert_array_equal(raw.data_rows(1, 3, 9), expected[3:9], err_msg=name)


def corrupted(tmp_path: Path, how: str) -> Path:
    """A one-HDU uint16 RICE file with tile 10's bytes, or its descriptor, or the file's end spoiled."""
    rng = np.random.default_rng(5)
    values = (200 + rng.normal(0, 6, (64, 96))).astype(np.uint16)
    path = tmp_path / f"{how}.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(values, compression_type="RICE_1")]).writeto(path)
    with fits.open(path, disable_image_compression=True) as hdus:
        start = hdus.fileinfo(1)["datLoc"]
        table_bytes = hdus[1].header["NAXIS1"] * hdus[1].header["NAXIS2"]
        heap_bytes = hdus[1].header["PCOUNT"]
    data = bytearray(path.read_bytes())
    count, offset = np.frombuffer(bytes(data[start:start + table_bytes]), ">i4").reshape(-1, 2)[10]
    if how == "tile":  # all ones: the coder reads uncompressed 16-bit differences and runs off the tile's end
        data[start + table_bytes + offset + 2 : start + table_bytes + offset + count] = b"\xff" * (count - 2)
    elif how == "zeros":  # all zeros: blocks of equal values; the code ends early, leaving bytes unused
        data[start + table_bytes + offset + 2 : start + table_bytes + offset + count] = b"\x00" * (count - 2)
    elif how == "descriptor":
        data[start + 10 * 8 : start + 11 * 8] = np.array([count, heap_bytes], ">i4").tobytes()
    else:  # truncated inside the heap
        data = data[: start + table_bytes + heap_bytes // 2]
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how", ["tile", "zeros", "descriptor", "truncated"])
def test_a_corrupt_tile_gives_a_one_line_quadrant_error(tmp_path: Path, how: str) -> None:
    path = corrupted(tmp_path, how)
    with pytest.raises(Exception):  # noqa: B017, PT011 (astropy's own classes): the file is corrupt for astropy too
        astropy_hdus(path)
    with open_raw(path) as raw, pytest.raises(QuadrantReadError, match="quadrant 1: HDU 1 \\(data\\) unreadable") as err:
        raw.data(1)
    assert "\n" not in str(err.value)
    if how in ("tile", "descriptor"):
        assert "tile 10" in str(err.value)
    if how == "zeros":  # the tile decodes, but does not end where its bytes do: astropy is asked, and refuses it
        assert "unused bytes" in str(err.value)
