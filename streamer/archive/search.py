"""IBE metadata searches: bounded queries and strict CSV parsing.

``/ibe/search/ztf/products/{raw,sci,cal}?WHERE=<sql>&COLUMNS=<a,b>&ct=csv`` answers
one CSV row per file, or an XML document on error. Here an XML body, an empty
body, a missing column, a row of the wrong width or a value of the wrong type
is an error (retried like any transient failure, then raised as SearchError),
never an empty result. Long obsjd ranges are split into bounded queries.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Final

import aiohttp

from streamer.archive.client import (
    ArchiveClient,
    ArchiveError,
    TransientError,
    check_identity_encoding,
    classify_status,
    transient_from_exception,
)
from streamer.errors import StreamerError
from streamer.storage.naming import search_url

RAW_COLUMNS: Final = (
    "field", "ccdid", "filtercode", "expid", "imgtype", "imgtypecode", "filefracday", "obsjd", "exptime",
)  # fmt: skip
SCI_COLUMNS: Final = (
    "field", "ccdid", "qid", "filtercode", "expid", "imgtypecode", "filefracday", "obsjd", "exptime",
    "crpix1", "crpix2", "crval1", "crval2", "cd11", "cd12", "cd21", "cd22",
)  # fmt: skip
_INT_COLUMNS: Final = frozenset({"field", "ccdid", "qid", "rcid", "fid", "nid", "expid", "pid", "infobits", "nframes"})
_FLOAT_COLUMNS: Final = frozenset(
    {"obsjd", "exptime", "seeing", "airmass", "maglimit", "crpix1", "crpix2", "crval1", "crval2",
     "cd11", "cd12", "cd21", "cd22", "ra", "dec"}
)  # fmt: skip
_TEXT_CHECKS: Final[dict[str, Callable[[str], bool]]] = {
    "filefracday": lambda v: re.fullmatch(r"\d{14}", v) is not None,
    "filtercode": lambda v: re.fullmatch(r"z[gri]|bi", v) is not None,
    "imgtypecode": lambda v: v in ("o", "b", "f", "d"),
    "imgtype": lambda v: v in ("object", "bias", "flat", "dark"),
}
#: Inclusive ranges of the integer columns that name things (a ZTF field has six digits in file names).
_INT_RANGES: Final[dict[str, tuple[int, int]]] = {
    "field": (0, 999_999), "ccdid": (1, 16), "qid": (1, 4), "rcid": (0, 63), "fid": (1, 3),
    "expid": (0, 2**63 - 1), "nid": (0, 2**31 - 1), "pid": (0, 2**63 - 1),
}  # fmt: skip
JD_UNIX_EPOCH: Final = 2440587.5
#: Longest obsjd span asked in one query (days); longer ranges are split.
MAX_SPAN_DAYS: Final = 0.25


class SearchError(StreamerError):
    """A search whose answer cannot be trusted (error document, malformed CSV), after retries."""


def parse_search_csv(text: str, columns: Sequence[str], *, source: str = "search") -> list[dict[str, Any]]:
    """Rows of an IBE CSV answer with typed values; SearchError on anything unexpected."""
    stripped = text.lstrip()
    if not stripped:
        raise SearchError(f"{source}: empty answer (expected at least a CSV header line)")
    if stripped.startswith("<"):
        message = re.sub(r"<[^>]+>", " ", stripped)
        message = " ".join(message.split())[:300]
        shown = message or " ".join(stripped[:200].split())  # only tags: show them, on one line
        raise SearchError(f"{source}: the archive answered an error document instead of CSV: {shown}")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [h.strip() for h in next(reader)]
        missing = [c for c in columns if c not in header]
        if missing:
            raise SearchError(f"{source}: CSV header {header} lacks column(s) {', '.join(missing)}")
        rows = []
        for line_no, values in enumerate(reader, start=2):
            if not values or values == [""]:
                continue
            if len(values) != len(header):
                raise SearchError(f"{source}: line {line_no} has {len(values)} values, the header {len(header)}")
            rows.append({name: _convert(name, value.strip(), source, line_no) for name, value in zip(header, values, strict=True)})
    except csv.Error as err:
        raise SearchError(f"{source}: malformed CSV: {err}") from None
    return rows


def _convert(name: str, value: str, source: str, line_no: int) -> Any:
    """A CSV value as its column's type: an integer in range, a finite number, or checked text."""
    if name in _INT_COLUMNS or name in _FLOAT_COLUMNS:
        try:
            if name in _INT_COLUMNS and not re.fullmatch(r"[+-]?[0-9]{1,19}", value):
                raise ValueError(value)
            number: int | float = int(value) if name in _INT_COLUMNS else float(value)
        except ValueError:
            number = math.nan
        low, high = _INT_RANGES.get(name, (-math.inf, math.inf))
        if not (math.isfinite(number) and low <= number <= high):
            expected = f"an integer in [{low}, {high}]" if name in _INT_RANGES else "a finite number"
            raise SearchError(f"{source}: line {line_no}: {name} = {value[:40]!r}: expected {expected}")
        return number
    check = _TEXT_CHECKS.get(name)
    if check is not None and not check(value):
        raise SearchError(f"{source}: line {line_no}: {name} = {value!r} is not a valid value")
    return value


def jd_of(moment: dt.datetime) -> float:
    return moment.replace(tzinfo=dt.UTC).timestamp() / 86400.0 + JD_UNIX_EPOCH


def night_jd_range(night: dt.date) -> tuple[float, float]:
    """obsjd at 00:00 UT of the night's date and of the next date."""
    start = dt.datetime(night.year, night.month, night.day)
    return jd_of(start), jd_of(start + dt.timedelta(days=1))


def split_range(start: float, end: float, max_span: float = MAX_SPAN_DAYS) -> list[tuple[float, float]]:
    """Consecutive sub-ranges of [start, end] of at most ``max_span`` each."""
    if end <= start:
        return [(start, end)]
    pieces = []
    low = start
    while low < end:
        high = min(end, low + max_span)
        pieces.append((low, high))
        low = high
    return pieces


def _sql_list(values: Sequence[Any]) -> str:
    return ", ".join(f"'{v}'" if isinstance(v, str) else str(int(v)) for v in values)


async def search_table(
    client: ArchiveClient, table: str, where: str, columns: Sequence[str]
) -> list[dict[str, Any]]:
    """One IBE query (retried like any request); SearchError when the answer stays unusable."""
    url = search_url(client.base_url, table)
    params = {"WHERE": where, "COLUMNS": ",".join(columns), "ct": "csv"}
    source = f"IBE search {table} WHERE {where}"

    async def query() -> list[dict[str, Any]]:
        try:
            async with client.session.get(url, params=params) as response:
                if response.status != 200:
                    raise classify_status(response.status, response.reason or "", response.headers)
                check_identity_encoding(response.headers)
                text = await response.text(encoding="utf-8", errors="strict")
        except ArchiveError:
            raise
        except UnicodeDecodeError:
            raise TransientError(f"{source}: the answer is not UTF-8 text", outage_like=False) from None
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as err:
            raise transient_from_exception(err, client.credentials) from None
        try:
            return parse_search_csv(text, columns, source=source)
        except SearchError as err:
            raise TransientError(str(err), status=200, outage_like=False) from None

    try:
        return await client.retrying(query)
    except ArchiveError as err:
        status = f" (HTTP {err.status})" if err.status and err.status != 200 else ""
        raise SearchError(f"{source}: {err.reason}{status}") from None


async def search_night(
    client: ArchiveClient,
    table: str,
    night: dt.date,
    ccds: Sequence[int],
    columns: Sequence[str],
    *,
    imgtypes: Sequence[str] = (),
    max_span_days: float = MAX_SPAN_DAYS,
) -> list[dict[str, Any]]:
    """Every row of ``table`` for the night (filefracday's date) and CCDs, in bounded obsjd pieces."""
    start, end = night_jd_range(night)
    prefix = night.strftime("%Y%m%d")
    where_tail = f" AND ccdid IN ({_sql_list(ccds)})"
    if imgtypes:
        where_tail += f" AND imgtype IN ({_sql_list(imgtypes)})"
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for low, high in split_range(start, end, max_span_days):
        where = f"obsjd BETWEEN {low:.6f} AND {high:.6f}{where_tail}"
        for row in await search_table(client, table, where, columns):
            if not str(row["filefracday"]).startswith(prefix):
                continue
            key = (row["filefracday"], row["ccdid"], row.get("qid"), row.get("imgtypecode"))
            seen.setdefault(key, row)
    return sorted(seen.values(), key=lambda r: (r["obsjd"], r["ccdid"], r.get("qid") or 0))
