"""Whether a job can run now: ``Ready``, ``Wait``, ``Blocked(reason)`` or ``NeedsMaster``.

Pure: the caller gives the job's kind and the facts of its pinned input files; the answer
says what to do and changes nothing. A file whose download was given up for good (parked) is
settled: an exposure that needs it is blocked with the file's name, a job that combines frames
goes on without it. ``NeedsMaster`` means an exposure lacks a usable
master of one kind (its own night's failed, or it never had a master flat): the caller
looks for the nearest night's with :func:`streamer.rules.calibration.choose_fallback`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

#: Input kinds an exposure cannot do without.
ESSENTIAL_KINDS: Final = frozenset({"raw", "masters"})
#: Job kinds that combine downloaded frames and need at least one of them.
FRAME_COMBINING_JOBS: Final = frozenset({"master_bias", "led_flat"})


@dataclass(frozen=True)
class PinnedInput:
    """One input file of a job, as the ledger knows it."""

    file_id: int
    kind: str
    state: str
    attempts: int
    producer_kind: str | None = None
    producer_state: str | None = None
    relpath: str = ""
    #: The file's download was given up for good (the fetcher parked it): it will not come.
    parked: bool = False


@dataclass(frozen=True)
class Ready:
    """Every input is settled: submit the job."""


@dataclass(frozen=True)
class Wait:
    """An input is still coming (a download, or a master being made)."""


@dataclass(frozen=True)
class Blocked:
    """The job can never run; ``reason`` says why."""

    reason: str


@dataclass(frozen=True)
class NeedsMaster:
    """An exposure needs a master of ``producer_kind`` from another night; ``replaces`` is the failed one."""

    producer_kind: str
    replaces: int | None


Readiness = Ready | Wait | Blocked | NeedsMaster


def is_settled(item: PinnedInput, *, burst: bool, max_missing_attempts: int) -> bool:
    """On disk, or given up: parked, or missing in burst mode (nothing waits for a retry) or after the last attempt."""
    if item.state == "on_disk":
        return True
    if item.parked:
        return True
    if item.state == "missing":
        return burst or item.attempts >= max_missing_attempts
    return False


def readiness(job_kind: str, inputs: Sequence[PinnedInput], *, burst: bool, max_missing_attempts: int) -> Readiness:
    """Decide whether a job of ``job_kind`` with these pinned inputs can run."""
    if job_kind == "exposure":
        for item in inputs:
            if item.kind == "masters" and item.producer_state in ("blocked", "parked"):
                if item.producer_kind == "focalplane":
                    return Blocked("focal-plane normalisation failed for this night and filter")
                return NeedsMaster(producer_kind=item.producer_kind or "", replaces=item.file_id)
        parked = sorted(item.relpath or item.kind for item in inputs if item.kind in ESSENTIAL_KINDS and item.parked)
        if parked:  # it will never come: no need to wait for the other inputs
            return Blocked(f"inputs cannot be obtained: download given up for {', '.join(parked)}")
    if any(not is_settled(item, burst=burst, max_missing_attempts=max_missing_attempts) for item in inputs):
        return Wait()
    if job_kind == "exposure":
        lost = sorted({item.kind for item in inputs if item.kind in ESSENTIAL_KINDS and item.state != "on_disk"})
        if lost:
            return Blocked(f"input not available: {', '.join(lost)}")
        if not any(item.kind == "masters" and item.producer_kind == "master_flat" for item in inputs):
            return NeedsMaster(producer_kind="master_flat", replaces=None)
    elif job_kind in FRAME_COMBINING_JOBS and not any(item.kind == "raw" and item.state == "on_disk" for item in inputs):
        return Blocked("no input frame could be downloaded")
    return Ready()
