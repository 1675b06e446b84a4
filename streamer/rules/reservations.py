"""Reserving the bytes that jobs will write: in job order, each only if it fits the budget.

Pure: the caller gives the pending outputs in job order with their estimated sizes and the bytes
already committed (on disk plus reserved); the answer is which to reserve now and, when the next
one does not fit, how many bytes it needs (for the evictor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PendingOutput:
    """A file a job will write, not yet reserved."""

    file_id: int
    job_id: int
    size: int


@dataclass(frozen=True)
class ReservationPlan:
    """Outputs to reserve now (a prefix of the pending ones), and the size of the first that does not fit."""

    reserve: tuple[PendingOutput, ...]
    blocked_size: int

    @property
    def complete(self) -> bool:
        return self.blocked_size == 0


def fits(committed: int, size: int, *, overhead: int, budget: int) -> bool:
    """Whether ``size`` more bytes fit: committed bytes, the untracked overhead and the new bytes within the budget."""
    return committed + overhead + size <= budget


def plan_reservations(pending: Sequence[PendingOutput], *, committed: int, overhead: int, budget: int) -> ReservationPlan:
    """Reserve in order while each fits; stop at the first that does not, so later jobs never overtake it."""
    chosen: list[PendingOutput] = []
    for output in pending:
        if not fits(committed, output.size, overhead=overhead, budget=budget):
            return ReservationPlan(tuple(chosen), max(output.size, 1))
        chosen.append(output)
        committed += output.size
    return ReservationPlan(tuple(chosen), 0)
