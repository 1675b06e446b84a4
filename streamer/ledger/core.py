"""The bookkeeping database: what is on disk, what is wanted, what is pinned, what can go.

One SQLite file (WAL, foreign keys on), opened through sqlite-utils. Numbered
migrations run at open. Every state change is one ``BEGIN IMMEDIATE``
transaction. One writer: the service process holds an exclusive lock on
``<ledger>.lock`` (a POSIX record lock, which child processes do not inherit
and which dies with the process); ``status`` opens the database read-only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import sqlite_utils

from streamer import clock
from streamer.errors import LedgerLockedError, StreamerError

FILE_STATES: Final = ("wanted", "reserved", "downloading", "on_disk", "deleting", "deleted", "missing", "corrupt")
JOB_STATES: Final = ("waiting", "ready", "running", "done", "failed", "parked", "blocked")
FILE_KINDS: Final = ("raw", "sciimg", "sciimg_header", "mskimg", "masters", "detrended", "apcat")

#: Allowed file state transitions (the ARCHITECTURE's state machine, plus restarts).
FILE_TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    "wanted": frozenset({"reserved", "on_disk", "missing", "deleted"}),
    "reserved": frozenset({"downloading", "wanted", "on_disk", "missing"}),
    "downloading": frozenset({"on_disk", "reserved", "wanted", "missing", "corrupt"}),
    "on_disk": frozenset({"deleting", "corrupt", "wanted", "on_disk"}),
    "deleting": frozenset({"deleted"}),
    "deleted": frozenset({"wanted", "on_disk"}),
    "missing": frozenset({"wanted", "reserved", "on_disk", "deleted"}),
    "corrupt": frozenset({"wanted", "reserved", "deleted"}),
}
JOB_TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    "waiting": frozenset({"ready", "blocked", "waiting"}),
    "ready": frozenset({"running", "waiting", "blocked"}),
    "running": frozenset({"done", "failed", "ready", "parked", "blocked"}),
    "failed": frozenset({"ready", "running", "parked", "waiting"}),
    "parked": frozenset({"ready", "waiting"}),
    "blocked": frozenset({"waiting", "ready"}),
    "done": frozenset({"waiting"}),
}


def _check_list(values: Sequence[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: the first schema
    f"""
    CREATE TABLE exposures (
        id INTEGER PRIMARY KEY,
        filefracday TEXT NOT NULL,
        ccdid INTEGER NOT NULL,
        imgtypecode TEXT NOT NULL,
        imgtype TEXT NOT NULL,
        night TEXT NOT NULL,
        field INTEGER NOT NULL,
        filtercode TEXT NOT NULL,
        expid INTEGER,
        obsjd REAL,
        exptime REAL,
        led INTEGER,
        UNIQUE (filefracday, ccdid, imgtypecode)
    );
    CREATE INDEX exposures_night ON exposures (night, ccdid, imgtype);

    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        relpath TEXT NOT NULL UNIQUE,
        url TEXT NOT NULL DEFAULT '',
        kind TEXT NOT NULL CHECK (kind IN ({_check_list(FILE_KINDS)})),
        exposure_id INTEGER REFERENCES exposures (id),
        qid INTEGER,
        night TEXT,
        field INTEGER,
        state TEXT NOT NULL DEFAULT 'wanted' CHECK (state IN ({_check_list(FILE_STATES)})),
        expected_size INTEGER,
        actual_size INTEGER,
        disk_bytes INTEGER NOT NULL DEFAULT 0,
        reserved_bytes INTEGER NOT NULL DEFAULT 0,
        kept INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        http_status INTEGER,
        retry_at REAL,
        updated REAL NOT NULL,
        last_used REAL
    );
    CREATE INDEX files_state ON files (state, kind);
    CREATE INDEX files_exposure ON files (exposure_id);

    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        key TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL DEFAULT 'waiting' CHECK (state IN ({_check_list(JOB_STATES)})),
        night TEXT,
        ccdid INTEGER,
        filtercode TEXT,
        exposure_id INTEGER REFERENCES exposures (id),
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        not_before REAL,
        created REAL NOT NULL,
        started REAL,
        finished REAL,
        result TEXT
    );
    CREATE INDEX jobs_state ON jobs (state, kind);

    CREATE TABLE job_deps (
        job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        needs INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        PRIMARY KEY (job_id, needs)
    ) WITHOUT ROWID;
    CREATE INDEX job_deps_needs ON job_deps (needs);

    CREATE TABLE pins (
        file_id INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
        job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        PRIMARY KEY (file_id, job_id)
    ) WITHOUT ROWID;
    CREATE INDEX pins_job ON pins (job_id);

    CREATE TABLE products (
        id INTEGER PRIMARY KEY,
        file_id INTEGER NOT NULL UNIQUE REFERENCES files (id) ON DELETE CASCADE,
        job_id INTEGER REFERENCES jobs (id),
        kind TEXT NOT NULL,
        night TEXT,
        ccdid INTEGER,
        filtercode TEXT,
        provenance TEXT NOT NULL,
        created REAL NOT NULL
    );

    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        t REAL NOT NULL,
        level TEXT NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        file_id INTEGER,
        job_id INTEGER
    );
    CREATE INDEX events_t ON events (t);

    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: which job produces a file; when it arrived; running totals for status and the budget.
    # (The triggers avoid INSERT OR IGNORE: an outer upsert would override its conflict policy.)
    """
    ALTER TABLE files ADD COLUMN producer_job INTEGER REFERENCES jobs (id);
    ALTER TABLE files ADD COLUMN fetched_at REAL;
    CREATE INDEX files_producer ON files (producer_job);
    CREATE INDEX files_fetched ON files (fetched_at) WHERE fetched_at IS NOT NULL;
    CREATE INDEX files_kept ON files (kind, state) WHERE kept = 1;
    CREATE INDEX jobs_finished ON jobs (finished);
    CREATE TABLE file_totals (
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        files INTEGER NOT NULL DEFAULT 0,
        disk_bytes INTEGER NOT NULL DEFAULT 0,
        reserved_bytes INTEGER NOT NULL DEFAULT 0,
        expected_bytes INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (kind, state)
    );
    INSERT INTO file_totals
        SELECT kind, state, COUNT(*), SUM(disk_bytes), SUM(reserved_bytes), SUM(COALESCE(expected_size, 0))
        FROM files GROUP BY kind, state;
    CREATE TRIGGER files_totals_insert AFTER INSERT ON files BEGIN
        INSERT INTO file_totals (kind, state) SELECT new.kind, new.state
            WHERE NOT EXISTS (SELECT 1 FROM file_totals WHERE kind = new.kind AND state = new.state);
        UPDATE file_totals SET files = files + 1, disk_bytes = disk_bytes + new.disk_bytes,
            reserved_bytes = reserved_bytes + new.reserved_bytes,
            expected_bytes = expected_bytes + COALESCE(new.expected_size, 0)
        WHERE kind = new.kind AND state = new.state;
    END;
    CREATE TRIGGER files_totals_delete AFTER DELETE ON files BEGIN
        UPDATE file_totals SET files = files - 1, disk_bytes = disk_bytes - old.disk_bytes,
            reserved_bytes = reserved_bytes - old.reserved_bytes,
            expected_bytes = expected_bytes - COALESCE(old.expected_size, 0)
        WHERE kind = old.kind AND state = old.state;
    END;
    CREATE TRIGGER files_totals_update AFTER UPDATE OF kind, state, disk_bytes, reserved_bytes, expected_size ON files
    BEGIN
        UPDATE file_totals SET files = files - 1, disk_bytes = disk_bytes - old.disk_bytes,
            reserved_bytes = reserved_bytes - old.reserved_bytes,
            expected_bytes = expected_bytes - COALESCE(old.expected_size, 0)
        WHERE kind = old.kind AND state = old.state;
        INSERT INTO file_totals (kind, state) SELECT new.kind, new.state
            WHERE NOT EXISTS (SELECT 1 FROM file_totals WHERE kind = new.kind AND state = new.state);
        UPDATE file_totals SET files = files + 1, disk_bytes = disk_bytes + new.disk_bytes,
            reserved_bytes = reserved_bytes + new.reserved_bytes,
            expected_bytes = expected_bytes + COALESCE(new.expected_size, 0)
        WHERE kind = new.kind AND state = new.state;
    END;
    """,
    # 3: the disk use over time, for the night's QA report (recorded by the heartbeat, pruned with the events)
    """
    CREATE TABLE disk_samples (
        t REAL PRIMARY KEY,
        disk_bytes INTEGER NOT NULL,
        reserved_bytes INTEGER NOT NULL,
        budget_bytes INTEGER NOT NULL
    );
    """,
    # 4: worker processes that died under a job in a row (streamer.rules.failures parks the job after a few)
    """
    ALTER TABLE jobs ADD COLUMN worker_losses INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: which consumer keeps which file (files.kept stays: "some consumer of the configuration keeps it"),
    # and the archive's refusals and whole-download failures per file as counters, which the pruning of
    # events cannot reset (counted from the events still there). Files kept before this have no row: their
    # night is planned again at the next start (its consumers are unknown), which writes them.
    """
    CREATE TABLE keeps (
        file_id INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
        consumer TEXT NOT NULL,
        PRIMARY KEY (file_id, consumer)
    ) WITHOUT ROWID;
    CREATE INDEX keeps_consumer ON keeps (consumer, file_id);
    ALTER TABLE files ADD COLUMN refusals INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE files ADD COLUMN download_failures INTEGER NOT NULL DEFAULT 0;
    UPDATE files SET
        refusals = (SELECT COUNT(*) FROM events e WHERE e.kind = 'file_missing' AND e.file_id = files.id),
        download_failures = (SELECT COUNT(*) FROM events e WHERE e.kind = 'download_failed' AND e.file_id = files.id);
    """,
)


_COMMITTED_SQL: Final = "SELECT COALESCE(SUM(disk_bytes + reserved_bytes), 0) FROM file_totals"


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into complete SQL statements (trigger bodies hold semicolons)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer
            buffer = ""
    if buffer.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {buffer.strip()[:60]!r}")


class LedgerUnusableError(StreamerError):
    """A ledger that cannot be opened as it is (not SQLite, a directory, a newer schema, a planted lock): exit 2."""

    exit_code = 2


class TransitionError(StreamerError):
    """A state change that the state machine does not allow."""


@dataclass(frozen=True)
class FileRow:
    id: int
    relpath: str
    url: str
    kind: str
    state: str
    expected_size: int | None
    disk_bytes: int
    reserved_bytes: int
    attempts: int


class Ledger:
    """The service's SQLite ledger. Construct with :meth:`open`."""

    def __init__(self, db: sqlite_utils.Database, path: Path | None, lock_fd: int | None, readonly: bool) -> None:
        self.db = db
        self.path = path
        self._lock_fd = lock_fd
        self.readonly = readonly

    # --- opening and closing -------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str, *, readonly: bool = False, lock: bool = True) -> Ledger:
        """Open (and migrate) the ledger; as a writer, take the single-writer lock first."""
        path = Path(path)
        if readonly and not path.exists():
            raise StreamerError(f"{path}: no ledger yet (the service has not run with this configuration)")
        if path.is_dir():
            raise LedgerUnusableError(f"{path}: the ledger path is a directory; expected an SQLite file")
        _check_file_header(path)  # before the lock file and SQLite's -wal/-shm are created beside it
        lock_fd = _acquire_lock(path) if lock and not readonly else None
        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(path, readonly=readonly)
            ledger = cls(sqlite_utils.Database(conn), path, lock_fd, readonly)
            if not readonly:
                ledger._migrate()
            else:
                ledger._check_version()
        except (sqlite3.Error, StreamerError) as err:
            if conn is not None:
                conn.close()
            if lock_fd is not None:
                _release_lock(path, lock_fd)
            if isinstance(err, StreamerError):
                raise
            if _on_readonly_filesystem(path):
                raise LedgerUnusableError(
                    f"{path}: the ledger is on a read-only filesystem (SQLite writes its -wal and -shm files "
                    "beside it, even to read); expected a writable directory"
                ) from None
            raise LedgerUnusableError(f"{path}: not a usable ledger database ({err}); expected an SQLite ledger") from None
        return ledger

    @classmethod
    def memory(cls) -> Ledger:
        """An in-memory ledger for unit tests."""
        conn = sqlite3.connect(":memory:", isolation_level=None)
        conn.execute("PRAGMA foreign_keys=ON")
        ledger = cls(sqlite_utils.Database(conn), None, None, False)
        ledger._migrate()
        return ledger

    def close(self) -> None:
        self.db.conn.close()
        if self._lock_fd is not None and self.path is not None:
            _release_lock(self.path, self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        version = self.db.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise LedgerUnusableError(
                f"{self.path}: ledger schema {version} is newer than this program ({len(MIGRATIONS)}); "
                "expected an older or equal schema (upgrade streamer)"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction() as conn:
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")

    def _check_version(self) -> None:
        version = self.db.conn.execute("PRAGMA user_version").fetchone()[0]
        if version != len(MIGRATIONS):
            raise LedgerUnusableError(f"{self.path}: ledger schema {version}, this program reads {len(MIGRATIONS)}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any error."""
        if self.readonly:
            raise StreamerError("the ledger is open read-only")
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def scalar(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        row = self.db.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        cursor = self.db.conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    # --- events ----------------------------------------------------------------------------

    def event(
        self,
        kind: str,
        message: str,
        *,
        level: str = "info",
        file_id: int | None = None,
        job_id: int | None = None,
        conn: sqlite3.Connection | None = None,
    ) -> None:
        """Append to the event log (inside the caller's transaction when ``conn`` is given)."""
        sql = "INSERT INTO events (t, level, kind, message, file_id, job_id) VALUES (?, ?, ?, ?, ?, ?)"
        params = (clock.now(), level, kind, message, file_id, job_id)
        if conn is not None:
            conn.execute(sql, params)
        else:
            with self.transaction() as own:
                own.execute(sql, params)

    def prune_events(self, *, older_than_s: float, keep_at_most: int = 100_000) -> int:
        """Drop events older than the retention, and all but the newest ``keep_at_most``."""
        with self.transaction() as conn:
            removed = conn.execute("DELETE FROM events WHERE t < ?", (clock.now() - older_than_s,)).rowcount
            removed += conn.execute(
                "DELETE FROM events WHERE id <= (SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (keep_at_most,),
            ).rowcount
        return int(removed)

    # --- exposures and files ---------------------------------------------------------------

    def upsert_exposure(self, conn: sqlite3.Connection, **row: Any) -> int:
        """Insert an exposure once (keyed by filefracday, ccdid, imgtypecode); fill in what was unknown."""
        columns = ", ".join(row)
        placeholders = ", ".join(f":{c}" for c in row)
        updates = ", ".join(
            f"{c} = COALESCE(excluded.{c}, {c})" for c in row if c not in ("filefracday", "ccdid", "imgtypecode")
        )
        conn.execute(
            f"INSERT INTO exposures ({columns}) VALUES ({placeholders}) "
            f"ON CONFLICT (filefracday, ccdid, imgtypecode) DO UPDATE SET {updates}",
            row,
        )
        found = conn.execute(
            "SELECT id FROM exposures WHERE filefracday = ? AND ccdid = ? AND imgtypecode = ?",
            (row["filefracday"], row["ccdid"], row["imgtypecode"]),
        ).fetchone()
        return int(found[0])

    def want_file(
        self,
        conn: sqlite3.Connection,
        *,
        relpath: str,
        kind: str,
        url: str = "",
        exposure_id: int | None = None,
        qid: int | None = None,
        night: str | None = None,
        field: int | None = None,
        expected_size: int | None = None,
        kept: bool = False,
        keepers: Sequence[str] | None = None,
    ) -> int:
        """Record a file as wanted, once; a file already known keeps its state. Returns its id.

        A file registered without metadata (by ``reconcile``) gets it filled in here. ``keepers``:
        the consumers that keep it, replacing its ``keeps`` rows, and ``kept`` is then whether there
        is one; without them ``kept`` is only ever raised. A ``deleted`` file that is kept is wanted again.
        """
        if kind not in FILE_KINDS:
            raise ValueError(f"file kind {kind!r}: expected one of {', '.join(FILE_KINDS)}")
        conn.execute(
            "INSERT INTO files (relpath, url, kind, exposure_id, qid, night, field, expected_size, kept, updated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (relpath) DO UPDATE SET "
            "url = CASE WHEN url = '' THEN excluded.url ELSE url END, "
            "exposure_id = COALESCE(exposure_id, excluded.exposure_id), "
            "qid = COALESCE(qid, excluded.qid), night = COALESCE(night, excluded.night), "
            "field = COALESCE(field, excluded.field), "
            "expected_size = COALESCE(excluded.expected_size, expected_size), "
            f"kept = {'excluded.kept' if keepers is not None else 'MAX(kept, excluded.kept)'}, "
            "state = CASE WHEN state = 'deleted' AND excluded.kept = 1 THEN 'wanted' ELSE state END",
            (relpath, url, kind, exposure_id, qid, night, field, expected_size,
             int(bool(keepers)) if keepers is not None else int(kept), clock.now()),
        )  # fmt: skip
        file_id = int(conn.execute("SELECT id FROM files WHERE relpath = ?", (relpath,)).fetchone()[0])
        if keepers is not None:
            names = sorted(set(keepers))
            marks = ",".join("?" * len(names))
            conn.execute(f"DELETE FROM keeps WHERE file_id = ? AND consumer NOT IN ({marks})", (file_id, *names))
            conn.executemany(
                "INSERT INTO keeps (file_id, consumer) VALUES (?, ?) ON CONFLICT DO NOTHING", [(file_id, n) for n in names]
            )
        return file_id

    def keepers(self, file_id: int) -> list[str]:
        """The consumers that keep a file, by the ``keeps`` rows (sorted)."""
        rows = self.db.conn.execute("SELECT consumer FROM keeps WHERE file_id = ? ORDER BY consumer", (file_id,))
        return [str(r[0]) for r in rows]

    def forget_consumers(self, names: Sequence[str]) -> int:
        """Drop the ``keeps`` rows of consumers not in ``names`` (the configuration's); a file left with no
        row is no longer kept. Files kept before ``keeps`` existed (no row at all) are left as they are.
        Returns how many rows went.
        """
        marks = ",".join("?" * len(names))
        with self.transaction() as conn:
            gone = conn.execute(
                f"SELECT file_id FROM keeps WHERE consumer NOT IN ({marks})", tuple(names)
            ).fetchall()
            removed = conn.execute(f"DELETE FROM keeps WHERE consumer NOT IN ({marks})", tuple(names)).rowcount
            conn.executemany(
                "UPDATE files SET kept = 0 WHERE id = ? AND NOT EXISTS (SELECT 1 FROM keeps WHERE file_id = ?)",
                [(r[0], r[0]) for r in gone],
            )
        return int(removed)

    def file(self, file_id: int) -> dict[str, Any]:
        found = self.rows("SELECT * FROM files WHERE id = ?", (file_id,))
        if not found:
            raise KeyError(file_id)
        return found[0]

    def file_by_relpath(self, relpath: str) -> dict[str, Any] | None:
        found = self.rows("SELECT * FROM files WHERE relpath = ?", (relpath,))
        return found[0] if found else None

    def set_file_state(
        self, conn: sqlite3.Connection, file_id: int, state: str, *, expect: Sequence[str] | None = None, **fields: Any
    ) -> None:
        """Move one file to ``state`` (checked against the state machine), updating ``fields`` too."""
        _transition(conn, "file", file_id, state, FILE_TRANSITIONS, expect, {**fields, "updated": clock.now()})

    # --- the disk budget -------------------------------------------------------------------

    def committed_bytes(self) -> int:
        """Bytes on disk by the ledger's account plus outstanding reservations."""
        return int(self.scalar(_COMMITTED_SQL) or 0)

    def reserve(self, file_id: int, n_bytes: int, *, budget: int, overhead: int = 0) -> bool:
        """Reserve ``n_bytes`` for a download if it fits the budget; the file becomes ``reserved``."""
        with self.transaction() as conn:
            used = conn.execute(_COMMITTED_SQL).fetchone()[0]
            if used + overhead + n_bytes > budget:
                return False
            self.set_file_state(
                conn, file_id, "reserved", expect=("wanted", "missing", "corrupt", "reserved"), reserved_bytes=n_bytes
            )
        return True

    # --- jobs ------------------------------------------------------------------------------

    def add_job(
        self,
        conn: sqlite3.Connection,
        *,
        kind: str,
        key: str,
        needs: Sequence[int] = (),
        pins: Sequence[int] = (),
        **fields: Any,
    ) -> int:
        """Create a job once (by key) with its dependencies and pinned input files; return its id."""
        existing = conn.execute("SELECT id FROM jobs WHERE key = ?", (key,)).fetchone()
        if existing is not None:
            job_id = int(existing[0])
        else:
            columns = ["kind", "key", "created", *fields]
            values = [kind, key, clock.now(), *fields.values()]
            cursor = conn.execute(
                f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", values
            )
            job_id = int(cursor.lastrowid or 0)
        state = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        conn.executemany("INSERT OR IGNORE INTO job_deps (job_id, needs) VALUES (?, ?)", [(job_id, n) for n in needs])
        if state != "done":
            conn.executemany("INSERT OR IGNORE INTO pins (file_id, job_id) VALUES (?, ?)", [(f, job_id) for f in pins])
        return job_id

    def set_job_state(
        self, conn: sqlite3.Connection, job_id: int, state: str, *, expect: Sequence[str] | None = None, **fields: Any
    ) -> None:
        """Move one job to ``state``; a job that is done releases its pins."""
        if "result" in fields and not isinstance(fields["result"], str | None):
            fields["result"] = json.dumps(fields["result"], sort_keys=True)
        _transition(conn, "job", job_id, state, JOB_TRANSITIONS, expect, fields)
        if state == "done":
            conn.execute("DELETE FROM pins WHERE job_id = ?", (job_id,))

    # --- recovery --------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """After an unclean stop: downloads go back to reserved, running jobs back to ready."""
        with self.transaction() as conn:
            downloads = conn.execute(
                "UPDATE files SET state = 'reserved', updated = ? WHERE state = 'downloading'", (clock.now(),)
            ).rowcount
            running = conn.execute("UPDATE jobs SET state = 'ready' WHERE state = 'running'").rowcount
            if downloads or running:
                self.event(
                    "recover",
                    f"restart: {downloads} downloads back to reserved, {running} running jobs back to ready",
                    conn=conn,
                )
        return {"downloads": downloads, "jobs": running}

    # --- queries for status, planning and eviction -----------------------------------------

    def needed_but_missing(self) -> list[dict[str, Any]]:
        """Files that something needs (pinned by an unfinished job, or kept) and that are not on disk."""
        return self.rows(
            "SELECT f.* FROM files f WHERE f.state NOT IN ('on_disk', 'deleting') "
            "AND (f.kept = 1 OR EXISTS (SELECT 1 FROM pins p WHERE p.file_id = f.id)) ORDER BY f.id"
        )

    def erasable(self, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Files on disk that no consumer keeps and no unfinished job pins, least useful first.

        Order: raws and other downloaded inputs before calibration inputs before masters, then
        least recently used.
        """
        sql = (
            "SELECT f.*, CASE "
            "  WHEN f.kind = 'masters' THEN 3 "
            "  WHEN e.imgtype IN ('bias', 'flat') THEN 2 "
            "  ELSE 1 END AS eviction_class "
            "FROM files f LEFT JOIN exposures e ON e.id = f.exposure_id "
            "WHERE f.state = 'on_disk' AND f.kept = 0 AND f.kind != 'apcat' "
            "AND NOT EXISTS (SELECT 1 FROM pins p WHERE p.file_id = f.id) "
            "ORDER BY eviction_class, COALESCE(f.last_used, f.updated), f.id"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return self.rows(sql)

    def bytes_by_kind_and_state(self) -> dict[tuple[str, str], dict[str, int]]:
        """Per (kind, state): file count, bytes on disk, bytes reserved, bytes expected."""
        out: dict[tuple[str, str], dict[str, int]] = {}
        for row in self.rows(
            "SELECT kind, state, files, disk_bytes, reserved_bytes, expected_bytes "
            "FROM file_totals WHERE files > 0 ORDER BY kind, state"
        ):
            out[(row.pop("kind"), row.pop("state"))] = row
        return out

    def jobs_by_kind_and_state(self) -> dict[tuple[str, str], int]:
        return {
            (r["kind"], r["state"]): r["n"]
            for r in self.rows("SELECT kind, state, COUNT(*) AS n FROM jobs GROUP BY kind, state")
        }

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def get_meta(self, key: str) -> str | None:
        value = self.scalar("SELECT value FROM meta WHERE key = ?", (key,))
        return None if value is None else str(value)


def _transition(
    conn: sqlite3.Connection,
    what: str,
    row_id: int,
    state: str,
    transitions: dict[str, frozenset[str]],
    expect: Sequence[str] | None,
    fields: dict[str, Any],
) -> None:
    """Move one row of ``files`` or ``jobs`` (``what`` = "file" or "job") to ``state`` if the state machine allows it."""
    table = {"file": "files", "job": "jobs"}[what]
    current = conn.execute(f"SELECT state FROM {table} WHERE id = ?", (row_id,)).fetchone()
    if current is None:
        raise TransitionError(f"{what} {row_id}: no such {what}")
    old = current[0]
    if expect is not None and old not in expect:
        raise TransitionError(f"{what} {row_id}: is {old}, expected one of {', '.join(expect)}")
    if state != old and state not in transitions[old]:
        raise TransitionError(f"{what} {row_id}: {old} -> {state} is not allowed")
    values = {**fields, "state": state}
    assignments = ", ".join(f"{name} = :{name}" for name in values)
    conn.execute(f"UPDATE {table} SET {assignments} WHERE id = :row_id", {**values, "row_id": row_id})


# POSIX record locks never conflict within one process, so this process's own locks are kept here.
_HELD_LOCKS: set[str] = set()


def _acquire_lock(ledger_path: Path) -> int:
    """Take the single-writer lock beside the ledger, or raise LedgerLockedError naming the holder."""
    lock_path = ledger_path.with_name(ledger_path.name + ".lock")
    key = str(ledger_path.resolve())
    try:
        # O_NOFOLLOW: a planted symlink must not have its target truncated and filled with our pid.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as err:
        if err.errno == errno.EROFS:
            raise LedgerUnusableError(
                f"{lock_path}: the ledger is on a read-only filesystem; expected a writable directory"
            ) from None
        reason = "is a symlink" if err.errno == errno.ELOOP else f"cannot be opened ({err.strerror})"
        raise LedgerUnusableError(f"{lock_path}: the ledger's lock file {reason}; expected a regular file") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LedgerUnusableError(f"{lock_path}: the ledger's lock file is not a regular file")
    try:
        if key in _HELD_LOCKS:
            raise BlockingIOError
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LedgerLockedError(
            f"{ledger_path}: in use by a running service (pid {holder}); "
            "only one run or backfill may write a ledger (status works alongside)"
        ) from None
    _HELD_LOCKS.add(key)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _release_lock(ledger_path: Path, fd: int) -> None:
    os.close(fd)
    _HELD_LOCKS.discard(str(ledger_path.resolve()))


def _on_readonly_filesystem(path: Path) -> bool:
    try:
        return bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY)
    except OSError:
        return False


_SQLITE_MAGIC: Final = b"SQLite format 3\0"


def _has_wal(path: Path) -> bool:
    """A write-ahead log beside the ledger: an interrupted checkpoint (a full disk) leaves the main file
    shorter than its header says, and SQLite completes it from the log."""
    try:
        return os.stat(f"{path}-wal").st_size > 0
    except OSError:
        return False


def _check_file_header(path: Path) -> None:
    """Refuse, from its first 100 bytes alone, a file that is not SQLite, is truncated or has a newer schema.

    Read before anything is created beside the ledger. An absent or empty file is a new ledger.
    The header's page count is trusted only when it is valid (bytes 92-95 equal the change
    counter, bytes 24-27); a schema number lower than this program's may be stale (newer
    changes in the WAL), a higher one never is.
    """
    try:
        with open(path, "rb") as handle:
            header = handle.read(100)
            size = os.fstat(handle.fileno()).st_size
    except FileNotFoundError:
        return
    except OSError as err:
        raise LedgerUnusableError(f"{path}: cannot read the ledger ({err.strerror}); expected a readable SQLite file") from None
    if not header:
        return
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise LedgerUnusableError(f"{path}: not an SQLite database; expected an SQLite ledger")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if header[24:28] == header[92:96] and pages and size < pages * page_size and not _has_wal(path):
        raise LedgerUnusableError(
            f"{path}: truncated ({size} bytes, its header says {pages * page_size}); expected a whole SQLite ledger"
        )
    version = int.from_bytes(header[60:64], "big", signed=True)
    if version > len(MIGRATIONS):
        raise LedgerUnusableError(
            f"{path}: ledger schema {version} is newer than this program ({len(MIGRATIONS)}); "
            "expected an older or equal schema (upgrade streamer)"
        )


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """An SQLite connection set up for the ledger (WAL and full sync for a writer)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=10)
    else:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        if not readonly:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
    except BaseException:
        conn.close()
        raise
    return conn
