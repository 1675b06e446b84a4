"""What the service does with a job that failed: requeue, wait for disk, block, fetch its raw again, retry later, or park.

Pure: the caller classifies the error (``streamer.execution.jobs.classify_failure`` knows the
workers' error types) and gives the attempts made before this one, and the worker losses in a row
before this one.

A worker that dies under a job (killed, out of memory, a crash in a compiled library) need not be
the job's fault: one job's crash can break a pool and take the jobs beside it along. So a worker
loss is not an attempt; the job runs again after a short pause (:data:`WORKER_LOST_BACKOFF_S`).
A job whose worker died under it :data:`MAX_WORKER_LOSSES` times in a row is the culprit: it is
parked, so a job that kills every worker it runs on cannot loop for ever. A job that ran beside the
culprit is lost with it once in a while, rarely that many times in a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

#: Seconds to wait before the 1st, 2nd, 3rd and later retries of a failed job.
JOB_BACKOFF_S: Final = (5.0, 30.0, 120.0)
#: Seconds to wait before running a job again after the 1st, 2nd, ... worker loss under it.
WORKER_LOST_BACKOFF_S: Final = (2.0, 10.0)
#: Worker losses in a row under one job after which the job is parked.
MAX_WORKER_LOSSES: Final = 3

ErrorClass = Literal["worker_lost", "disk_full", "blocked", "refetch", "retry"]


@dataclass(frozen=True)
class Requeue:
    """The worker died under the job: run it again after ``delay_s`` seconds, without counting an attempt."""

    delay_s: float


@dataclass(frozen=True)
class WaitForDisk:
    """The filesystem had no room (ENOSPC, EDQUOT): not the job's fault. Back to ready without counting
    the attempt; new work waits until the filesystem has room again."""


@dataclass(frozen=True)
class Block:
    """The job can never succeed (a calibration or WCS is missing): ``reason`` says why."""

    reason: str


@dataclass(frozen=True)
class Refetch:
    """The raw file could not be read: delete it, fetch it again, then retry the job."""


@dataclass(frozen=True)
class Retry:
    """Try again after ``delay_s`` seconds."""

    delay_s: float


@dataclass(frozen=True)
class Park:
    """Give up after the last attempt; the job keeps its error for the operator, after ``reason`` if any."""

    reason: str = ""


FailureAction = Requeue | WaitForDisk | Block | Refetch | Retry | Park


def failure_action(
    error_class: ErrorClass, reason: str, *, attempts_before: int, max_attempts: int, worker_losses_before: int = 0,
    max_worker_losses: int = MAX_WORKER_LOSSES,
) -> FailureAction:  # fmt: skip
    """The action for a failure of ``error_class`` after ``attempts_before`` earlier attempts and
    ``worker_losses_before`` worker losses in a row under the job.

    A raw file is fetched again only once; after that an unreadable raw counts as an ordinary failure.
    """
    if error_class == "worker_lost":
        losses = worker_losses_before + 1
        if losses >= max_worker_losses:
            return Park(f"the worker process died under it {losses} times in a row")
        return Requeue(WORKER_LOST_BACKOFF_S[min(losses, len(WORKER_LOST_BACKOFF_S)) - 1])
    if error_class == "disk_full":
        return WaitForDisk()
    if error_class == "blocked":
        return Block(reason)
    if error_class == "refetch" and attempts_before < 1:
        return Refetch()
    if attempts_before + 1 >= max_attempts:
        return Park()
    return Retry(JOB_BACKOFF_S[min(attempts_before, len(JOB_BACKOFF_S) - 1)])
