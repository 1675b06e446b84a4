"""Which nights are due: a backfill's date range, and the nights a follower has reached."""

from __future__ import annotations

import datetime as dt


def night_range(start: dt.date, end: dt.date) -> list[dt.date]:
    """Every night from ``start`` to ``end``, both included."""
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def follow_nights(now: dt.datetime, *, delay_hours: float, first: dt.date | None) -> list[dt.date]:
    """Nights a follower plans at ``now``: from ``first`` (default: the latest ended night) to the latest.

    A night is due ``delay_hours`` after it ends (the UT date of ``now - delay``).
    """
    latest = (now - dt.timedelta(hours=delay_hours)).date()
    return night_range(first or latest, latest)
