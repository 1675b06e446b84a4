"""``streamer status --json`` on a ledger of 1,000,000 file rows, against a plain full scan of the files table.

Run: ``.venv/bin/python -m bench.status [--rows N]``. The ledger is built in a temporary
directory (about eight nights of the full camera: raws, headers, masks, catalogues), then
``streamer status --json`` runs as a subprocess (what an operator sees, start-up
included) and in-process; the baseline is one ``SELECT COUNT(*), SUM(disk_bytes) FROM
files`` over the same file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streamer.config import load_config
from streamer.ledger.core import Ledger
from streamer.service.status import collect

STATES = ("on_disk", "deleted", "wanted", "missing")
KINDS = ("raw", "sciimg_header", "mskimg", "apcat")


def build_ledger(path: Path, rows: int) -> None:
    """Fill a ledger with ``rows`` files and one job per 10 files, pinning half of the on-disk ones."""
    with Ledger.open(path) as ledger, ledger.transaction() as conn:
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO files (relpath, url, kind, state, expected_size, disk_bytes, kept, updated, fetched_at) "
            "SELECT 'raw/' || i, 'http://127.0.0.1/' || i, "
            f"CASE i % 4 WHEN 0 THEN '{KINDS[0]}' WHEN 1 THEN '{KINDS[1]}' WHEN 2 THEN '{KINDS[2]}' ELSE '{KINDS[3]}' END, "
            f"CASE i % 7 WHEN 0 THEN '{STATES[2]}' WHEN 1 THEN '{STATES[3]}' WHEN 2 THEN '{STATES[1]}' ELSE '{STATES[0]}' END, "
            "30000000, CASE WHEN i % 7 > 2 THEN 30003200 ELSE 0 END, i % 13 = 0, 1.7e9 + i, 1.7e9 + i FROM n",
            (rows - 1,),
        )
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO jobs (kind, key, state, created, finished) "
            "SELECT 'exposure', 'exposure:' || i, CASE WHEN i % 3 = 0 THEN 'done' ELSE 'waiting' END, 1.7e9, "
            "CASE WHEN i % 3 = 0 THEN 1.7e9 + i ELSE NULL END FROM n",
            (rows // 10 - 1,),
        )
        conn.execute("INSERT INTO pins (file_id, job_id) SELECT id, (id / 10) + 1 FROM files WHERE id % 20 = 5")
        for i in range(2000):
            ledger.event("failed", f"synthetic event {i}", level="warning", conn=conn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp:
        root = Path(tmp) / "store"
        config_path = Path(tmp) / "config.toml"
        config_path.write_text(
            f'[storage]\nroot = "{root}"\nbudget = "600 TB"\n[photometry]\ncatalog_dir = "{tmp}"\n'
            '[[consumers]]\nname = "scene"\nkeep = ["sciimg_header", "mskimg"]\n'
        )
        config = load_config(config_path)
        t0 = time.perf_counter()
        build_ledger(config.storage.ledger_path, args.rows)
        print(f"built a ledger of {args.rows} file rows in {time.perf_counter() - t0:.1f} s")
        with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
            t0 = time.perf_counter()
            ledger.scalar("SELECT COUNT(*), SUM(disk_bytes) FROM files")
            baseline = time.perf_counter() - t0
            t0 = time.perf_counter()
            collect(config, ledger)
            in_process = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "streamer.cli", "--config", str(config_path), "status", "--json"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        command = time.perf_counter() - t0
        assert out.stdout.startswith("{")
    print(f"baseline (one full scan of files): {baseline * 1000:.0f} ms")
    print(f"status collect in-process:         {in_process * 1000:.0f} ms  ({in_process / baseline:.2f} x baseline)")
    print(f"`streamer status --json` command:  {command * 1000:.0f} ms  ({command / baseline:.2f} x baseline)")


if __name__ == "__main__":
    main()
