"""Which worker a job goes to, and which ready jobs to start, so that workers keep their masters warm.

A worker keeps the masters of the last exposures it ran in memory; a job's affinity key names those
masters (two jobs with the same key read the same master files). Jobs without a key (the masters
themselves) keep their place in job order. Pure: the callers pass what the executor reports of its
workers and the keys of the ready jobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """One worker as the executor sees it: the key of the last job it was given, its load and its capacity."""

    key: str | None
    load: int
    capacity: int = 1

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.load)


def choose_slot(slots: Sequence[Slot], key: str | None) -> int:
    """Index of the slot for a job with affinity ``key``.

    The slot with the most free room (the least loaded when none is free); among those, one whose
    last job had ``key``, then one that never ran a keyed job, then the first.
    """
    if not slots:
        raise ValueError("no slot to choose from")

    def rank(index: int) -> tuple[int, int, int, int]:
        slot = slots[index]
        matches = key is not None and slot.key == key
        return (-slot.free, slot.load, 0 if matches else 1 if slot.key is None else 2, index)

    return min(range(len(slots)), key=rank)


def jobs_for_slots(keys: Sequence[str | None], slots: Sequence[Slot], free: int) -> list[int]:
    """Indices into ``keys`` (the ready jobs' affinity keys, in job order) of up to ``free`` jobs to start now.

    For each free place of a worker: the first job if it has no key (masters go first), else the
    first job with the worker's key, else the first job whose key no other worker holds, else the
    first job. Places beyond those the workers report free take the first jobs left.
    """
    chosen: list[int] = []
    left = list(range(len(keys)))
    places = [i for i, slot in enumerate(slots) for _ in range(slot.free)]
    for place in places[:free]:
        if not left:
            return chosen
        pick = _pick(left, keys, own=slots[place].key, others={s.key for i, s in enumerate(slots) if i != place and s.key is not None})
        chosen.append(pick)
        left.remove(pick)
    chosen.extend(left[: max(0, free - len(chosen))])
    return chosen


def _pick(left: Sequence[int], keys: Sequence[str | None], *, own: str | None, others: set[str]) -> int:
    """The job for one free place of a worker whose last key is ``own``, of the jobs ``left`` (job order)."""
    if keys[left[0]] is None:
        return left[0]
    if own is not None:
        match = next((i for i in left if keys[i] == own), None)
        if match is not None:
            return match
    return next((i for i in left if keys[i] not in others), left[0])
