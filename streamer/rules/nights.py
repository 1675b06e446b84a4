"""Which nights are due: a backfill's date range, and the nights a follower has reached."""

from __future__ import annotations

import datetime as dt


def night_range(start: dt.date, end: dt.date) -> list[dt.date]:
    """Every night from ``start`` to ``end``, both included."""
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def night_ends_at(night: dt.date) -> float:
    """The night's end as a POSIX time: midnight UTC after the night's date (ZTF nights end by 13:00 UTC)."""
    return dt.datetime.combine(night + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC).timestamp()


def follow_nights(now: dt.datetime, *, delay_hours: float, first: dt.date | None) -> list[dt.date]:
    """Nights a follower plans at ``now``: from ``first`` (default: the latest due night) to the latest due.

    A night is due ``delay_hours`` after it ends (:func:`night_ends_at`).
    """
    latest = now.date()
    while night_ends_at(latest) + delay_hours * 3600.0 > now.timestamp():
        latest -= dt.timedelta(days=1)
    return night_range(first or latest, latest)
