"""The ledger: migrations, transitions, budget reservations, queries, the writer lock, crash safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from streamer.errors import LedgerLockedError
from streamer.ledger.core import MIGRATIONS, Ledger, TransitionError


def _exposure(ledger: Ledger, conn, ffd: str = "20200924431759", imgtype: str = "object") -> int:  # type: ignore[no-untyped-def]
    code = {"object": "o", "bias": "b", "flat": "f"}[imgtype]
    return ledger.upsert_exposure(
        conn, filefracday=ffd, ccdid=13, imgtypecode=code, imgtype=imgtype, night="2020-09-24",
        field=655, filtercode="zr", expid=1, obsjd=2459116.93, exptime=30.0, led=None,
    )  # fmt: skip


def test_want_file_is_idempotent() -> None:
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        exp = _exposure(ledger, conn)
        first = ledger.want_file(conn, relpath="raw/a", kind="raw", exposure_id=exp, expected_size=100)
        again = ledger.want_file(conn, relpath="raw/a", kind="raw", exposure_id=exp, expected_size=100)
        assert _exposure(ledger, conn) == exp
    assert first == again
    assert ledger.scalar("SELECT COUNT(*) FROM files") == 1


def test_transitions_are_checked() -> None:
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        fid = ledger.want_file(conn, relpath="raw/a", kind="raw")
    with pytest.raises(TransitionError, match="wanted -> deleting"), ledger.transaction() as conn:
        ledger.set_file_state(conn, fid, "deleting")
    assert ledger.file(fid)["state"] == "wanted"


def test_reservation_respects_budget() -> None:
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        ids = [ledger.want_file(conn, relpath=f"raw/{i}", kind="raw", expected_size=40) for i in range(3)]
    assert ledger.reserve(ids[0], 40, budget=100)
    assert ledger.reserve(ids[1], 40, budget=100)
    assert not ledger.reserve(ids[2], 40, budget=100)
    assert ledger.committed_bytes() == 80
    assert ledger.file(ids[2])["state"] == "wanted"


def test_erasable_excludes_pinned_and_kept_and_orders_by_class() -> None:
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        sci = _exposure(ledger, conn, "20200924431759", "object")
        bias = _exposure(ledger, conn, "20200924100000", "bias")
        f_sci = ledger.want_file(conn, relpath="raw/sci", kind="raw", exposure_id=sci)
        f_bias = ledger.want_file(conn, relpath="raw/bias", kind="raw", exposure_id=bias)
        f_master = ledger.want_file(conn, relpath="masters/m", kind="masters")
        f_kept = ledger.want_file(conn, relpath="raw/kept", kind="raw", exposure_id=sci, kept=True)
        f_pinned = ledger.want_file(conn, relpath="raw/pinned", kind="raw", exposure_id=sci)
        for fid in (f_master, f_bias, f_sci, f_kept, f_pinned):
            ledger.set_file_state(conn, fid, "on_disk", disk_bytes=10)
        job = ledger.add_job(conn, kind="exposure", key="e1", pins=[f_pinned])
    assert [r["id"] for r in ledger.erasable()] == [f_sci, f_bias, f_master]
    with ledger.transaction() as conn:
        ledger.set_job_state(conn, job, "ready")
        ledger.set_job_state(conn, job, "running")
        ledger.set_job_state(conn, job, "done")
    assert f_pinned in [r["id"] for r in ledger.erasable()]
    totals = ledger.bytes_by_kind_and_state()
    assert totals[("raw", "on_disk")]["disk_bytes"] == 40


def test_needed_but_missing() -> None:
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        kept = ledger.want_file(conn, relpath="sci/k", kind="sciimg", kept=True)
        ledger.want_file(conn, relpath="sci/unneeded", kind="sciimg")
    assert [r["id"] for r in ledger.needed_but_missing()] == [kept]


def test_a_ledger_of_schema_3_gains_the_worker_loss_count_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:3]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version = 3")
    conn.execute("INSERT INTO jobs (kind, key, state, attempts, created) VALUES ('exposure', 'k', 'failed', 2, 0)")
    conn.close()
    with Ledger.open(path) as ledger:
        assert ledger.scalar("PRAGMA user_version") == len(MIGRATIONS) >= 4
        assert ledger.rows("SELECT key, state, attempts, worker_losses FROM jobs") == [
            {"key": "k", "state": "failed", "attempts": 2, "worker_losses": 0}
        ]


def test_recover_after_unclean_stop(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with Ledger.open(path) as ledger, ledger.transaction() as conn:
        fid = ledger.want_file(conn, relpath="raw/a", kind="raw")
        ledger.set_file_state(conn, fid, "reserved", reserved_bytes=5)
        ledger.set_file_state(conn, fid, "downloading")
        job = ledger.add_job(conn, kind="exposure", key="k")
        ledger.set_job_state(conn, job, "ready")
        ledger.set_job_state(conn, job, "running")
    with Ledger.open(path) as ledger:
        assert ledger.recover() == {"downloads": 1, "jobs": 1}
        assert ledger.file(fid)["state"] == "reserved"
        assert ledger.scalar("SELECT state FROM jobs WHERE id = ?", (job,)) == "ready"


def test_second_writer_refused_reader_allowed(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with Ledger.open(path):
        code = textwrap.dedent(f"""
            from streamer.ledger.core import Ledger
            from streamer.errors import LedgerLockedError
            try:
                Ledger.open({str(path)!r})
            except LedgerLockedError as err:
                print("refused:", err)
            reader = Ledger.open({str(path)!r}, readonly=True)
            print("reader files:", reader.scalar("SELECT COUNT(*) FROM files"))
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert "refused:" in out.stdout and "only one run or backfill" in out.stdout, out.stderr
        assert "reader files: 0" in out.stdout
    # the lock dies with its holder: a new writer gets in at once
    with Ledger.open(path):
        pass
    with pytest.raises(LedgerLockedError), Ledger.open(path), Ledger.open(path):
        pass


WRITER = """
import sys, time
from streamer.ledger.core import Ledger
ledger = Ledger.open(sys.argv[1])
i = 0
print("ready", flush=True)
while True:
    with ledger.transaction() as conn:
        a = ledger.want_file(conn, relpath=f"raw/{i}a", kind="raw", expected_size=7)
        ledger.want_file(conn, relpath=f"raw/{i}b", kind="raw", expected_size=7)
        ledger.add_job(conn, kind="exposure", key=f"job{i}", pins=[a])
        ledger.event("test", f"pair {i}", conn=conn)
    i += 1
"""


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.8])
def test_ledger_survives_sigkill_mid_transaction(tmp_path: Path, delay: float) -> None:
    path = tmp_path / "l.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    with Ledger.open(path) as ledger:
        assert ledger.scalar("PRAGMA integrity_check") == "ok"
        assert ledger.scalar("PRAGMA foreign_key_check") is None
        files = ledger.scalar("SELECT COUNT(*) FROM files")
        jobs = ledger.scalar("SELECT COUNT(*) FROM jobs")
        events = ledger.scalar("SELECT COUNT(*) FROM events")
        pins = ledger.scalar("SELECT COUNT(*) FROM pins")
        assert files > 0
        assert files == 2 * jobs == 2 * events == 2 * pins


def test_running_totals_match_a_full_count() -> None:
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        ids = [ledger.want_file(conn, relpath=f"raw/{i}", kind="raw", expected_size=10 + i) for i in range(20)]
        for fid in ids[:8]:
            ledger.set_file_state(conn, fid, "reserved", reserved_bytes=50)
        for fid in ids[:5]:
            ledger.set_file_state(conn, fid, "downloading")
            ledger.set_file_state(conn, fid, "on_disk", reserved_bytes=0, disk_bytes=4096)
        conn.execute("DELETE FROM files WHERE id = ?", (ids[19],))
    slow = {
        (r["kind"], r["state"]): {k: r[k] for k in ("files", "disk_bytes", "reserved_bytes", "expected_bytes")}
        for r in ledger.rows(
            "SELECT kind, state, COUNT(*) AS files, SUM(disk_bytes) AS disk_bytes, SUM(reserved_bytes) AS reserved_bytes, "
            "SUM(COALESCE(expected_size, 0)) AS expected_bytes FROM files GROUP BY kind, state"
        )
    }
    assert ledger.bytes_by_kind_and_state() == slow
    assert ledger.committed_bytes() == 5 * 4096 + 3 * 50
