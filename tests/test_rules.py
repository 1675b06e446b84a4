"""The service's decisions as pure rules: readiness, calibration fallback, reservations, failure policy, nights."""

from __future__ import annotations

import datetime as dt

import pytest

from streamer.rules.calibration import CalibrationUnavailable, Fallback, MasterOption, choose_fallback
from streamer.rules.failures import (
    JOB_BACKOFF_S,
    MAX_WORKER_LOSSES,
    WORKER_LOST_BACKOFF_S,
    Block,
    Park,
    Refetch,
    Requeue,
    Retry,
    failure_action,
)
from streamer.rules.nights import follow_nights, night_range
from streamer.rules.readiness import Blocked, NeedsMaster, PinnedInput, Ready, Wait, readiness
from streamer.rules.reservations import PendingOutput, plan_reservations

D = dt.date


def raw(state: str = "on_disk", attempts: int = 0, file_id: int = 1, *, parked: bool = False) -> PinnedInput:
    return PinnedInput(file_id=file_id, kind="raw", state=state, attempts=attempts, relpath=f"raw/{file_id}.fits.fz", parked=parked)


def master(producer_kind: str, producer_state: str = "done", state: str = "on_disk", file_id: int = 10) -> PinnedInput:
    return PinnedInput(
        file_id=file_id, kind="masters", state=state, attempts=0, producer_kind=producer_kind, producer_state=producer_state
    )


def decide(kind: str, inputs: list[PinnedInput], *, burst: bool = True) -> object:
    return readiness(kind, inputs, burst=burst, max_missing_attempts=3)


# --- readiness -----------------------------------------------------------------------------


def test_exposure_with_everything_on_disk_is_ready() -> None:
    assert decide("exposure", [raw(), master("master_bias", file_id=10), master("master_flat", file_id=11)]) == Ready()


def test_exposure_waits_for_a_download_and_for_a_master_being_made() -> None:
    assert decide("exposure", [raw("downloading"), master("master_bias"), master("master_flat")]) == Wait()
    assert decide("exposure", [raw(), master("master_bias"), master("master_flat", "running", "wanted")]) == Wait()


def test_missing_raw_is_settled_in_burst_mode_only_and_then_blocks_the_exposure() -> None:
    inputs = [raw("missing", attempts=1), master("master_bias"), master("master_flat")]
    assert decide("exposure", inputs, burst=False) == Wait()
    assert decide("exposure", inputs, burst=True) == Blocked("input not available: raw")


def test_missing_after_the_last_attempt_is_settled_in_follow_mode() -> None:
    inputs = [raw("missing", attempts=3), master("master_bias"), master("master_flat")]
    assert decide("exposure", inputs, burst=False) == Blocked("input not available: raw")


@pytest.mark.parametrize("state", ["missing", "corrupt"])
def test_a_parked_raw_blocks_its_exposure_at_once_in_follow_mode_naming_the_file(state: str) -> None:
    # a master still being made: nothing else to wait for, the raw will never come
    inputs = [raw(state, attempts=1, parked=True), master("master_bias"), master("master_flat", "running", "wanted")]
    for burst in (False, True):
        assert decide("exposure", inputs, burst=burst) == Blocked("inputs cannot be obtained: download given up for raw/1.fits.fz")


def test_a_raw_waiting_for_its_retry_date_is_not_parked() -> None:
    for state in ("missing", "corrupt"):
        assert decide("exposure", [raw(state, attempts=1), master("master_bias"), master("master_flat")], burst=False) == Wait()


@pytest.mark.parametrize("kind", ["master_bias", "led_flat"])
def test_a_frame_combining_job_goes_on_without_a_parked_frame(kind: str) -> None:
    parked = raw("corrupt", file_id=1, parked=True)
    assert decide(kind, [parked, raw("on_disk", file_id=2)], burst=False) == Ready()
    assert decide(kind, [parked, raw("missing", file_id=2, parked=True)], burst=False) == Blocked(
        "no input frame could be downloaded"
    )


def test_failed_master_asks_for_another_nights_and_names_the_one_it_replaces() -> None:
    inputs = [raw(), master("master_bias", "parked", "wanted", file_id=7), master("master_flat", file_id=8)]
    assert decide("exposure", inputs) == NeedsMaster(producer_kind="master_bias", replaces=7)


def test_exposure_without_any_master_flat_asks_for_one() -> None:
    assert decide("exposure", [raw(), master("master_bias")]) == NeedsMaster(producer_kind="master_flat", replaces=None)


def test_failed_focal_plane_step_blocks_without_a_fallback() -> None:
    inputs = [raw(), master("master_bias"), master("master_flat"), master("focalplane", "blocked", "wanted", file_id=12)]
    assert decide("exposure", inputs) == Blocked("focal-plane normalisation failed for this night and filter")


@pytest.mark.parametrize("kind", ["master_bias", "led_flat"])
def test_frame_combining_job_with_no_frame_on_disk_is_blocked(kind: str) -> None:
    assert decide(kind, [raw("missing", file_id=1), raw("missing", file_id=2)]) == Blocked("no input frame could be downloaded")
    assert decide(kind, [raw("missing", file_id=1), raw("on_disk", file_id=2)]) == Ready()


def test_master_flat_job_needs_no_raw() -> None:
    assert decide("master_flat", [master("led_flat", file_id=3)]) == Ready()


# --- calibration fallback ------------------------------------------------------------------


def test_fallback_takes_the_nearest_night_within_the_gap_earlier_on_a_tie() -> None:
    options = [MasterOption(1, D(2020, 9, 20)), MasterOption(2, D(2020, 9, 28)), MasterOption(3, D(2020, 9, 30))]
    choice = choose_fallback(D(2020, 9, 24), "master_flat", "zg", options, max_gap_days=10, replaces=None)
    assert choice == Fallback(file_id=1, night=D(2020, 9, 20), replaces=None, description="master flat for zg")


def test_fallback_across_a_month_boundary() -> None:
    options = [MasterOption(5, D(2020, 10, 1)), MasterOption(6, D(2020, 9, 20))]
    choice = choose_fallback(D(2020, 9, 30), "master_bias", None, options, max_gap_days=3, replaces=9)
    assert choice == Fallback(file_id=5, night=D(2020, 10, 1), replaces=9, description="master bias")


def test_no_fallback_within_the_gap_says_what_and_how_far() -> None:
    options = [MasterOption(1, D(2020, 9, 1))]
    choice = choose_fallback(D(2020, 9, 25), "master_flat", "zg", options, max_gap_days=10, replaces=None)
    assert isinstance(choice, CalibrationUnavailable)
    assert choice.reason == "no master flat for zg within 10 days of 2020-09-25"


# --- output reservations -------------------------------------------------------------------


def test_reservations_in_order_stop_at_the_first_that_does_not_fit() -> None:
    pending = [PendingOutput(1, 1, 300), PendingOutput(2, 2, 600), PendingOutput(3, 3, 100)]
    plan = plan_reservations(pending, committed=100, overhead=50, budget=1000)
    assert [o.file_id for o in plan.reserve] == [1]  # 100 + 50 + 300 + 600 > 1000; the small third may not overtake
    assert plan.blocked_size == 600
    assert not plan.complete


def test_reservations_that_all_fit_exactly() -> None:
    pending = [PendingOutput(1, 1, 400), PendingOutput(2, 1, 450)]
    plan = plan_reservations(pending, committed=100, overhead=50, budget=1000)
    assert [o.file_id for o in plan.reserve] == [1, 2]
    assert plan.complete


# --- failure policy ------------------------------------------------------------------------


def test_a_dead_worker_requeues_after_a_short_pause_whatever_the_attempts() -> None:
    # a worker loss is not an attempt: a job with its last attempt left is run again, not parked
    first = failure_action("worker_lost", "died", attempts_before=9, max_attempts=3)
    assert first == Requeue(WORKER_LOST_BACKOFF_S[0])
    assert failure_action("worker_lost", "died", attempts_before=2, max_attempts=3, worker_losses_before=1) == Requeue(
        WORKER_LOST_BACKOFF_S[1]
    )
    assert all(0 < d < JOB_BACKOFF_S[-1] for d in WORKER_LOST_BACKOFF_S)  # a pause, never "at once"


def test_a_job_its_worker_dies_under_again_and_again_is_parked_with_the_count() -> None:
    actions = [failure_action("worker_lost", "died", attempts_before=0, max_attempts=3, worker_losses_before=n) for n in range(5)]
    assert MAX_WORKER_LOSSES == 3
    assert [type(a) for a in actions] == [Requeue, Requeue, Park, Park, Park]
    assert actions[2] == Park("the worker process died under it 3 times in a row")


def test_a_missing_calibration_blocks_with_its_reason() -> None:
    assert failure_action("blocked", "no WCS", attempts_before=0, max_attempts=3) == Block("no WCS")


def test_an_unreadable_raw_is_fetched_again_once_then_counts_as_a_failure() -> None:
    assert failure_action("refetch", "bad", attempts_before=0, max_attempts=3) == Refetch()
    assert failure_action("refetch", "bad", attempts_before=1, max_attempts=3) == Retry(JOB_BACKOFF_S[1])


def test_retries_back_off_then_park_at_the_last_attempt() -> None:
    delays = [failure_action("retry", "x", attempts_before=n, max_attempts=5) for n in range(4)]
    assert delays == [Retry(5.0), Retry(30.0), Retry(120.0), Retry(120.0)]
    assert failure_action("retry", "x", attempts_before=4, max_attempts=5) == Park()


# --- nights --------------------------------------------------------------------------------


def test_night_range_is_inclusive_and_crosses_months() -> None:
    assert night_range(D(2020, 9, 29), D(2020, 10, 2)) == [D(2020, 9, 29), D(2020, 9, 30), D(2020, 10, 1), D(2020, 10, 2)]
    assert night_range(D(2020, 9, 2), D(2020, 9, 1)) == []


def test_a_night_is_followed_delay_hours_after_it_ends() -> None:
    # the night of 2020-09-24 (UT) ends at 2020-09-25 00:00 UTC
    now = dt.datetime(2020, 9, 25, 5, 0, tzinfo=dt.UTC)
    assert follow_nights(now, delay_hours=6, first=None) == [D(2020, 9, 23)]
    assert follow_nights(now, delay_hours=5, first=None) == [D(2020, 9, 24)]
    assert follow_nights(now - dt.timedelta(microseconds=1), delay_hours=5, first=None) == [D(2020, 9, 23)]
    assert follow_nights(now, delay_hours=0, first=None) == [D(2020, 9, 24)]
    assert follow_nights(now, delay_hours=29, first=None) == [D(2020, 9, 23)]
    assert follow_nights(now, delay_hours=29.5, first=None) == [D(2020, 9, 22)]
    assert follow_nights(now, delay_hours=53, first=None) == [D(2020, 9, 22)]
    assert follow_nights(now, delay_hours=6, first=D(2020, 9, 21)) == [D(2020, 9, 21), D(2020, 9, 22), D(2020, 9, 23)]
