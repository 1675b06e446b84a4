"""Sky side of the photometry: WCS from IPAC headers (none borrowed from a sibling), HEALPix selection, proper motion."""

from __future__ import annotations

from pathlib import Path

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from astropy_healpix import HEALPix

from streamer import geometry, photometry
from streamer.formats import refcat

HEADER_TEXT = "\n".join(
    [
        "SIMPLE  = T",
        "BITPIX  = -32",
        "NAXIS   = 2",
        "NAXIS1  = 3072",
        "NAXIS2  = 3080",
        "CTYPE1  = 'RA---TPV'",
        "CTYPE2  = 'DEC--TPV'",
        "CRPIX1  = 1536.5",
        "CRPIX2  = 1540.5",
        "CRVAL1  = 57.9974032715",
        "CRVAL2  = 35.74628707041",
        "CD1_1   = -2.811703032876E-04",
        "CD1_2   = -7.697098117566E-06",
        "CD2_1   = 7.721274603541E-06",
        "CD2_2   = -2.811698359281E-04",
        "PV1_0   = -4.918160589556E-05",
        "PV1_1   = 1.000036677143E+00",
        "PV1_2   = 9.414366939841E-05",
        "PV1_4   = 2.468747878423E-04",
        "PV1_7   = -2.698341462040E-04",
        "PV2_0   = -4.496491941919E-05",
        "PV2_1   = 9.999973619179E-01",
        "PV2_2   = 3.137152858532E-05",
        "PV2_4   = 3.836347992086E-04",
        "PV2_7   = -1.578966474684E-04",
        "END",
    ]
)  # the WCS cards of a real IPAC sciimg (ztf_20200924431759_000655_zr_c13_o_q3), distortion terms abridged


def q3_header() -> fits.Header:
    return fits.Header.fromstring(HEADER_TEXT, sep="\n")


def test_tpv_distortion_is_honoured() -> None:
    header = q3_header()
    wcs = photometry.wcs_from_header(header)
    plain = header.copy()
    for key in [k for k in plain if k.startswith("PV")]:
        del plain[key]
    plain["CTYPE1"], plain["CTYPE2"] = "RA---TAN", "DEC--TAN"
    tan = photometry.wcs_from_header(plain)
    x, y = np.array([0.0, 3071.0]), np.array([0.0, 3079.0])
    with_pv = SkyCoord(*wcs.pixel_to_world_values(x, y), unit="deg")
    without = SkyCoord(*tan.pixel_to_world_values(x, y), unit="deg")
    assert np.all(with_pv.separation(without).arcsec > 0.05)
    back_x, back_y = photometry.sky_to_pixel(wcs, *wcs.pixel_to_world_values(x, y))
    np.testing.assert_allclose(back_x, x, atol=1e-6)
    np.testing.assert_allclose(back_y, y, atol=1e-6)


REAL_HEADER = Path(__file__).parent / "data" / "ztf_20200924431759_000655_zr_c13_o_q3_sciimg.header.txt"


def assert_same_wcs(ours: WCS, whole: WCS) -> None:
    assert ours.wcs.compare(whole.wcs)
    y, x = np.mgrid[-20.0:3100.0:97.0, -20.0:3092.0:101.0]
    np.testing.assert_array_equal(ours.all_pix2world(x.ravel(), y.ravel(), 0), whole.all_pix2world(x.ravel(), y.ravel(), 0))


def test_the_wcs_from_its_cards_is_astropys_from_the_whole_real_header() -> None:
    header = fits.Header.fromstring(REAL_HEADER.read_text(), sep="\n")
    assert len(header) > 250  # the full IPAC header: about 50 of its cards are WCS
    assert_same_wcs(photometry.wcs_from_header(header), WCS(header, naxis=2))


def test_the_wcs_from_its_cards_keeps_sip_and_a_pc_matrix() -> None:
    header = q3_header()
    for key in [k for k in header if k.startswith(("PV", "CD"))]:
        del header[key]
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    header["PC1_1"], header["PC1_2"], header["PC2_1"], header["PC2_2"] = 0.9998, 0.0175, -0.0175, 0.9998
    header["CDELT1"], header["CDELT2"] = -2.8e-4, 2.8e-4
    header["A_ORDER"], header["B_ORDER"] = 2, 2
    header["A_2_0"], header["A_0_2"], header["B_1_1"] = 3e-6, -2e-6, 4e-6
    header["LONPOLE"] = 180.0
    header["GAIN"], header["SEEING"] = 6.2, 2.1  # cards the WCS does not read
    ours = photometry.wcs_from_header(header)
    assert ours.sip is not None and ours.sip.a_order == 2
    assert_same_wcs(ours, WCS(header, naxis=2))


def test_a_quadrant_without_its_own_header_gets_no_wcs() -> None:
    own, problems = photometry.quadrant_wcs({3: q3_header(), 1: None, 2: None, 4: None})
    assert set(own) == {3} and own[3].from_qid == 3
    assert problems == {1: "no IPAC sciimg header", 2: "no IPAC sciimg header", 4: "no IPAC sciimg header"}


def test_no_header_on_the_ccd_is_a_specific_error() -> None:
    broken = fits.Header()
    broken["NAXIS"] = 2
    with pytest.raises(photometry.NoCcdWcsError, match="q1: no IPAC sciimg header"):
        photometry.quadrant_wcs({1: None, 2: None, 3: None, 4: broken})


def test_pixels_touching_contains_every_pixel_under_the_footprint() -> None:
    wcs = photometry.wcs_from_header(q3_header())
    shape = (geometry.QUADRANT_NY, geometry.QUADRANT_NX)
    margin = 20.0
    chosen = set(refcat.pixels_touching(wcs, shape, margin_px=margin).tolist())
    rng = np.random.default_rng(2)
    x = rng.uniform(-0.5 - margin, shape[1] - 0.5 + margin, 200_000)
    y = rng.uniform(-0.5 - margin, shape[0] - 0.5 + margin, 200_000)
    ra, dec = wcs.pixel_to_world_values(x, y)
    under = set(np.unique(HEALPix(64, order="nested").lonlat_to_healpix(ra * u.deg, dec * u.deg)).tolist())
    assert under <= chosen
    assert len(chosen) <= len(under) + 2  # only pixels that really touch (a sliver may escape the sample)


def write_refcat(directory: Path, ipix: int, n: int, seed: int) -> pa.Table:
    hp = HEALPix(64, order="nested")
    rng = np.random.default_rng(seed)
    lon, lat = hp.healpix_to_lonlat(np.full(n, ipix), dx=rng.uniform(0.05, 0.95, n), dy=rng.uniform(0.05, 0.95, n))
    table = pa.table(
        {
            "source_id": pa.array(ipix * 1_000_000 + np.arange(n), pa.int64()),
            "ra": lon.to_value(u.deg),
            "dec": lat.to_value(u.deg),
            "pmra": rng.normal(0, 5, n),
            "pmdec": rng.normal(0, 5, n),
            "phot_g_mean_mag": rng.uniform(12, 20, n).astype(np.float32),
            "phot_bp_mean_mag": rng.uniform(12, 20, n).astype(np.float32),
            "phot_rp_mean_mag": rng.uniform(12, 20, n).astype(np.float32),
            "ruwe": rng.uniform(0.9, 1.2, n),
        }
    )
    pq.write_table(table, directory / refcat.refcat_filename(ipix))
    return table


def test_read_refcat_reads_only_the_requested_pixels(tmp_path: Path) -> None:
    for seed, ipix in enumerate((100, 101, 102)):
        write_refcat(tmp_path, ipix, 50, seed)
    cat = refcat.read_refcat(tmp_path, [102, 100, 7], epoch=2016.0)
    assert cat.pixels_read == (100, 102) and cat.pixels_missing == (7,)
    assert len(cat) == 100
    assert set((cat.source_id // 1_000_000).tolist()) == {100, 102}
    assert np.all(np.diff(cat.source_id) > 0)
    original = pq.read_table(tmp_path / refcat.refcat_filename(100)).to_pydict()
    row = original["source_id"].index(int(cat.source_id[0]))
    assert cat.ra[0] == pytest.approx(original["ra"][row], abs=1e-12)  # epoch 2016.0: unchanged
    assert cat.mags["phot_g_mean_mag"].dtype == np.float32


@pytest.mark.parametrize(("ra", "dec"), [(10.0, 60.0), (200.0, -89.9995), (359.9999, 0.0)])
def test_proper_motion_moves_by_the_expected_angle_and_direction(ra: float, dec: float) -> None:
    pmra, pmdec, years = 300.0, -400.0, 10.0
    new_ra, new_dec = refcat.propagate_proper_motion(np.array([ra]), np.array([dec]), np.array([pmra]), np.array([pmdec]), years)
    start = SkyCoord(ra, dec, unit="deg")
    end = SkyCoord(new_ra[0], new_dec[0], unit="deg")
    assert start.separation(end).to_value(u.mas) == pytest.approx(np.hypot(pmra, pmdec) * years, rel=1e-6)
    expected_angle = np.degrees(np.arctan2(pmra, pmdec)) % 360
    assert start.position_angle(end).to_value(u.deg) % 360 == pytest.approx(expected_angle, abs=1e-3)


def test_missing_proper_motion_counts_as_zero() -> None:
    ra, dec = refcat.propagate_proper_motion(np.array([5.0]), np.array([5.0]), np.array([np.nan]), np.array([np.nan]), 4.0)
    assert ra[0] == pytest.approx(5.0, abs=1e-12) and dec[0] == pytest.approx(5.0, abs=1e-12)


def test_julian_epoch() -> None:
    assert refcat.julian_epoch(2451545.0) == 2000.0
    assert refcat.julian_epoch(2457389.0) == pytest.approx(2016.0, abs=1e-9)


def test_astropy_fixes_of_legacy_keywords_do_not_raise() -> None:
    header = q3_header()
    header["RADECSYS"] = "ICRS"  # deprecated: astropy fixes it and says so with a FITSFixedWarning
    wcs = photometry.wcs_from_header(header)  # pytest turns any other warning into an error
    assert wcs.has_celestial
