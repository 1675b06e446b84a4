"""What the ledger's meta says of the disk, written by the running service and read by ``status``:
the disk pause (``disk.pause``, :meth:`DiskPause.describe` as JSON) and the budget in effect."""

from __future__ import annotations

from typing import Any, Final

from streamer.config import format_size

PAUSE_META_KEY: Final = "disk.pause"
BUDGET_META_KEY: Final = "budget.in_effect"


def pause_line(state: dict[str, Any]) -> str | None:
    """The one line that says the disk pause (from :meth:`DiskPause.describe`), or None when nothing waits."""
    if not state.get("waiting"):
        return None
    what = "downloads and new tasks wait" if state.get("paused") else "downloads wait"
    return f"paused: disk full ({format_size(state.get('free_bytes', 0))} free): {what} for {format_size(state.get('need_bytes', 0))}"
