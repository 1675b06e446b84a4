"""The disk budget at start (the minimum workable budget, refused below it) and product reservations.

The arithmetic is :mod:`streamer.rules.budget`; the sizes come from :mod:`streamer.ledger.budget`.
"""

from __future__ import annotations

import logging

from streamer.archive.transfer import MAX_FILE_BYTES
from streamer.config import Config, format_size
from streamer.errors import UsageError
from streamer.ledger import budget as sizes
from streamer.ledger.core import Ledger
from streamer.ledger.downloads import forget_implausible_sizes
from streamer.rules.budget import minimum_budget_bytes, product_estimate_bytes
from streamer.storage.paths import master_size_class


def minimum_budget(config: Config, ledger: Ledger) -> int:
    """Bytes below which the service cannot make progress (:func:`streamer.rules.budget.minimum_budget_bytes`)."""
    ledger_bytes = ledger.path.stat().st_size if ledger.path is not None and ledger.path.exists() else 0
    return minimum_budget_bytes(
        permanent_bytes=sizes.permanent_bytes(ledger),
        known_sizes=sizes.largest_size_by_class(ledger),
        pinned_downloads=sizes.pinned_downloads_by_job(ledger),
        ledger_bytes=ledger_bytes,
        flats_read_together=sizes.most_flats_per_focalplane_job(ledger),
    )


log = logging.getLogger(__name__)


def record_minimum(config: Config, ledger: Ledger) -> int:
    """Compute the minimum workable budget and record it for status.

    Sizes no file can have (a HEAD that lied, recorded by an older version) are dropped first, so
    they are asked again and cannot hold the minimum up; ``reconcile --fix`` calls this too.
    """
    forgotten = forget_implausible_sizes(ledger, MAX_FILE_BYTES)
    if forgotten:
        log.warning("dropped %d recorded file sizes above %d bytes: they will be asked again", forgotten, MAX_FILE_BYTES)
    minimum = minimum_budget(config, ledger)
    ledger.set_meta("minimum_budget_bytes", str(minimum))
    return minimum


def check_budget(config: Config, ledger: Ledger) -> int:
    """Refuse to start when ``storage.budget`` is below the minimum; record the minimum for status."""
    minimum = record_minimum(config, ledger)
    if config.storage.budget < minimum:
        raise UsageError(
            f"{config.source}: storage.budget = {format_size(config.storage.budget)} is below the minimum "
            f"workable budget of {format_size(minimum)} ({minimum} B): raise it to at least that"
        )
    return minimum


def estimate_product_bytes(ledger: Ledger, relpath: str, kind: str) -> int:
    """Bytes a product about to be made will take (:func:`streamer.rules.budget.product_estimate_bytes`).

    Masters are compared with masters of the same size class (biases, flats, focal-plane files).
    """
    suffix = master_size_class(relpath) if kind == "masters" else ""
    return product_estimate_bytes(
        kind,
        largest_of_its_sort=sizes.largest_product_size(ledger, kind, suffix),
        largest_raw_flat=sizes.largest_raw_flat_size(ledger),
    )
