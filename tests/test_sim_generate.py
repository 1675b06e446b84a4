"""The generator: layout, file format, determinism, and inject-and-recover checks of its truth."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import astropy.units as u
import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy_healpix import HEALPix

from simhelpers import NIGHT, detrended, overscan_subtracted, params, small_night
from streamer import cli
from streamer.detrend.nonlinearity import correct
from streamer.detrend.readout import to_readout
from streamer.errors import UsageError
from streamer.sim import generate, pixels, sky
from streamer.sim.generate import NightTruth, generate_night, julian_date
from streamer.sim.geometry import wcs_from_keywords
from streamer.storage.naming import RawName, parse_relpath

RAW_KEYWORDS = ("IMGTYPE", "EXPTIME", "FILTER", "FILTERID", "OBSJD", "OBSMJD", "FIELDID", "CCD_ID")
AMP_KEYWORDS = ("CCD_ID", "AMP_ID", "AMP_NAME", "GAIN", "READNOI")


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> NightTruth:
    return small_night(tmp_path_factory.mktemp("sim"))


def test_layout_and_counts(night: NightTruth) -> None:
    raws = [parse_relpath(p) for p in night.raw_relpaths()]
    assert all(isinstance(r, RawName) for r in raws)
    by_type = {code: sum(r.imgtypecode == code for r in raws if isinstance(r, RawName)) for code in "bfo"}
    assert by_type == {"b": 6, "f": 2 * 4, "o": 3}
    sci = [p for p in night.relpaths if p.startswith("sci/")]
    assert len(sci) == 3 * 4 * 2
    for relpath in night.relpaths:
        assert (night.out / relpath).is_file()
        assert parse_relpath(relpath).relpath == relpath
    assert {p.name for p in (night.out / "truth").iterdir()} >= {
        "params.json", "stars.parquet", "bias_c13.fits", "flat_zg_c13.fits", "flat_zr_c13.fits"
    }


def test_times_lie_in_the_night(night: NightTruth) -> None:
    jd0 = julian_date(NIGHT)
    assert jd0 == 2459116.5
    for exposure in night.exposures:
        assert exposure.filefracday.startswith("20200924")
        assert jd0 <= exposure.obsjd < jd0 + 1
        assert int(exposure.filefracday[8:]) == int((exposure.obsjd - jd0) * 1e6)
    assert len({e.expid for e in night.exposures}) == len(night.exposures)


def test_raw_file_hdus_keywords_and_lossless_round_trip(night: NightTruth, tmp_path: Path) -> None:
    flat = next(p for p in night.raw_relpaths("flat"))
    with fits.open(night.out / flat) as hdus:
        assert len(hdus) == 9
        assert hdus[0].data is None
        for key in (*RAW_KEYWORDS, "ILUM_LED", "ILUMWAVE"):
            assert key in hdus[0].header, key
        for index in range(1, 9):
            assert isinstance(hdus[index], fits.CompImageHDU)
            assert hdus[index].compression_type == "RICE_1"
            for key in AMP_KEYWORDS:
                assert key in hdus[index].header, (index, key)
            expected = (260, 256) if index <= 4 else (260, 30)
            assert hdus[index].data.shape == expected
            assert hdus[index].data.dtype == np.uint16
        assert [hdus[q].header["AMP_ID"] for q in range(1, 5)] == [0, 1, 2, 3]
        arrays = [hdus[i].data.copy() for i in range(1, 9)]
        copy = fits.HDUList([fits.PrimaryHDU(header=hdus[0].header)] + [fits.CompImageHDU(a, compression_type="RICE_1") for a in arrays])
        copy.writeto(tmp_path / "copy.fits.fz")
    with fits.open(tmp_path / "copy.fits.fz") as again:
        for index, array in enumerate(arrays, start=1):
            np.testing.assert_array_equal(again[index].data, array)


def test_flat_led_numbers_follow_the_filter(night: NightTruth) -> None:
    for relpath in night.raw_relpaths("flat"):
        header = fits.getheader(night.out / relpath, 0)
        filtercode = Path(relpath).name.split("_")[3]
        assert header["ILUM_LED"] in generate.LEDS[filtercode]


def test_generation_is_deterministic_and_seeded(night: NightTruth, tmp_path: Path) -> None:
    exposure = night.exposures[-1]
    spec = generate.NightSpec(
        tmp_path, NIGHT, 7, generate.Instrument(generate.shape_named("small"), 0, 120),
        {(13, exposure.filtercode): {int(k): v for k, v in night.params["flats"][exposure.filtercode]["13"]["led_medians"].items()}},
    )
    generate.write_ccd_file(spec, exposure, 13)
    relpath = exposure.raw_name(13).relpath
    with fits.open(night.out / relpath) as first, fits.open(tmp_path / relpath) as second:
        for index in range(1, 9):
            np.testing.assert_array_equal(first[index].data, second[index].data)
    other = generate.NightSpec(tmp_path / "other", NIGHT, 8, spec.instrument, spec.flat_medians)
    generate.write_ccd_file(other, exposure, 13)
    with fits.open(night.out / relpath) as first, fits.open(tmp_path / "other" / relpath) as second:
        assert not np.array_equal(first[1].data, second[1].data)


def test_bias_level_recovered_by_averaging_biases(night: NightTruth) -> None:
    """Inject-and-recover: the mean of the biases' overscans is the injected level, within the read-noise limit."""
    truth = params(night.out)
    biases = night.raw_relpaths("bias")
    for qid in (1, 2, 3, 4):
        amp = truth["amplifiers"]["13"][str(qid)]
        overscan = np.mean([fits.getdata(night.out / p, qid + 4).astype(np.float64).mean() for p in biases])
        data = np.mean([fits.getdata(night.out / p, qid).astype(np.float64).mean() for p in biases])
        structure = fits.getdata(night.out / "truth" / "bias_c13.fits", qid).astype(np.float64).mean()
        n_overscan = len(biases) * 260 * 30
        n_data = len(biases) * 260 * 256
        limit_overscan = 4 * amp["read_noise_adu"] / np.sqrt(n_overscan) + 0.01
        limit_data = 4 * amp["read_noise_adu"] / np.sqrt(n_data) + 0.01
        assert abs(overscan - amp["bias_level_adu"]) < limit_overscan
        assert abs(data - structure - amp["bias_level_adu"]) < limit_data
        assert amp["bias_level_adu"] != pytest.approx(truth["amplifiers"]["13"][str(qid % 4 + 1)]["bias_level_adu"], abs=1)


def test_trailing_charge_sits_in_the_first_overscan_columns_read(night: NightTruth) -> None:
    flat = night.raw_relpaths("flat")[0]
    for qid in (1, 2, 3, 4):
        with fits.open(night.out / flat) as hdus:
            overscan = to_readout(hdus[qid + 4].data.astype(np.float64), qid)
        profile = overscan.mean(axis=0)
        assert profile[0] - profile[25] > 50
        assert abs(profile[20] - profile[29]) < 0.5


def test_truth_flat_is_what_the_led_algorithm_recovers(night: NightTruth) -> None:
    """Per LED median of bias-subtracted flats, each divided by its CCD-wide median, LEDs averaged."""
    truth = params(night.out)
    a_b = truth["nights"]["2020-09-24"]["nonlinearity"]["13"]
    flats = night.raw_relpaths("flat")
    filtercode = "zr"
    stacks = []
    for led in generate.LEDS[filtercode]:
        mine = [p for p in flats if fits.getheader(night.out / p, 0)["ILUM_LED"] == led]
        assert len(mine) == 2
        quadrants = []
        for qid in (1, 2, 3, 4):
            bias = fits.getdata(night.out / "truth" / "bias_c13.fits", qid)
            frames = [correct(overscan_subtracted(night.out / p, qid), *a_b[str(qid)]) - bias for p in mine]
            quadrants.append(np.median(frames, axis=0))
        stacks.append([q / np.median(np.concatenate([s.ravel() for s in quadrants])) for q in quadrants])
    good = np.ones(256, dtype=bool)
    for qid in (1, 2, 3, 4):
        amp = truth["amplifiers"]["13"][str(qid)]
        assert amp["gain"] > 5
        good[:] = True
        good[amp["dead_columns"] + amp["hot_columns"]] = False
        recovered = np.mean([s[qid - 1] for s in stacks], axis=0)[:, good]
        expected = fits.getdata(night.out / "truth" / f"flat_{filtercode}_c13.fits", qid)[:, good]
        ratio = recovered / expected
        levels = [truth["led_levels_adu"][str(led)] for led in generate.LEDS[filtercode]]
        photon_noise = np.sqrt(sum(1 / (amp["gain"] * level * 2) for level in levels)) / len(levels)
        assert abs(np.median(ratio) - 1) < 2e-3
        assert np.std(ratio) < 1.2 * photon_noise
    assert abs(truth["flats"][filtercode]["13"]["median"] - 1) < 2e-3


def test_star_fluxes_recovered_from_detrended_science(night: NightTruth) -> None:
    """Aperture sums on quadrants detrended with the truth agree with the true fluxes within the noise."""
    stars = pq.read_table(night.out / "truth" / "stars.parquet").to_pylist()
    truth = params(night.out)
    pulls = []
    for raw in night.raw_relpaths("object"):
        ffd = Path(raw).name[4:18]
        for qid in (1, 2, 3, 4):
            amp = truth["amplifiers"]["13"][str(qid)]
            bad_columns = amp["dead_columns"] + amp["hot_columns"]
            image = detrended(night.out, raw, qid)
            background = np.median(image)
            yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
            mine = [s for s in stars if s["filefracday"] == ffd and s["qid"] == qid]
            assert len(mine) > 50
            for star in mine:
                if star["flux"] > 200000 or not (12 < star["x"] < 243 and 12 < star["y"] < 247):
                    continue
                if any(abs(c - star["x"]) < 10 for c in bad_columns):
                    continue
                if any(np.hypot(s["x"] - star["x"], s["y"] - star["y"]) < 16 for s in mine if s is not star):
                    continue
                aperture = np.hypot(xx - star["x"], yy - star["y"]) < 8
                measured = (image[aperture] - background).sum()
                pixel_variance = background / amp["gain"] + amp["read_noise_adu"] ** 2
                sigma = np.sqrt(aperture.sum() * pixel_variance + star["flux"] / amp["gain"])
                pulls.append((measured - star["flux"]) / sigma)
    assert len(pulls) > 30
    assert np.all(np.abs(pulls) < 5)
    assert abs(np.mean(pulls)) < 0.5 and 0.7 < np.std(pulls) < 1.5


def test_stars_truth_matches_refcat_and_wcs(night: NightTruth) -> None:
    stars = pq.read_table(night.out / "truth" / "stars.parquet")
    assert stars.column_names == ["filefracday", "ccdid", "qid", "source_id", "x", "y", "flux"]
    files = sorted((night.out / "refcat").glob("gaiadr3_pix64_*.parquet"))
    assert files
    hp = HEALPix(nside=64, order="nested")
    catalogue: dict[int, dict[str, float]] = {}
    for path in files:
        table = pq.read_table(path)
        assert table.column_names == [
            "source_id", "ra", "dec", "pmra", "pmdec", "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag"
        ]
        ipix = int(path.stem.rsplit("_", 1)[1])
        if table.num_rows:
            pixels = hp.lonlat_to_healpix(table["ra"].to_numpy() * u.deg, table["dec"].to_numpy() * u.deg)
            assert set(pixels.tolist()) == {ipix}
        for row in table.to_pylist():
            catalogue[row["source_id"]] = row
    assert np.all(np.abs([r["pmra"] for r in catalogue.values()]) > 0)
    exposure = night.exposures[-1]
    sciimg = next(p for p in night.relpaths if exposure.filefracday in p and p.endswith("q2_sciimg.fits"))
    header = fits.getheader(night.out / sciimg)
    wcs = wcs_from_keywords({k: header[k] for k in ("CTYPE1", "CTYPE2", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CD1_1", "CD1_2", "CD2_1", "CD2_2")})
    rows = [r for r in stars.to_pylist() if r["filefracday"] == exposure.filefracday and r["qid"] == 2]
    assert 60 < len(rows) < 200
    subset = {k: np.array([catalogue[r["source_id"]][k] for r in rows]) for k in ("ra", "dec", "pmra", "pmdec")}
    ra, dec = sky.positions_at(subset, exposure.obsjd)
    x, y = wcs.wcs_world2pix(ra, dec, 0)
    np.testing.assert_allclose(x, [r["x"] for r in rows], atol=1e-6)
    np.testing.assert_allclose(y, [r["y"] for r in rows], atol=1e-6)
    ra_2016, _ = wcs.wcs_world2pix(subset["ra"], subset["dec"], 0)
    assert np.max(np.abs(ra_2016 - x)) > 1e-3


def test_sibling_quadrants_share_the_tangent_plane(night: NightTruth) -> None:
    exposure = night.exposures[-1]
    headers = {
        q: fits.getheader(night.out / exposure.raw_name(13).sci(q, "sciimg.fits").relpath) for q in (1, 2, 3, 4)
    }
    for q in (1, 2, 3, 4):
        assert headers[q]["CD1_1"] == headers[1]["CD1_1"] and headers[q]["CRVAL1"] == headers[1]["CRVAL1"]
    # q4|q3 over q1|q2 on the IPAC grid, the real camera's layout (tests/test_camera_layout.py)
    assert headers[2]["CRPIX1"] - headers[1]["CRPIX1"] == -256
    assert headers[3]["CRPIX2"] - headers[2]["CRPIX2"] == -260
    assert headers[4]["CRPIX1"] == headers[1]["CRPIX1"] and headers[4]["CRPIX2"] == headers[3]["CRPIX2"]


def test_sciimg_and_mskimg_headers_and_bits(night: NightTruth) -> None:
    truth = params(night.out)
    exposure = night.exposures[-1]
    for qid in (1, 2, 3, 4):
        sci = exposure.raw_name(13).sci(qid, "sciimg.fits")
        header = fits.getheader(night.out / sci.relpath)
        for key in ("GAIN", "SATURATE", "MAGZP", "EXPID", "RCID", "QID", "CCDID", "FIELDID", "FILTER", "OBSJD", "OBSMJD", "EXPTIME", "SEEING", "READNOI"):
            assert key in header, key
        assert header["RCID"] == 4 * 12 + qid - 1 and header["QID"] == qid and header["MAGZP"] == exposure.magzp
        mask = fits.getdata(night.out / exposure.raw_name(13).sci(qid, "mskimg.fits").relpath)
        assert mask.dtype.kind == "i" and mask.dtype.itemsize == 2
        mask_header = fits.getheader(night.out / exposure.raw_name(13).sci(qid, "mskimg.fits").relpath)
        assert mask_header["BIT08"] == 8 and mask_header["BIT09"] == 9
        amp = truth["amplifiers"]["13"][str(qid)]
        assert np.all(mask[:, amp["dead_columns"]] & generate.MASK_DEAD)
        assert not np.any(np.delete(mask, amp["dead_columns"], axis=1) & generate.MASK_DEAD)
        with fits.open(night.out / exposure.raw_name(13).relpath) as hdus:
            raw = hdus[qid].data
        saturated = (raw == pixels.SATURATION_RAW_ADU)
        np.testing.assert_array_equal(saturated & ~np.isin(np.arange(256), amp["hot_columns"])[None, :], (mask & generate.MASK_SATURATED) > 0)
        assert np.any(mask & generate.MASK_SOURCE)


def test_a_night_without_flats_for_one_filter_and_a_second_night(tmp_path: Path) -> None:
    first = small_night(tmp_path, n_exposures=1, flats_per_led=1, n_biases=1, filters=("zr",), flat_filters=("zg", "zi"))
    filters = {Path(p).name.split("_")[3] for p in first.raw_relpaths("flat")}
    assert filters == {"zg", "zi"}
    assert (tmp_path / "truth" / "flat_zr_c13.fits").exists()
    second = small_night(tmp_path, night=dt.date(2020, 9, 25), n_exposures=1, flats_per_led=0, n_biases=1, filters=("zr",), seed=8)
    truth = params(tmp_path)
    assert set(truth["nights"]) == {"2020-09-24", "2020-09-25"}
    stars = pq.read_table(tmp_path / "truth" / "stars.parquet")
    assert {f[:8] for f in stars["filefracday"].to_pylist()} == {"20200924", "20200925"}
    assert second.exposures[-1].filefracday.startswith("20200925")
    with pytest.raises(UsageError, match="instrument seed"):
        small_night(tmp_path, n_exposures=1, flats_per_led=0, n_biases=1, instrument_seed=3)


def test_parallel_jobs_write_the_same_files(tmp_path: Path) -> None:
    arguments = dict(n_biases=1, flats_per_led=0, n_exposures=2, filters=("zr",), flat_filters=())
    serial = small_night(tmp_path / "serial", **arguments)
    parallel = small_night(tmp_path / "parallel", jobs=2, **arguments)
    assert parallel.relpaths == serial.relpaths
    for relpath in parallel.raw_relpaths():
        with fits.open(serial.out / relpath) as first, fits.open(parallel.out / relpath) as second:
            for index in range(1, 9):
                np.testing.assert_array_equal(first[index].data, second[index].data)
    assert parallel.stars.equals(serial.stars)


def test_nonlinearity_in_float32_matches_the_shared_inverse() -> None:
    from streamer.detrend.nonlinearity import uncorrect

    linear = np.linspace(0.0, 150000.0, 10001, dtype=np.float32)
    for a, b in ((-1.62e-11, 9.94e-07), (-4.65e-12, 7.29e-08)):
        exact = uncorrect(linear.astype(np.float64), a, b)
        np.testing.assert_allclose(pixels.apply_nonlinearity(linear.copy(), a, b), exact, rtol=2e-7, atol=1e-3)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--jobs", "0"], "--jobs 0"),
        (["--exposures", "-1"], "--exposures -1"),
        (["--ccds", "13,17"], "17"),
    ],
)
def test_cli_usage_errors_are_one_line(arguments: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["sim", "generate", "--out", str(tmp_path / "x"), "--night", "2020-09-24", "--shape", "small", *arguments])
    stderr = capsys.readouterr().err
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_generates_a_night(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "sim", "generate", "--out", str(tmp_path), "--night", "2020-09-24",
         "--shape", "small", "--exposures", "1", "--flats-per-led", "0", "--biases", "1", "--ccds", "13,14"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wrote 4 raw files")
    assert len(list(tmp_path.glob("raw/2020/0924/*/*.fits.fz"))) == 4


def test_out_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(UsageError, match="not a directory"):
        generate_night(target, NIGHT, shape="small", n_exposures=0, flats_per_led=0, n_biases=1)


@pytest.mark.slow
def test_full_size_raw_file(tmp_path: Path) -> None:
    truth = generate_night(tmp_path, NIGHT, ccds=(13,), n_exposures=1, flats_per_led=0, n_biases=1, shape="full", filters=("zr",))
    science = truth.raw_relpaths("object")[0]
    with fits.open(tmp_path / science) as hdus:
        assert len(hdus) == 9
        for key in RAW_KEYWORDS:
            assert key in hdus[0].header
        arrays = [hdus[i].data.copy() for i in range(1, 9)]
        for index, array in enumerate(arrays, start=1):
            assert array.shape == ((3080, 3072) if index <= 4 else (3080, 30))
            assert array.dtype == np.uint16
            for key in AMP_KEYWORDS:
                assert key in hdus[index].header
        fits.HDUList([fits.PrimaryHDU(header=hdus[0].header)] + [fits.CompImageHDU(a) for a in arrays]).writeto(tmp_path / "copy.fits.fz")
    with fits.open(tmp_path / "copy.fits.fz") as again:
        for index, array in enumerate(arrays, start=1):
            np.testing.assert_array_equal(again[index].data, array)
    stars = pq.read_table(tmp_path / "truth" / "stars.parquet")
    per_quadrant = np.bincount(stars["qid"].to_numpy(), minlength=5)[1:]
    assert np.all((per_quadrant > 3500) & (per_quadrant < 5500))
    header = fits.getheader(tmp_path / truth.raw_relpaths("object")[0].replace("raw/", "sci/").replace("_o.fits.fz", "_o_q1_sciimg.fits"))
    bright = np.sum(stars["flux"].to_numpy()[stars["qid"].to_numpy() == 1] > 10 ** (0.4 * (header["MAGZP"] - 17.0)))
    assert bright > 150
