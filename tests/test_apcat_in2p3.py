"""The IN2P3-layout catalogue of one quadrant, read the way the IN2P3 code reads it (tests/in2p3_reader.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from in2p3_reader import apcat_path, in2p3_columns, in2p3_dtypes
from streamer.config import load_config
from streamer.errors import ConfigError
from streamer.formats.apcat import QuadrantRows, in2p3_quadrant_table, write_apcat
from streamer.photometry import FLAG_EDGE, FLAG_MASKED, Apertures
from streamer.storage.naming import RawName
from streamer.storage.paths import apcat_relpaths, in2p3_apcat_relpath, is_quadrant_product, kind_of

RADII = (3.0, 5.0, 8.0)
SHAPE = (3080, 3072)


def quadrant() -> QuadrantRows:
    rng = np.random.default_rng(11)
    n = 6
    flux = rng.uniform(100.0, 1e5, (n, len(RADII)))
    flags = np.zeros((n, len(RADII)), np.int32)
    flags[1, 2] = FLAG_MASKED  # only the largest aperture of source 1 touches a rejected pixel
    flags[2, :] = FLAG_MASKED | 16  # every aperture of source 2 does, and sep says truncated (APER_TRUNC)
    flags[3, 0] = FLAG_EDGE  # our own edge flag: not a sep flag, not in the IN2P3 file
    return QuadrantRows(
        qid=3,
        source_id=np.array([50, 10, 40, 20, 60, 30], np.int64),
        ra=rng.uniform(57.0, 58.0, n),
        dec=rng.uniform(35.0, 36.0, n),
        mags={m: rng.uniform(12, 18, n).astype(np.float32) for m in ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag")},
        x=np.array([0.0, 3071.0, 10.25, 1535.5, 2000.75, 7.0]),
        y=np.array([0.0, 3079.0, 20.5, 1539.5, 100.125, 3000.0]),
        isolated=np.array([True, False, True, True, False, True]),
        apertures=Apertures(flux, flux * 0.01, flags, np.where(flags.any(axis=1), 4, 0).astype(np.int32)),
        ipac_mask=True,
        wcs_from_qid=3,
    )


def test_the_in2p3_reader_finds_our_file_where_it_looks() -> None:
    raw = RawName("20200924431759", 655, "zr", 13, "o")
    for qid in (1, 2, 3, 4):
        relpath = in2p3_apcat_relpath(raw, qid)
        assert "/ztfdata/" + relpath == apcat_path("/ztfdata", "ztf_20200924431759_000655_zr_c13_o.fits.fz", qid)
        assert kind_of(relpath) == "apcat" and is_quadrant_product(relpath)
    assert in2p3_apcat_relpath(raw, 3) == (
        "ztfin2p3/sci/2020/0924/431759/ztfin2p3_20200924431759_000655_zr_c13_o_q3_apcat.parquet"
    )  # the form the issue states, which the source agrees with
    assert apcat_relpaths(raw, "in2p3") == tuple(in2p3_apcat_relpath(raw, q) for q in (1, 2, 3, 4))
    assert apcat_relpaths(raw, "streamer") == ("apcat/2020/0924/ztf_20200924431759_000655_zr_c13_o_apcat.parquet",)
    assert not is_quadrant_product(apcat_relpaths(raw, "streamer")[0])


def test_columns_order_dtypes_orientation_and_the_nan_rule(tmp_path: Path) -> None:
    rows = quadrant()
    path = write_apcat(tmp_path / "q3.parquet", in2p3_quadrant_table(rows, RADII, SHAPE), RADII, {"config_hash": "t"})
    table = pq.read_table(path)
    assert table.column_names == in2p3_columns(len(RADII))
    read = {name: table[name].to_numpy(zero_copy_only=False) for name in in2p3_columns(len(RADII))}
    assert {name: values.dtype for name, values in read.items()} == in2p3_dtypes(len(RADII))
    order = np.argsort(rows.source_id)
    np.testing.assert_array_equal(read["source_id"], rows.source_id[order])
    # ztfimg orientation: x' = 3071 - x, y' = 3079 - y; back on our grid up to float32 rounding
    np.testing.assert_allclose(3071 - read["x"].astype(np.float64), rows.x[order], atol=2e-4)
    np.testing.assert_allclose(3079 - read["y"].astype(np.float64), rows.y[order], atol=2e-4)
    assert read["x"][0] == 3071 - 3071.0 and read["y"][0] == 0.0  # source 10 sits at our (3071, 3079)
    np.testing.assert_array_equal(read["ra"], rows.ra[order].astype(np.float32))
    masked = (rows.apertures.flags[order] & FLAG_MASKED) != 0
    for k, radius in enumerate(RADII):
        flux = read[f"f_{k}"]
        assert np.array_equal(np.isnan(flux), masked[:, k])
        np.testing.assert_array_equal(flux[~masked[:, k]], rows.apertures.flux[order][~masked[:, k], k].astype(np.float32))
        assert np.all(np.isfinite(read[f"f_{k}_e"]))
        np.testing.assert_array_equal(read[f"r_{k}"], np.full(6, int(radius), np.uint8))
    # sep's flags only: APER_TRUNC kept, our FLAG_MASKED and FLAG_EDGE (above the low byte) gone
    assert read["f_0_f"].tolist() == [0, 0, 0, 16, 0, 0] and read["f_2_f"].tolist() == [0, 0, 0, 16, 0, 0]  # source 40
    np.testing.assert_array_equal(read["isolated"], rows.isolated[order])


def test_the_focal_plane_variant_divides_fluxes_and_errors_by_the_factor(tmp_path: Path) -> None:
    rows = quadrant()
    plain = pq.read_table(write_apcat(tmp_path / "a.parquet", in2p3_quadrant_table(rows, RADII, SHAPE), RADII, {}))
    scaled = pq.read_table(
        write_apcat(tmp_path / "b.parquet", in2p3_quadrant_table(rows, RADII, SHAPE, flat_factor=1.03), RADII, {})
    )
    order = np.argsort(rows.source_id)
    for k in range(len(RADII)):
        expected = (rows.apertures.flux[order][:, k] / 1.03).astype(np.float32)
        got = scaled[f"f_{k}"].to_numpy(zero_copy_only=False)
        finite = np.isfinite(plain[f"f_{k}"].to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(got[finite], expected[finite])
        assert np.array_equal(np.isfinite(got), finite)  # the NaN rule is unchanged
        np.testing.assert_array_equal(
            scaled[f"f_{k}_e"].to_numpy(), (rows.apertures.flux_err[order][:, k] / 1.03).astype(np.float32)
        )
    with pytest.raises(ValueError, match="flat_factor"):
        in2p3_quadrant_table(rows, RADII, SHAPE, flat_factor=float("nan"))


def test_radii_that_are_not_whole_pixels_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        in2p3_quadrant_table(quadrant(), (2.5, 5.0, 8.0), SHAPE)


@pytest.mark.parametrize(
    ("lines", "key"),
    [('layout = "IN2P3"', "photometry.layout"), ('layout = "in2p3"\nradii = [2.5, 5]', "photometry.radii")],
)
def test_bad_layout_settings_are_one_line_errors(minimal_config_text: str, tmp_path: Path, lines: str, key: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(minimal_config_text + lines + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: {key} = ") and "expected" in message


def test_the_default_layout_keeps_the_configuration_hash(minimal_config_text: str, tmp_path: Path) -> None:
    hashes = {}
    for name, lines in (("none", ""), ("default", 'layout = "streamer"\n'), ("in2p3", 'layout = "in2p3"\n')):
        path = tmp_path / f"{name}.toml"
        path.write_text(minimal_config_text + lines)
        hashes[name] = load_config(path).config_hash()
    assert hashes["none"] == hashes["default"] != hashes["in2p3"]
