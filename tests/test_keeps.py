"""Which consumer keeps which file (the ``keeps`` table), the per-consumer figures, and durable refusal counts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from streamer.ledger import downloads
from streamer.ledger.core import MIGRATIONS, Ledger
from streamer.ledger.status import consumer_figures, refusals_total
from streamer.rules.replan import PlanRecord, plan_due

KEEPS_MIGRATION = 5


def _on_disk(ledger: Ledger, file_id: int, disk_bytes: int) -> None:
    assert ledger.reserve(file_id, disk_bytes, budget=10**12)
    downloads.mark_downloading(ledger, file_id)
    downloads.mark_on_disk(ledger, file_id, disk_bytes=disk_bytes, actual_size=disk_bytes, http_status=200)


def _refuse(ledger: Ledger, file_id: int, *, max_refusals: int = 3) -> float | None:
    return downloads.record_missing(
        ledger, file_id, f"file {file_id}", "404 Not Found", 404, retry_s=3600.0, max_refusals=max_refusals
    )


def test_a_ledger_of_schema_4_gains_keeps_and_refusal_counts_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[: KEEPS_MIGRATION - 1]:
        conn.executescript(script)
    conn.execute(f"PRAGMA user_version = {KEEPS_MIGRATION - 1}")
    rows = [("raw/a", "raw", "on_disk", 1, 4096), ("raw/b", "raw", "missing", 1, 0), ("raw/c", "raw", "corrupt", 0, 0)]
    for relpath, kind, state, kept, disk_bytes in rows:
        conn.execute(
            "INSERT INTO files (relpath, kind, state, kept, disk_bytes, updated) VALUES (?, ?, ?, ?, ?, 0)",
            (relpath, kind, state, kept, disk_bytes),
        )
    ids = {r: i for i, r in conn.execute("SELECT id, relpath FROM files")}
    events = [("file_missing", "raw/b")] * 2 + [("download_failed", "raw/c"), ("file_missing", "raw/a"), ("plan", "raw/a")]
    for kind, relpath in events:
        conn.execute("INSERT INTO events (t, level, kind, message, file_id) VALUES (0, 'warning', ?, '', ?)", (kind, ids[relpath]))
    conn.close()
    with Ledger.open(path) as ledger:
        assert ledger.scalar("PRAGMA user_version") == len(MIGRATIONS) >= KEEPS_MIGRATION
        got = ledger.rows("SELECT relpath, state, kept, disk_bytes, refusals, download_failures FROM files ORDER BY relpath")
        assert got == [
            {"relpath": "raw/a", "state": "on_disk", "kept": 1, "disk_bytes": 4096, "refusals": 1, "download_failures": 0},
            {"relpath": "raw/b", "state": "missing", "kept": 1, "disk_bytes": 0, "refusals": 2, "download_failures": 0},
            {"relpath": "raw/c", "state": "corrupt", "kept": 0, "disk_bytes": 0, "refusals": 0, "download_failures": 1},
        ]
        # which consumer kept a file cannot be known from the flag: no rows until its night is planned again
        assert ledger.scalar("SELECT COUNT(*) FROM keeps") == 0
        assert ledger.bytes_by_kind_and_state()[("raw", "on_disk")]["disk_bytes"] == 4096


def test_keepers_replace_the_rows_and_set_kept_exactly() -> None:
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        fid = ledger.want_file(conn, relpath="raw/a", kind="raw", keepers=["b", "a", "a"])
    assert ledger.keepers(fid) == ["a", "b"] and ledger.file(fid)["kept"] == 1
    with ledger.transaction() as conn:
        ledger.want_file(conn, relpath="raw/a", kind="raw")  # a caller that does not know: nothing changes
    assert ledger.keepers(fid) == ["a", "b"] and ledger.file(fid)["kept"] == 1
    with ledger.transaction() as conn:
        ledger.want_file(conn, relpath="raw/a", kind="raw", keepers=["c"])
    assert ledger.keepers(fid) == ["c"] and ledger.file(fid)["kept"] == 1
    with ledger.transaction() as conn:
        ledger.want_file(conn, relpath="raw/a", kind="raw", keepers=[])
    assert ledger.keepers(fid) == [] and ledger.file(fid)["kept"] == 0


def test_a_deleted_file_that_a_consumer_now_keeps_is_wanted_again() -> None:
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        fid = ledger.want_file(conn, relpath="raw/a", kind="raw", url="http://a/a", keepers=[])
    _on_disk(ledger, fid, 4096)
    with ledger.transaction() as conn:
        ledger.set_file_state(conn, fid, "deleting")
        ledger.set_file_state(conn, fid, "deleted", disk_bytes=0)
    with ledger.transaction() as conn:
        ledger.want_file(conn, relpath="raw/a", kind="raw", url="http://a/a", keepers=["late"])
    assert ledger.file(fid)["state"] == "wanted" and ledger.keepers(fid) == ["late"]


def test_forgetting_removed_consumers_unkeeps_only_files_they_alone_kept() -> None:
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        alone = ledger.want_file(conn, relpath="raw/alone", kind="raw", keepers=["gone"])
        shared = ledger.want_file(conn, relpath="raw/shared", kind="raw", keepers=["gone", "stays"])
        legacy = ledger.want_file(conn, relpath="raw/legacy", kind="raw", kept=True)  # kept before keeps existed
    assert ledger.forget_consumers(["stays"]) == 2
    assert [ledger.file(i)["kept"] for i in (alone, shared, legacy)] == [0, 1, 1]
    assert ledger.keepers(shared) == ["stays"] and ledger.keepers(alone) == []
    assert [r["id"] for r in ledger.erasable()] == []  # nothing on disk yet
    assert ledger.forget_consumers([]) == 1 and ledger.file(shared)["kept"] == 0


def test_refusals_are_counted_in_the_ledger_and_survive_the_pruning_of_events() -> None:
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        fid = ledger.want_file(conn, relpath="raw/a", kind="raw", url="http://a/a", keepers=["x"])
    assert _refuse(ledger, fid) is not None
    ledger.prune_events(older_than_s=-60.0)  # every event goes
    assert ledger.scalar("SELECT COUNT(*) FROM events") == 0
    assert _refuse(ledger, fid) is not None
    ledger.prune_events(older_than_s=-60.0)
    # the third refusal is the last one allowed: no retry date, whatever the pruning removed
    assert _refuse(ledger, fid) is None
    assert ledger.file(fid)["refusals"] == 3 and refusals_total(ledger) == 3
    assert consumer_figures(ledger, "x")["refusals"] == 3


def test_whole_download_failures_survive_the_pruning_of_events() -> None:
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        fid = ledger.want_file(conn, relpath="raw/a", kind="raw", url="http://a/a")
    for _ in range(2):
        assert ledger.reserve(fid, 10, budget=100)
        downloads.mark_downloading(ledger, fid)
        downloads.record_download_failure(ledger, fid, "raw/a", "bad checksum", 200, state="corrupt", retry_s=60.0)
        ledger.prune_events(older_than_s=-60.0)
        with ledger.transaction() as conn:
            ledger.set_file_state(conn, fid, "wanted")
    assert downloads.download_failures(ledger, fid) == 2


def test_consumer_figures_of_two_overlapping_consumers() -> None:
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        ids = {
            name: ledger.want_file(conn, relpath=f"raw/{name}", kind="raw", url=f"http://a/{name}",
                                   expected_size=size, keepers=keepers)
            for name, size, keepers in (
                ("both_on_disk", 1000, ["a", "b"]), ("a_on_disk", 2000, ["a"]), ("b_wanted", 3000, ["b"]),
                ("both_wanted", None, ["a", "b"]), ("a_refused", 5000, ["a"]), ("b_corrupt", 6000, ["b"]),
                ("nobody", 7000, []),
            )
        }  # fmt: skip
        product = ledger.want_file(conn, relpath="apcat/p.parquet", kind="apcat", keepers=["b"])
        job = ledger.add_job(conn, kind="exposure", key="e", pins=[ids["a_refused"]])
        conn.execute("UPDATE files SET producer_job = ? WHERE id = ?", (job, product))
        ledger.set_job_state(conn, job, "blocked")
    for name, disk_bytes in (("both_on_disk", 4096), ("a_on_disk", 8192), ("nobody", 512)):
        _on_disk(ledger, ids[name], disk_bytes)
    _refuse(ledger, ids["a_refused"])
    _refuse(ledger, ids["a_refused"])
    assert ledger.reserve(ids["b_corrupt"], 10, budget=10**9)
    downloads.mark_downloading(ledger, ids["b_corrupt"])
    downloads.record_download_failure(ledger, ids["b_corrupt"], "raw/b_corrupt", "bad", 200, state="corrupt", retry_s=None)
    assert consumer_figures(ledger, "a") == {
        "on_disk_files": 2, "on_disk_bytes": 4096 + 8192, "lacking_files": 1, "lacking_bytes": 0, "owed_files": 1,
        "missing_files": 2, "missing_bytes": 5000, "refusals": 2,
    }  # fmt: skip
    assert consumer_figures(ledger, "b") == {
        "on_disk_files": 1, "on_disk_bytes": 4096, "lacking_files": 2, "lacking_bytes": 3000, "owed_files": 2,
        "missing_files": 4, "missing_bytes": 3000 + 6000, "refusals": 0,
    }  # fmt: skip
    assert consumer_figures(ledger, "nobody")["on_disk_files"] == 0


def test_a_night_planned_for_other_consumers_is_planned_again_once_per_backfill() -> None:
    changed = PlanRecord(planned=True, consumers_changed=True)
    assert plan_due(changed, now=0.0, burst=True, seen_this_run=False)
    assert not plan_due(changed, now=0.0, burst=True, seen_this_run=True)
    assert plan_due(changed, now=0.0, burst=False, seen_this_run=True)  # a daemon records the new hash as it plans
    assert not plan_due(PlanRecord(planned=True), now=0.0, burst=False, seen_this_run=False)
