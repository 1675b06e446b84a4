"""What the service does with a job that failed: requeue, wait for disk, block, fetch its raw again, retry later, or park.

Pure: the caller classifies the error (``streamer.execution.jobs.classify_failure`` knows the
workers' error types) and gives the attempts made before this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

#: Seconds to wait before the 1st, 2nd, 3rd and later retries of a failed job.
JOB_BACKOFF_S: Final = (5.0, 30.0, 120.0)

ErrorClass = Literal["worker_lost", "disk_full", "blocked", "refetch", "retry"]


@dataclass(frozen=True)
class Requeue:
    """The worker died under the job: run it again at once, without counting an attempt against it."""


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
    """Give up after the last attempt; the job keeps its error for the operator."""


FailureAction = Requeue | WaitForDisk | Block | Refetch | Retry | Park


def failure_action(error_class: ErrorClass, reason: str, *, attempts_before: int, max_attempts: int) -> FailureAction:
    """The action for a failure of ``error_class`` after ``attempts_before`` earlier attempts.

    A raw file is fetched again only once; after that an unreadable raw counts as an ordinary failure.
    """
    if error_class == "worker_lost":
        return Requeue()
    if error_class == "disk_full":
        return WaitForDisk()
    if error_class == "blocked":
        return Block(reason)
    if error_class == "refetch" and attempts_before < 1:
        return Refetch()
    if attempts_before + 1 >= max_attempts:
        return Park()
    return Retry(JOB_BACKOFF_S[min(attempts_before, len(JOB_BACKOFF_S) - 1)])
