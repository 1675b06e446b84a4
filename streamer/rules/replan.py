"""When a night already planned is planned again: it was empty, or it may have been partly ingested.

Pure. IRSA lists a night some hours after it ends, and a search can answer empty once; a
night planned then has no job, and without a second look it would stay empty for ever. IRSA also
ingests a night over hours: a plan made soon after the night ended may hold only part of it.

- A backfill plans every night it is given again when its last plan had no job, or was made less
  than :data:`INGESTION_WINDOW_S` after the night ended (once per run).
- A daemon plans an empty night again :data:`REPLAN_DELAYS_S` after each empty plan, and stops
  looking after the last delay (the night is then taken as empty; a backfill still looks again).
  A night whose plan had jobs but was made within the ingestion window is looked at again after
  the same delays, until a look falls after the window.
- A night whose consumers changed since its last plan (one was added or removed, or its selection
  changed) is planned again at once (once per backfill), so that what each consumer keeps is
  derived again.
- Otherwise a night is not planned again. Planning again only adds: jobs and files are recorded
  once by key, and a job already done keeps what it was made from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: Seconds after the 1st, 2nd, ... empty plan of a night that a daemon plans it again.
REPLAN_DELAYS_S: Final = (3600.0, 6 * 3600.0, 24 * 3600.0, 72 * 3600.0)

#: Seconds after a night's end during which IRSA may still be adding its files.
INGESTION_WINDOW_S: Final = 72 * 3600.0


@dataclass(frozen=True)
class PlanRecord:
    """What the ledger says of a night's plans: planned at all, how many came out empty, and the next look."""

    planned: bool
    empty_plans: int = 0
    replan_at: float | None = None
    #: when the night was last planned (None: by a version that did not record it), and when it ended
    last_plan_at: float | None = None
    night_ends_at: float = 0.0
    #: the consumers changed since the last plan (added, removed or with another selection)
    consumers_changed: bool = False

    @property
    def maybe_partial(self) -> bool:
        """The last plan had jobs but came before IRSA could have finished ingesting the night."""
        return self.last_plan_at is not None and self.last_plan_at < self.night_ends_at + INGESTION_WINDOW_S


def replan_delay(empty_plans: int) -> float | None:
    """Seconds until a daemon plans a night again after its ``empty_plans``-th empty plan; None: no more."""
    if empty_plans < 1 or empty_plans > len(REPLAN_DELAYS_S):
        return None
    return REPLAN_DELAYS_S[empty_plans - 1]


def partial_look_at(looks: int, *, now: float, night_end: float) -> float | None:
    """When a daemon looks again at a night planned with jobs at ``now`` (its ``looks``-th plan within
    the ingestion window); None once this plan came after the window or the delays are used up."""
    if now >= night_end + INGESTION_WINDOW_S:
        return None
    delay = replan_delay(looks)
    return None if delay is None else now + delay


def plan_due(record: PlanRecord, *, now: float, burst: bool, seen_this_run: bool) -> bool:
    """Whether to plan a night now: never planned, or planned empty or maybe partly and due again
    (see the module docstring).

    ``seen_this_run``: this backfill has already planned (or re-planned) the night.
    """
    if not record.planned:
        return True
    if record.consumers_changed:
        return not (burst and seen_this_run)
    if record.empty_plans == 0 and not record.maybe_partial:
        return False
    if burst:
        return not seen_this_run
    return record.replan_at is not None and now >= record.replan_at


def next_look_s(records: list[PlanRecord], *, now: float) -> float | None:
    """Seconds until the earliest re-plan a daemon has scheduled among ``records``; None when there is none."""
    due = [r.replan_at for r in records if r.planned and (r.empty_plans or r.maybe_partial) and r.replan_at is not None]
    return None if not due else max(0.0, min(due) - now)
