"""The download order: files pinned by unfinished jobs in job order, then kept files, only those due."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from streamer.ledger.core import Ledger
from streamer.ledger.downloads import download_candidates

NOW = 1_700_000_000.0
RAW = "raw/2020/0924/431759/ztf_20200924431759_{:06d}_zr_c13_o.fits.fz"


def _file(ledger: Ledger, n: int, *, path: Sequence[str] = (), url: bool = True, kept: bool = False, **fields: Any) -> int:
    with ledger.transaction() as conn:
        file_id = ledger.want_file(conn, relpath=RAW.format(n), kind="raw", url=f"http://a/{n}" if url else "", kept=kept)
        for state in path:
            ledger.set_file_state(conn, file_id, state)
        if fields:
            ledger.set_file_state(conn, file_id, path[-1] if path else "wanted", **fields)
    return file_id


def _job(ledger: Ledger, key: str, pins: list[int], state: str | None = None) -> int:
    with ledger.transaction() as conn:
        job_id = ledger.add_job(conn, kind="exposure", key=key, pins=pins)
        if state == "failed":
            ledger.set_job_state(conn, job_id, "ready")
            ledger.set_job_state(conn, job_id, "running")
            ledger.set_job_state(conn, job_id, "failed")
        elif state == "parked":
            ledger.set_job_state(conn, job_id, "ready")
            ledger.set_job_state(conn, job_id, "running")
            ledger.set_job_state(conn, job_id, "parked")
        elif state is not None:
            ledger.set_job_state(conn, job_id, state)
    return job_id


@pytest.fixture
def files() -> tuple[Ledger, dict[str, int]]:
    ledger = Ledger.memory()
    f = {
        "late_job": _file(ledger, 1),
        "two_jobs": _file(ledger, 2),
        "on_disk": _file(ledger, 3, path=["on_disk"]),
        "parked_only": _file(ledger, 4),
        "missing_due": _file(ledger, 5, path=["missing"], retry_at=NOW - 1, attempts=1),
        "missing_later": _file(ledger, 6, path=["missing"], retry_at=NOW + 60, attempts=1),
        "missing_used_up": _file(ledger, 7, path=["missing"], retry_at=NOW - 1, attempts=3),
        "kept_deleted": _file(ledger, 8, path=["deleted"], kept=True),
        "kept_no_url": _file(ledger, 9, url=False, kept=True),
        "kept_corrupt": _file(ledger, 10, path=["reserved", "downloading", "corrupt"], kept=True, retry_at=NOW - 1),
        "corrupt_parked": _file(ledger, 14, path=["reserved", "downloading", "corrupt"], kept=True, retry_at=None),
        "reserved": _file(ledger, 11, path=["reserved"]),
        "kept_and_pinned": _file(ledger, 12, kept=True),
        "kept_missing_no_retry": _file(ledger, 13, path=["missing"], kept=True, retry_at=None, attempts=1),
    }
    _job(ledger, "first", [f["two_jobs"], f["on_disk"], f["missing_later"], f["kept_and_pinned"]])
    _job(ledger, "second", [f["late_job"], f["two_jobs"]], state="ready")
    _job(ledger, "parked", [f["parked_only"]], state="parked")
    _job(ledger, "third", [f["missing_due"], f["reserved"], f["missing_used_up"]], state="failed")
    return ledger, f


def _names(found: list[dict[str, Any]], f: dict[str, int]) -> list[str]:
    by_id = {v: k for k, v in f.items()}
    return [by_id[r["id"]] for r in found]


def test_pinned_in_job_order_then_kept_by_id(files: tuple[Ledger, dict[str, int]]) -> None:
    ledger, f = files
    found = download_candidates(ledger, limit=20, burst=False, now=NOW, max_missing=3, exclude=())
    assert _names(found, f) == [
        "two_jobs", "kept_and_pinned", "late_job", "missing_due", "reserved", "kept_deleted", "kept_corrupt"
    ]  # fmt: skip


def test_limit_exclude_and_burst(files: tuple[Ledger, dict[str, int]]) -> None:
    ledger, f = files
    args: dict[str, Any] = {"now": NOW, "max_missing": 3}
    assert _names(download_candidates(ledger, limit=3, burst=False, exclude=(), **args), f) == [
        "two_jobs", "kept_and_pinned", "late_job"
    ]  # fmt: skip
    excluded = {f["two_jobs"], f["kept_deleted"]}
    assert _names(download_candidates(ledger, limit=5, burst=False, exclude=excluded, **args), f) == [
        "kept_and_pinned", "late_job", "missing_due", "reserved", "kept_corrupt"
    ]  # fmt: skip
    # A burst leaves refused files alone, even those due again.
    assert "missing_due" not in _names(download_candidates(ledger, limit=20, burst=True, exclude=(), **args), f)
    # One more refusal allowed: the file with three attempts is due too, after the other pinned files of its job.
    more = download_candidates(ledger, limit=20, burst=False, exclude=(), now=NOW, max_missing=4)
    assert _names(more, f)[3:6] == ["missing_due", "missing_used_up", "reserved"]
