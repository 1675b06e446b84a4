"""A job whose input file's download was given up for good is blocked, naming the file, instead of waiting for ever.

The file is parked the way the fetcher parks it (its failure recorder, after the 3rd download that
failed as a whole: an archive that always serves that file corrupt), in a real (in-memory) ledger;
then the dispatch stage of a daemon (not burst) looks at the job.
"""

from __future__ import annotations

from pathlib import Path

from e2e import offline_config
from streamer.execution.local import LocalExecutor
from streamer.ledger import downloads
from streamer.ledger.core import Ledger
from streamer.rules.download_retry import MAX_FILE_FAILURES
from streamer.service.context import Context
from streamer.service.dispatch import ready_jobs
from streamer.service.fetcher import failed_as_whole

RAW = "raw/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o.fits.fz"
OTHER_RAW = "raw/2020/0924/431760/ztf_20200924431760_000656_zr_c13_o.fits.fz"


def _exposure(ledger: Ledger, key: str, relpath: str) -> tuple[int, int]:
    with ledger.transaction() as conn:
        file_id = ledger.want_file(conn, relpath=relpath, kind="raw", url=f"http://127.0.0.1:9/{relpath}", night="2020-09-24")
        job_id = ledger.add_job(conn, kind="exposure", key=key, night="2020-09-24", ccdid=13, filtercode="zr", pins=[file_id])
    return job_id, file_id


def _fail_download_as_whole(ledger: Ledger, file_id: int) -> None:
    """One download of the file whose body failed verification every time, recorded as the fetcher records it."""
    assert downloads.reserve_download(ledger, file_id, 1000, budget=10**9)
    downloads.mark_downloading(ledger, file_id)
    failed_as_whole(ledger, ledger.file(file_id), "checksum mismatch", 200, state="corrupt")


def test_a_parked_raw_blocks_its_exposure_in_a_daemon_naming_the_file(tmp_path: Path) -> None:
    ledger = Ledger.memory()
    executor = LocalExecutor(1)
    ctx = Context(config=offline_config(tmp_path), ledger=ledger, executor=executor, burst=False)
    parked_job, parked_file = _exposure(ledger, "exposure:20200924431759:c13", RAW)
    retried_job, retried_file = _exposure(ledger, "exposure:20200924431760:c13", OTHER_RAW)
    try:
        for _ in range(MAX_FILE_FAILURES):
            _fail_download_as_whole(ledger, parked_file)
        _fail_download_as_whole(ledger, retried_file)  # one failure: retried in an hour
        assert ledger.file(parked_file)["retry_at"] is None and ledger.file(parked_file)["state"] == "corrupt"
        assert ledger.file(retried_file)["retry_at"] is not None
        assert ready_jobs(ctx, 10) == []
    finally:
        executor.shutdown(cancel=True)
    job = ledger.rows("SELECT state, error FROM jobs WHERE id = ?", (parked_job,))[0]
    assert job["state"] == "blocked"
    assert job["error"] == f"inputs cannot be obtained: download given up for {RAW}"
    assert ledger.scalar("SELECT state FROM jobs WHERE id = ?", (retried_job,)) == "waiting"  # its raw may still come
    assert ledger.scalar("SELECT COUNT(*) FROM pins WHERE job_id = ?", (parked_job,)) == 0  # the blocked job holds nothing
