"""Fault profiles, the deterministic choice of a fault per request, and exact counts of what was injected.

A request's fault depends only on ``(fault seed, key, attempt)``, where ``key`` is the request path (plus
the query string for searches) and ``attempt`` counts earlier requests with the same key (0 first), so
a run is reproducible whatever the interleaving of clients. Transient faults hit only attempts below
``max_faulted_attempts``: with ``flaky``, every request succeeds by attempt ``max_faulted_attempts``
(the fourth, by default) at the latest.

Kinds (HEAD requests get only the status kinds; ``corrupt`` only FITS files; every injected fault is
counted once, under its kind and its key, and logged):

- transient: ``http_500``, ``http_503``, ``http_504``, ``http_429`` (with ``Retry-After: 1``),
  ``reset`` (connection reset after part of the body), ``truncated`` (correct Content-Length, part of
  the body, then the connection closes), ``corrupt`` (FITS only: a byte changed in the primary header
  or in the first extension's header, same length), ``html`` (an HTML page with status 200),
  ``drip`` (the body at ``drip_bytes_per_second``; what is left after ``drip_max_seconds`` at full speed);
- added by ``hostile``: ``missing`` (404 on every attempt for a fraction ``missing_fraction`` of the
  data files, which the search still lists) and ``stall`` (headers and part of the body, then nothing
  until the client leaves or the server stops), for a fraction ``stall_rate`` of all attempts, whatever
  their number: with ``hostile`` a request can fail any number of times.

A TOML profile (``--faults file.toml``) holds any of the ``FaultProfile`` fields at top level, e.g.::

    rate = 0.3                  # probability that a transient fault hits an attempt
    max_faulted_attempts = 3
    kinds = ["http_503", "reset"]   # transient kinds to draw from (default all)
    missing_fraction = 0.0
    stall_rate = 0.0
    drip_bytes_per_second = 200000
    drip_max_seconds = 10.0
    ignore_range = false        # answer Range requests with 200 and the whole file
"""

from __future__ import annotations

import hashlib
import logging
import threading
import tomllib
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from streamer.errors import UsageError

log = logging.getLogger(__name__)

TRANSIENT_KINDS: Final = ("http_500", "http_503", "http_504", "http_429", "reset", "truncated", "corrupt", "html", "drip")
PERMANENT_KINDS: Final = ("missing", "stall")
BODY_KINDS: Final = frozenset({"reset", "truncated", "corrupt", "drip", "stall"})
FITS_ONLY_KINDS: Final = frozenset({"corrupt"})


@dataclass(frozen=True)
class FaultProfile:
    """How often and which faults are injected."""

    name: str = "none"
    rate: float = 0.0
    max_faulted_attempts: int = 3
    kinds: tuple[str, ...] = TRANSIENT_KINDS
    missing_fraction: float = 0.0
    stall_rate: float = 0.0
    drip_bytes_per_second: int = 200_000
    drip_max_seconds: float = 10.0
    ignore_range: bool = False

    def __post_init__(self) -> None:
        for label, value in (("rate", self.rate), ("missing_fraction", self.missing_fraction), ("stall_rate", self.stall_rate)):
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"fault profile {self.name}: {label} = {value!r}: expected a number in [0, 1]")
        unknown = [k for k in self.kinds if k not in TRANSIENT_KINDS]
        if unknown or not self.kinds:
            raise UsageError(f"fault profile {self.name}: kinds = {list(self.kinds)!r}: expected some of {', '.join(TRANSIENT_KINDS)}")
        if self.max_faulted_attempts < 0 or self.drip_bytes_per_second < 1:
            raise UsageError(f"fault profile {self.name}: expected max_faulted_attempts >= 0 and drip_bytes_per_second >= 1")


PROFILES: Final = {
    "none": FaultProfile("none"),
    "flaky": FaultProfile("flaky", rate=0.3),
    "hostile": FaultProfile("hostile", rate=0.3, missing_fraction=0.05, stall_rate=0.03),
}


def load_profile(spec: str) -> FaultProfile:
    """``none``, ``flaky``, ``hostile`` or the path of a TOML file of ``FaultProfile`` fields."""
    if spec in PROFILES:
        return PROFILES[spec]
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--faults {spec!r}: expected none, flaky, hostile or a TOML file")
    try:
        content = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--faults {spec}: not a readable TOML file ({err})") from None
    allowed = {f.name for f in fields(FaultProfile)} - {"name"}
    unknown = sorted(set(content) - allowed)
    if unknown:
        raise UsageError(f"--faults {spec}: unknown keys {', '.join(unknown)}: expected some of {', '.join(sorted(allowed))}")
    if "kinds" in content:
        content["kinds"] = tuple(content["kinds"])
    try:
        return replace(FaultProfile(name=path.name), **content)
    except TypeError as err:
        raise UsageError(f"--faults {spec}: {err}") from None


def uniform(seed: int, *parts: object) -> float:
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass
class FaultCounter:
    """Exact counts of injected faults, per kind and per key (path), and of requests per key.

    Thread-safe; ``snapshot()`` is what ``/_sim/faults`` answers.
    """

    by_kind: Counter[str] = field(default_factory=Counter)
    by_path: dict[str, Counter[str]] = field(default_factory=dict)
    attempts: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def next_attempt(self, key: str) -> int:
        with self._lock:
            attempt = self.attempts[key]
            self.attempts[key] += 1
            return attempt

    def record(self, key: str, kind: str) -> None:
        with self._lock:
            self.by_kind[kind] += 1
            self.by_path.setdefault(key, Counter())[kind] += 1

    def total(self) -> int:
        with self._lock:
            return sum(self.by_kind.values())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": sum(self.by_kind.values()),
                "by_kind": dict(sorted(self.by_kind.items())),
                "by_path": {k: dict(sorted(v.items())) for k, v in sorted(self.by_path.items())},
                "requests": sum(self.attempts.values()),
                "attempts_by_path": dict(sorted(self.attempts.items())),
            }


def choose_fault(profile: FaultProfile, seed: int, key: str, attempt: int, *, is_data: bool, is_fits: bool, is_head: bool) -> str | None:
    """The fault for attempt ``attempt`` of ``key``, or None. Pure: the same arguments give the same answer."""
    if is_data and uniform(seed, "missing", key) < profile.missing_fraction:
        return "missing"
    if not is_head and uniform(seed, "stall", key, attempt) < profile.stall_rate:
        return "stall"
    if attempt >= profile.max_faulted_attempts or uniform(seed, "transient", key, attempt) >= profile.rate:
        return None
    kinds = [
        k for k in profile.kinds
        if not (is_head and k in BODY_KINDS) and not (not is_fits and k in FITS_ONLY_KINDS) and not (k == "html" and is_head)
    ]
    if not kinds:
        return None
    return kinds[int(uniform(seed, "kind", key, attempt) * len(kinds))]
