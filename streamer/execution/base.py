"""The interface between the service and a compute back end, and the failures that mean "run it again"."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from streamer.errors import StreamerError
from streamer.rules.affinity import Slot

__all__ = ["BrokenProcessPool", "ClusterLost", "Executor", "Slot", "TaskDropped", "WorkerLost"]


class WorkerLost(Exception):
    """The process running a task died (killed, out of memory): the task is retried elsewhere."""


class TaskDropped(Exception):
    """The cluster dropped the task because its scheduler went away: not the job's doing, so not
    counted against it; the job runs again once the scheduler answers."""


class ClusterLost(StreamerError):
    """The compute cluster cannot be reached any more: the service stops (exit 1; systemd restarts it)
    and the next start continues where this one stopped."""


class Executor(Protocol):
    """What the service needs from a compute back end."""

    @property
    def slots(self) -> int:
        """How many tasks may run at once."""
        ...

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]: ...

    def submit_with_affinity(self, key: str | None, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Like ``submit``, preferring a worker whose last job had affinity ``key`` (it holds those masters)."""
        ...

    def affinity_slots(self) -> list[Slot]:
        """Each worker's last affinity key, load and capacity, for the dispatcher's choice of jobs."""
        ...

    @property
    def generation(self) -> int:
        """How many times the back end was replaced; a job remembers the generation it was submitted to."""
        ...

    def replace(self, broken_generation: int) -> None:
        """Start afresh after a worker death broke generation ``broken_generation``; no-op if already replaced."""
        ...

    def describe(self) -> dict[str, Any]:
        """Kind, workers and load, for status."""
        ...

    def shutdown(self, *, cancel: bool = False) -> None: ...
