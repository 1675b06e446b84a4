"""Calibration selection: same night first, else nearest within the gap (ties: earlier), else blocked."""

from __future__ import annotations

import datetime as dt
import pickle

import pytest

from streamer.rules.calibration import AvailableMaster, CalibrationUnavailable, nearest_night, select_calibration

D = dt.date


def bias(night: dt.date, ccdid: int = 13) -> AvailableMaster:
    return AvailableMaster("bias", night, ccdid, None, f"bias_{night}_{ccdid}.fits")


def flat(night: dt.date, filtercode: str = "zr", ccdid: int = 13) -> AvailableMaster:
    return AvailableMaster("flat", night, ccdid, filtercode, f"flat_{night}_{filtercode}_{ccdid}.fits")


def test_same_night_wins() -> None:
    available = [bias(D(2020, 9, 23)), bias(D(2020, 9, 24)), flat(D(2020, 9, 24)), flat(D(2020, 9, 25))]
    choice = select_calibration(D(2020, 9, 24), 13, "zr", available, max_gap_days=10)
    assert choice.bias.master.night == D(2020, 9, 24) and choice.bias.offset_days == 0
    assert choice.flat.master.night == D(2020, 9, 24)


def test_night_without_flats_for_a_filter_uses_the_nearest_night() -> None:
    night = D(2020, 9, 24)
    available = [bias(night), flat(night, "zg"), flat(D(2020, 9, 21), "zr"), flat(D(2020, 9, 26), "zr")]
    choice = select_calibration(night, 13, "zr", available, max_gap_days=10)
    assert choice.flat.master.night == D(2020, 9, 26) and choice.flat.offset_days == 2
    assert choice.bias.master.night == night


def test_tie_goes_to_the_earlier_night() -> None:
    assert nearest_night(D(2020, 9, 24), [D(2020, 9, 26), D(2020, 9, 22)], 10) == D(2020, 9, 22)


def test_across_month_and_year_boundaries() -> None:
    assert nearest_night(D(2021, 1, 2), [D(2020, 12, 30), D(2021, 1, 6)], 5) == D(2020, 12, 30)
    assert nearest_night(D(2020, 3, 1), [D(2020, 2, 28)], 2) == D(2020, 2, 28)  # 2020 is a leap year
    assert nearest_night(D(2020, 3, 1), [D(2020, 2, 28)], 1) is None


def test_nothing_within_the_gap_blocks_with_a_readable_reason() -> None:
    night = D(2020, 9, 24)
    available = [bias(night), flat(D(2020, 9, 1), "zr"), flat(night, "zr", ccdid=12)]
    with pytest.raises(CalibrationUnavailable) as err:
        select_calibration(night, 13, "zr", available, max_gap_days=10)
    assert "no master flat for CCD 13 filter zr within 10 days of 2020-09-24" in err.value.reason
    assert "2020-09-01, 23 days away" in err.value.reason
    with pytest.raises(CalibrationUnavailable, match="no master bias for CCD 13 on any night"):
        select_calibration(night, 13, "zr", [flat(night)], max_gap_days=10)


def test_gap_is_inclusive_and_zero_means_same_night_only() -> None:
    night = D(2020, 9, 24)
    available = [bias(D(2020, 9, 14)), flat(D(2020, 10, 4))]
    assert select_calibration(night, 13, "zr", available, max_gap_days=10).flat.offset_days == 10
    with pytest.raises(CalibrationUnavailable):
        select_calibration(night, 13, "zr", available, max_gap_days=9)


def test_records_pickle() -> None:
    choice = select_calibration(D(2020, 9, 24), 13, "zr", [bias(D(2020, 9, 24)), flat(D(2020, 9, 24))], max_gap_days=0)
    assert pickle.loads(pickle.dumps(choice)) == choice
    error = pickle.loads(pickle.dumps(CalibrationUnavailable("why")))
    assert error.reason == "why"
