"""When a night that was planned with nothing in it is planned again.

Pure. IRSA lists a night some hours after it ends, and a search can answer empty once; a
night planned then has no job, and without a second look it would stay empty for ever.

- A backfill plans every night it is given again when its last plan had no job (once per run).
- A daemon plans an empty night again :data:`REPLAN_DELAYS_S` after each empty plan, and stops
  looking after the last delay (the night is then taken as empty; a backfill still looks again).
- A night whose plan has jobs is not planned again, unless the consumers changed since
  (one was added or removed, or its selection changed): then it is planned again at once (once
  per backfill), so that what each consumer keeps is derived again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: Seconds after the 1st, 2nd, ... empty plan of a night that a daemon plans it again.
REPLAN_DELAYS_S: Final = (3600.0, 6 * 3600.0, 24 * 3600.0, 72 * 3600.0)


@dataclass(frozen=True)
class PlanRecord:
    """What the ledger says of a night's plans: planned at all, how many came out empty, and the next look."""

    planned: bool
    empty_plans: int = 0
    replan_at: float | None = None
    #: the consumers changed since the last plan (added, removed or with another selection)
    consumers_changed: bool = False


def replan_delay(empty_plans: int) -> float | None:
    """Seconds until a daemon plans a night again after its ``empty_plans``-th empty plan; None: no more."""
    if empty_plans < 1 or empty_plans > len(REPLAN_DELAYS_S):
        return None
    return REPLAN_DELAYS_S[empty_plans - 1]


def plan_due(record: PlanRecord, *, now: float, burst: bool, seen_this_run: bool) -> bool:
    """Whether to plan a night now: never planned, or planned empty and due again (see the module docstring).

    ``seen_this_run``: this backfill has already planned (or re-planned) the night.
    """
    if not record.planned:
        return True
    if record.consumers_changed:
        return not (burst and seen_this_run)
    if record.empty_plans == 0:
        return False
    if burst:
        return not seen_this_run
    return record.replan_at is not None and now >= record.replan_at


def next_look_s(records: list[PlanRecord], *, now: float) -> float | None:
    """Seconds until the earliest re-plan a daemon has scheduled among ``records``; None when there is none."""
    due = [r.replan_at for r in records if r.planned and r.empty_plans and r.replan_at is not None]
    return None if not due else max(0.0, min(due) - now)
