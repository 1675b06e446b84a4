"""IRSA names: the reference's real names, build-then-parse round trips, and junk rejected."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.storage.naming import (
    CalName,
    NamingError,
    RawName,
    SciName,
    data_url,
    parse_filename,
    parse_relpath,
    rcid_of,
    relpath_from_url,
)

BASE = "https://irsa.ipac.caltech.edu"


def test_real_sciimg_name() -> None:
    name = parse_filename("ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits")
    assert isinstance(name, SciName)
    assert (name.filefracday, name.field, name.filtercode, name.ccdid, name.qid) == ("20200924431759", 655, "zr", 13, 3)
    assert name.rcid == 50
    assert name.relpath == "sci/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits"
    assert name.raw.filename == "ztf_20200924431759_000655_zr_c13_o.fits.fz"


def test_real_bias_name() -> None:
    name = parse_filename("ztf_20200801078252_000000_bi_c13_b.fits.fz")
    assert isinstance(name, RawName)
    assert name.imgtype == "bias"
    assert name.url(BASE) == (
        "https://irsa.ipac.caltech.edu/ibe/data/ztf/products/raw/2020/0801/078252/"
        "ztf_20200801078252_000000_bi_c13_b.fits.fz"
    )


def test_cal_name() -> None:
    name = CalName("20180305", "00", 1, 1, "bias")
    assert name.relpath == "cal/2018/0305/bias/00/ccd01/q1/ztf_20180305_00_c01_q1_bias.fits"
    assert parse_relpath(name.relpath) == name


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "ztf_2020092443175_000655_zr_c13_o.fits.fz",  # 13 digits
        "ztf_20201324431759_000655_zr_c13_o.fits.fz",  # month 13
        "ztf_20200924431759_000655_zr_c17_o.fits.fz",  # ccd 17
        "ztf_20200924431759_000655_zx_c13_o.fits.fz",  # filter
        "ztf_20200924431759_000655_zr_c13_x.fits.fz",  # image type
        "ztf_20200924431759_000655_zr_c13_o_q5_sciimg.fits",  # quadrant
        "ztf_20200924431759_000655_zr_c13_o.fits.fz.exe",
        "../../etc/passwd",
    ],
)
def test_junk_is_rejected(junk: str) -> None:
    with pytest.raises(NamingError, match="expected"):
        parse_filename(junk)


def test_relpath_must_match_directories() -> None:
    with pytest.raises(NamingError, match="do not match"):
        parse_relpath("raw/2020/0925/431759/ztf_20200924431759_000655_zr_c13_o.fits.fz")
    with pytest.raises(NamingError):
        parse_relpath("raw/../../ztf_20200924431759_000655_zr_c13_o.fits.fz")


def test_rcid() -> None:
    assert rcid_of(1, 1) == 0
    assert rcid_of(16, 4) == 63


dates = st.dates(min_value=dt.date(2017, 1, 1), max_value=dt.date(2030, 12, 31))
filefracdays = st.builds(lambda d, f: d.strftime("%Y%m%d") + f"{f:06d}", dates, st.integers(0, 999999))
ccds = st.integers(1, 16)
qids = st.integers(1, 4)
fields = st.integers(0, 999999)
sci_filters = st.sampled_from(["zg", "zr", "zi"])


@given(filefracdays, fields, st.sampled_from(["zg", "zr", "zi", "bi"]), ccds, st.sampled_from(["o", "b", "f", "d"]))
def test_raw_round_trip(ffd: str, field: int, filt: str, ccd: int, code: str) -> None:
    name = RawName(ffd, field, filt, ccd, code)
    assert parse_filename(name.filename) == name
    assert parse_relpath(name.relpath) == name
    assert relpath_from_url(name.url(BASE)) == name.relpath


@given(filefracdays, fields, sci_filters, ccds, qids, st.sampled_from(["sciimg.fits", "mskimg.fits", "psfcat.fits"]))
def test_sci_round_trip(ffd: str, field: int, filt: str, ccd: int, qid: int, suffix: str) -> None:
    name = SciName(ffd, field, filt, ccd, qid, suffix)
    assert parse_filename(name.filename) == name
    assert parse_relpath(name.relpath) == name
    assert relpath_from_url(data_url(BASE, name.relpath)) == name.relpath


@given(dates, st.sampled_from(["zg", "zr", "zi", "00"]), ccds, qids, st.sampled_from(["bias", "hifreqflat", "lofreqflat"]))
def test_cal_round_trip(night: dt.date, filt: str, ccd: int, qid: int, caltype: str) -> None:
    name = CalName(night.strftime("%Y%m%d"), filt, ccd, qid, caltype)
    assert parse_filename(name.filename) == name
    assert parse_relpath(name.relpath) == name
