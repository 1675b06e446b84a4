"""Configuration: ``config.toml`` into frozen, typed dataclasses, checked key by key.

Every key has a default except ``storage.root``, ``storage.budget`` and
``photometry.catalog_dir``. Every error names the file, the key, the value and
what was expected (``ConfigError``, exit code 2). ``config.toml`` at the top of
the repository documents each key.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import json
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from streamer.errors import MISSING_VALUE, ConfigError, UsageError

PRODUCT_KINDS: Final = ("raw", "sciimg", "sciimg_header", "mskimg", "masters", "detrended", "apcat")
NETWORK_FILESYSTEMS: Final = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "gpfs", "lustre", "fuse.sshfs", "beegfs", "ceph", "fuse.ceph", "glusterfs"}
)
DEFAULT_CONFIG_NAME: Final = "config.toml"
CONFIG_ENV: Final = "STREAMER_CONFIG"

T = TypeVar("T")
Parser = Callable[[Any, str, "_Context"], Any]


@dataclass(frozen=True)
class _Context:
    source: str
    base_dir: Path

    def error(self, key: str, value: object, expected: str) -> ConfigError:
        return ConfigError(self.source, key, value, expected)


# --- value parsers: (value, key, context) -> parsed value ------------------------------------


def _integer(lo: int | None = None, hi: int | None = None) -> Parser:
    def parse(value: Any, key: str, ctx: _Context) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(key, value, _range_text("an integer", lo, hi))
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ctx.error(key, value, _range_text("an integer", lo, hi))
        return value

    return parse


def _number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Parser:
    def parse(value: Any, key: str, ctx: _Context) -> float:
        what = _range_text("a number", lo, hi, lo_open=lo_open)
        if isinstance(value, bool) or not isinstance(value, int | float) or not _is_finite(value):
            raise ctx.error(key, value, what)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise ctx.error(key, value, what)
        if hi is not None and value > hi:
            raise ctx.error(key, value, what)
        return float(value)

    return parse


def _is_finite(value: int | float) -> bool:
    """Whether a number is finite as a float (an integer beyond a float's range is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _range_text(what: str, lo: float | None, hi: float | None, *, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"{what} in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{what} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{what} <= {hi}"
    return what


def _boolean(value: Any, key: str, ctx: _Context) -> bool:
    if not isinstance(value, bool):
        raise ctx.error(key, value, "true or false")
    return value


def _text(value: Any, key: str, ctx: _Context) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ctx.error(key, value, "a non-empty string")
    return value


def _choice(*allowed: str) -> Parser:
    def parse(value: Any, key: str, ctx: _Context) -> str:
        if value not in allowed:
            raise ctx.error(key, value, "one of " + ", ".join(f'"{a}"' for a in allowed))
        return str(value)

    return parse


_URL_EXPECTED: Final = 'an http(s) URL such as "https://irsa.ipac.caltech.edu" (a host, an optional port 1-65535)'
_HOST_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _url(value: Any, key: str, ctx: _Context) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(/[^\s?#]*)?", value):
        raise ctx.error(key, value, _URL_EXPECTED)
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
        ipaddress.ip_address(parts.hostname or "") if parts.netloc.startswith("[") else None
    except ValueError:
        raise ctx.error(key, value, _URL_EXPECTED) from None
    host = parts.hostname or ""
    labels = host.removesuffix(".").split(".")
    plain_host = parts.netloc.startswith("[") or all(_HOST_LABEL.fullmatch(label) for label in labels)
    if not host or not plain_host or port == 0 or parts.netloc.endswith(":"):
        raise ctx.error(key, value, _URL_EXPECTED)
    return value.rstrip("/")


_SIZE_UNITS: Final = {
    "B": 1,
    "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50,
}  # fmt: skip
_SIZE_EXPECTED: Final = 'a size such as "500 GB", "2 TiB" or "123456789 B"'


#: The largest size accepted (an exabyte: far above any disk, far below a float's range).
_MAX_SIZE: Final = 10**18


def parse_size(text: str) -> int:
    """Bytes in a size such as "500 GB", "2 TiB" or "123456789 B" (at most 10**18); ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*([A-Za-z]+)\s*", text, re.ASCII)
    if not match or match[2] not in _SIZE_UNITS:
        raise ValueError(f"{text[:60]!r}: expected {_SIZE_EXPECTED}")
    size = float(match[1]) * _SIZE_UNITS[match[2]]
    if size > _MAX_SIZE:
        raise ValueError(f"{text[:60]!r}: more than {_MAX_SIZE:.0e} bytes")
    return int(round(size))


def format_size(n_bytes: float) -> str:
    """A human size in decimal units, e.g. "1.23 GB"."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n_bytes) >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{int(n_bytes)} B"


def _size(value: Any, key: str, ctx: _Context) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        try:
            size = parse_size(value)
        except ValueError:
            raise ctx.error(key, value, _SIZE_EXPECTED) from None
        if size > 0:
            return size
    raise ctx.error(key, value, _SIZE_EXPECTED + " (greater than zero)")


def parse_date(text: str) -> dt.date:
    """A YYYY-MM-DD date (ASCII digits); ValueError otherwise."""
    if not isinstance(text, str) or not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
        raise ValueError(f"{str(text)[:40]!r}: expected a date YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r}: not a calendar date") from None


def _date(value: Any, key: str, ctx: _Context) -> dt.date:
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    try:
        return parse_date(value)
    except (ValueError, TypeError):
        raise ctx.error(key, value, "a date YYYY-MM-DD") from None


_ENV_REFERENCE: Final = re.compile(r"\$(?:(\w+)|\{([^}]*)\})")


def _path(value: Any, key: str, ctx: _Context) -> Path:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ctx.error(key, value, "a path (string)")
    unset = [m[1] or m[2] for m in _ENV_REFERENCE.finditer(value) if (m[1] or m[2]) not in os.environ]
    if unset:
        raise ctx.error(key, value, f"a path whose environment variables are set (${unset[0]} is not set)")
    path = Path(os.path.expandvars(os.path.expanduser(value)))
    return path if path.is_absolute() else (ctx.base_dir / path)


def _list_of(item: Parser, *, min_len: int = 0, what: str = "a list") -> Parser:
    def parse(value: Any, key: str, ctx: _Context) -> tuple[Any, ...]:
        if not isinstance(value, list) or len(value) < min_len:
            raise ctx.error(key, value, what)
        return tuple(item(v, f"{key}[{i}]", ctx) for i, v in enumerate(value))

    return parse


def _section(cls: type[Any]) -> Parser:
    def parse(value: Any, key: str, ctx: _Context) -> Any:
        if not isinstance(value, dict):
            raise ctx.error(key, value, f"a table [{key}]")
        return _build(cls, value, key, ctx)

    return parse


def _option(parser: Parser, *, default: Any = MISSING_VALUE, doc: str = "") -> Any:
    """A dataclass field that knows how to parse its TOML value."""
    meta = {"parse": parser, "doc": doc}
    if default is MISSING_VALUE:
        return field(metadata=meta)
    if isinstance(default, list | dict):
        raise TypeError("mutable default")
    return field(default=default, metadata=meta)


def _build(cls: type[T], table: Mapping[str, Any], prefix: str, ctx: _Context) -> T:
    known = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("parse") is not None}  # type: ignore[arg-type]
    for key in table:
        if key not in known:
            full = f"{prefix}.{key}" if prefix else key
            raise ctx.error(full, table[key], "no such key (known: " + ", ".join(sorted(known)) + ")")
    values: dict[str, Any] = {}
    for name, fdef in known.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in table:
            values[name] = fdef.metadata["parse"](table[name], full, ctx)
        elif fdef.default is dataclasses.MISSING and fdef.default_factory is dataclasses.MISSING:
            raise ctx.error(full, MISSING_VALUE, "this key is required")
    return cls(**values)


# --- the configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class AuthConfig:
    """IRSA login. The password comes from an environment variable or an owner-only file."""

    username: str = _option(_text)
    password_env: str | None = _option(_text, default=None)
    password_file: Path | None = _option(_path, default=None)


@dataclass(frozen=True)
class ArchiveConfig:
    base_url: str = _option(_url, default="https://irsa.ipac.caltech.edu")
    max_connections: int = _option(_integer(1, 64), default=4)
    connect_timeout_s: float = _option(_number(0, lo_open=True), default=30.0)
    read_timeout_s: float = _option(_number(0, lo_open=True), default=120.0)
    min_rate_bytes_per_s: int = _option(_integer(0), default=10_000)
    min_rate_window_s: float = _option(_number(0, lo_open=True), default=60.0)
    max_attempts: int = _option(_integer(1, 100), default=8)
    missing_retry_hours: float = _option(_number(0), default=24.0)
    missing_max_attempts: int = _option(_integer(1, 100), default=3)
    auth: AuthConfig | None = _option(_section(AuthConfig), default=None)


@dataclass(frozen=True)
class StorageConfig:
    root: Path = _option(_path)
    budget: int = _option(_size)
    high_watermark: float = _option(_number(0, 1, lo_open=True), default=0.90)
    low_watermark: float = _option(_number(0, 1, lo_open=True), default=0.80)
    ledger: Path | None = _option(_path, default=None)
    readonly_trees: tuple[Path, ...] = _option(_list_of(_path), default=())

    @property
    def ledger_path(self) -> Path:
        return self.ledger if self.ledger is not None else self.root / "ledger.sqlite"


def _workers(value: Any, key: str, ctx: _Context) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ctx.error(key, value, 'a positive integer or "auto"')
    return value


@dataclass(frozen=True)
class SlurmConfig:
    queue: str | None = _option(_text, default=None)
    account: str | None = _option(_text, default=None)
    cores: int = _option(_integer(1, 256), default=1)
    processes: int = _option(_integer(1, 256), default=1)
    memory: int = _option(_size, default=4 * 10**9)
    walltime: str = _option(_text, default="04:00:00")
    jobs: int = _option(_integer(1, 10_000), default=1)


@dataclass(frozen=True)
class ComputeConfig:
    executor: str = _option(_choice("local", "dask"), default="local")
    workers: int | str = _option(_workers, default="auto")
    scheduler: str | None = _option(_text, default=None)
    worker_wait_s: float = _option(_number(0), default=300.0)
    memory_per_task: int | None = _option(_size, default=None)
    slurm: SlurmConfig | None = _option(_section(SlurmConfig), default=None)

    @property
    def n_workers(self) -> int:
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        assert isinstance(self.workers, int)
        return self.workers


def _window(value: Any, key: str, ctx: _Context) -> tuple[int, int]:
    what = "[start, end] integers with 0 <= start < end <= 30 (overscan columns in readout order)"
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 0 <= value[0] < value[1] <= 30
    ):
        raise ctx.error(key, value, what)
    return (value[0], value[1])


def _led_weights(value: Any, key: str, ctx: _Context) -> tuple[tuple[int, float], ...]:
    what = 'a table of LED number to weight, e.g. { "2" = 1.0, "3" = 0.5 }'
    if not isinstance(value, dict):
        raise ctx.error(key, value, what)
    out = []
    for led, weight in value.items():
        if not re.fullmatch(r"\d{1,2}", led) or not 1 <= int(led) <= 13:
            raise ctx.error(f"{key}.{led}", weight, "an LED number 1..13 as key")
        out.append((int(led), _number(0, lo_open=True)(weight, f"{key}.{led}", ctx)))
    return tuple(sorted(out))


@dataclass(frozen=True)
class DetrendConfig:
    overscan_columns: tuple[int, int] = _option(_window, default=(5, 25))
    overscan_degree: int = _option(_integer(0, 10), default=8)
    overscan_outlier_nmad: float = _option(_number(0, lo_open=True), default=3.0)
    nonlinearity: str = _option(_choice("after_overscan", "before_overscan", "off"), default="after_overscan")
    bias_skip_first: int = _option(_integer(0, 1000), default=10)
    min_bias_frames: int = _option(_integer(1, 1000), default=5)
    min_flats_per_led: int = _option(_integer(1, 1000), default=2)
    clip_sigma: float = _option(_number(0, lo_open=True), default=3.0)
    flat_normalisation: str = _option(_choice("ccd", "focalplane"), default="ccd")
    led_weights: tuple[tuple[int, float], ...] = _option(_led_weights, default=())
    max_calibration_gap_days: int = _option(_integer(0, 366), default=10)
    write_detrended: bool = _option(_boolean, default=False)
    detrended_quantize_step: float = _option(_number(0, lo_open=True), default=0.25)
    pocket: str = _option(_choice("off", "v0.1"), default="off")


HASH_NEUTRAL_DEFAULTS: dict[tuple[str, str], Any] = {("detrend", "pocket"): "off", ("photometry", "layout"): "streamer"}
"""(section, key): value left out of the configuration hashes when the key has it: keys added after
products were made, so that configurations that do not use them keep their provenance hash."""


@dataclass(frozen=True)
class PhotometryConfig:
    catalog_dir: Path = _option(_path)
    radii: tuple[float, ...] = _option(
        _list_of(_number(0, lo_open=True), min_len=1, what="a non-empty list of radii in pixels"),
        default=(3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0),
    )
    mask_reject_bits: int = _option(_integer(0, 2**16 - 1), default=6141)
    isolation_arcsec: float = _option(_number(0), default=20.0)
    background_box: tuple[int, int] = _option(_list_of(_integer(8, 4096)), default=(192, 220))
    edge_margin_px: float = _option(_number(0), default=0.0)
    layout: str = _option(_choice("streamer", "in2p3"), default="streamer")
    """``streamer``: one apcat per CCD under ``apcat/``; ``in2p3``: one parquet per quadrant as the IN2P3 code
    writes and reads it, under ``ztfin2p3/sci/`` (``streamer.formats.apcat``)."""


@dataclass(frozen=True)
class Target:
    """A sky position whose images must be kept, optionally within [start, end]."""

    ra: float
    dec: float
    radius_deg: float
    start: dt.date | None = None
    end: dt.date | None = None


def load_targets(path: Path) -> tuple[Target, ...]:
    """Read a targets CSV (ra, dec, radius_deg[, start, end]); UsageError with file and line on bad rows."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's BOM is not part of "ra"
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in ("ra", "dec", "radius_deg") if c not in header]
            if missing:
                raise UsageError(
                    f"{path}: missing column(s) {', '.join(missing)}: expected a header ra,dec,radius_deg[,start,end]"
                )
            targets = []
            for row in reader:
                line = reader.line_num
                try:
                    ra, dec, radius = float(row["ra"]), float(row["dec"]), float(row["radius_deg"])
                    start = parse_date(row["start"]) if row.get("start") else None
                    end = parse_date(row["end"]) if row.get("end") else None
                except (TypeError, ValueError):
                    raise UsageError(
                        f"{path}:{line}: {row!r}: expected numbers ra, dec, radius_deg and dates YYYY-MM-DD"
                    ) from None
                if not (0 <= ra < 360 and -90 <= dec <= 90 and 0 < radius <= 10):
                    raise UsageError(f"{path}:{line}: ra={ra} dec={dec} radius_deg={radius}: out of range")
                if start and end and start > end:
                    raise UsageError(f"{path}:{line}: start {start} after end {end}")
                targets.append(Target(ra, dec, radius, start, end))
    except OSError as err:
        raise UsageError(f"{path}: cannot read targets CSV: {err.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"{path}: not a readable CSV: {err}") from None
    return tuple(targets)


def _targets(value: Any, key: str, ctx: _Context) -> tuple[Target, ...]:
    path = _path(value, key, ctx)
    try:
        return load_targets(path)
    except UsageError as err:
        raise UsageError(f"{ctx.source}: {key}: {err}") from None


def _kinds(value: Any, key: str, ctx: _Context) -> tuple[str, ...]:
    what = "a list of product kinds from " + ", ".join(PRODUCT_KINDS)
    if not isinstance(value, list) or not value:
        raise ctx.error(key, value, what)
    for i, kind in enumerate(value):
        if kind not in PRODUCT_KINDS:
            raise ctx.error(f"{key}[{i}]", kind, "one of " + ", ".join(PRODUCT_KINDS))
    return tuple(value)


@dataclass(frozen=True)
class ConsumerConfig:
    """Someone who needs products kept: by kind, and optionally by field, date and sky position."""

    name: str = _option(_text)
    keep: tuple[str, ...] = _option(_kinds)
    fields: tuple[int, ...] | None = _option(_list_of(_integer(0, 999999)), default=None)
    start: dt.date | None = _option(_date, default=None)
    end: dt.date | None = _option(_date, default=None)
    targets: tuple[Target, ...] | None = _option(_targets, default=None)


def _date_range(value: Any, key: str, ctx: _Context) -> tuple[dt.date, dt.date]:
    if not isinstance(value, list) or len(value) != 2:
        raise ctx.error(key, value, '[start, end] dates, e.g. ["2020-09-01", "2020-09-30"]')
    start, end = _date(value[0], f"{key}[0]", ctx), _date(value[1], f"{key}[1]", ctx)
    if start > end:
        raise ctx.error(key, value, "start <= end")
    return (start, end)


@dataclass(frozen=True)
class BackfillConfig:
    ranges: tuple[tuple[dt.date, dt.date], ...] = _option(_list_of(_date_range), default=())
    ccds: tuple[int, ...] = _option(_list_of(_integer(1, 16)), default=tuple(range(1, 17)))


@dataclass(frozen=True)
class FollowConfig:
    enabled: bool = _option(_boolean, default=False)
    delay_hours: float = _option(_number(0), default=6.0)
    poll_minutes: float = _option(_number(0, lo_open=True), default=60.0)


@dataclass(frozen=True)
class ServiceConfig:
    max_task_attempts: int = _option(_integer(1, 100), default=3)
    shutdown_grace_s: float = _option(_number(0), default=20.0)
    event_retention_days: float = _option(_number(0, lo_open=True), default=30.0)
    log_level: str = _option(_choice("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO")


_LISTEN_EXPECTED: Final = 'a "host:port" such as "127.0.0.1:9464" (or a port alone, which binds 127.0.0.1)'


def _listen(value: Any, key: str, ctx: _Context) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or a port alone (loopback) -> (host, port)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ctx.error(key, value, _LISTEN_EXPECTED)
    match = re.fullmatch(r"(?:(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)?:)?([0-9]{1,5})", str(value).strip())
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ctx.error(key, value, _LISTEN_EXPECTED)
    host = (match.group(1) or "127.0.0.1").strip("[]")
    return host, int(match.group(2))


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint: off unless ``listen`` is given."""

    listen: tuple[str, int] | None = _option(_listen, default=None)


@dataclass(frozen=True)
class ReportConfig:
    """The night's QA report (``streamer report``): where it goes, and whether the daemon writes it itself."""

    after_night: bool = _option(_boolean, default=False)
    directory: Path | None = _option(_path, default=None)


def _consumers(value: Any, key: str, ctx: _Context) -> tuple[ConsumerConfig, ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ctx.error(key, value, "an array of tables [[consumers]]")
    consumers = tuple(_build(ConsumerConfig, v, f"{key}[{i}]", ctx) for i, v in enumerate(value))
    names = [c.name for c in consumers]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ctx.error(f"{key}[{i}].name", name, "a name not used by another consumer")
    return consumers


@dataclass(frozen=True)
class Config:
    """The whole effective configuration."""

    storage: StorageConfig = _option(_section(StorageConfig))
    photometry: PhotometryConfig = _option(_section(PhotometryConfig))
    archive: ArchiveConfig = _option(_section(ArchiveConfig), default=ArchiveConfig())
    compute: ComputeConfig = _option(_section(ComputeConfig), default=ComputeConfig())
    detrend: DetrendConfig = _option(_section(DetrendConfig), default=DetrendConfig())
    consumers: tuple[ConsumerConfig, ...] = _option(_consumers, default=())
    backfill: BackfillConfig = _option(_section(BackfillConfig), default=BackfillConfig())
    follow: FollowConfig = _option(_section(FollowConfig), default=FollowConfig())
    service: ServiceConfig = _option(_section(ServiceConfig), default=ServiceConfig())
    metrics: MetricsConfig = _option(_section(MetricsConfig), default=MetricsConfig())
    report: ReportConfig = _option(_section(ReportConfig), default=ReportConfig())
    source: str = field(default="<defaults>", compare=False, repr=False, metadata={"parse": None})

    def config_hash(self) -> str:
        """A stable hash of the effective configuration (for provenance)."""
        plain = {k: v for k, v in _plain(self).items() if k not in ("metrics", "report")}  # operational, not provenance
        for (section, key), neutral in HASH_NEUTRAL_DEFAULTS.items():
            if plain[section].get(key) == neutral:
                del plain[section][key]
        payload = json.dumps(plain, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def consumers_hash(self) -> str:
        """A stable hash of the consumers' settings: a night planned under others is planned again."""
        payload = json.dumps(_plain(self.consumers), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return _plain(self)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "source"}
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path | dt.date):
        return str(obj)
    return obj


def _validate_report(cfg: Config, ctx: _Context) -> None:
    directory = cfg.report.directory
    if cfg.report.after_night and directory is None:
        raise ctx.error("report.directory", None, "a directory for the reports when report.after_night = true")
    if directory is not None and directory.resolve().is_relative_to(cfg.storage.root.resolve()):
        raise ctx.error("report.directory", str(directory), "a directory outside storage.root (the budget does not count reports)")


def _validate(cfg: Config, ctx: _Context) -> None:
    storage = cfg.storage
    if storage.low_watermark >= storage.high_watermark:
        raise ctx.error(
            "storage.low_watermark", storage.low_watermark, f"a fraction below storage.high_watermark ({storage.high_watermark})"
        )
    _validate_report(cfg, ctx)
    auth = cfg.archive.auth
    if auth is not None and (auth.password_env is None) == (auth.password_file is None):
        raise ctx.error("archive.auth", "password_env/password_file", "exactly one of password_env or password_file")
    compute = cfg.compute
    if compute.executor == "dask" and compute.scheduler is None and compute.slurm is None:
        raise ctx.error("compute.scheduler", None, 'a scheduler address "tcp://host:port" or a [compute.slurm] table when executor = "dask"')
    if compute.scheduler is not None and not re.fullmatch(r"(tcp|tls|inproc|ucx)://\S+", compute.scheduler):
        raise ctx.error("compute.scheduler", compute.scheduler, 'an address such as "tcp://host:8786"')
    if len(cfg.photometry.background_box) != 2:
        raise ctx.error("photometry.background_box", list(cfg.photometry.background_box), "[width, height] in pixels")
    radii = cfg.photometry.radii
    if cfg.photometry.layout == "in2p3" and not all(float(r).is_integer() and 1 <= r <= 255 for r in radii):
        # the IN2P3 catalogue stores each radius as uint8 (ztfin2p3/aperture.py)
        raise ctx.error("photometry.radii", list(radii), 'whole pixels in 1..255 with layout = "in2p3" (its r_k columns are uint8)')
    for i, consumer in enumerate(cfg.consumers):
        if consumer.start and consumer.end and consumer.start > consumer.end:
            raise ctx.error(f"consumers[{i}].end", str(consumer.end), f"a date on or after start ({consumer.start})")


def load_config(path: Path | str, *, create_dirs: bool = True) -> Config:
    """Load and check a configuration file; create missing storage directories."""
    path = Path(path)
    source = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{source}: no such configuration file") from None
    except OSError as err:
        raise UsageError(f"{source}: cannot read configuration: {err.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{source}: not UTF-8 text: expected a TOML configuration file") from None
    except ValueError as err:  # TOMLDecodeError, or an integer of more than 4300 digits
        raise UsageError(f"{source}: not valid TOML: {' '.join(str(err).split())}") from None
    return config_from_dict(raw, source=source, base_dir=path.resolve().parent, create_dirs=create_dirs)


def config_from_dict(
    raw: Mapping[str, Any], *, source: str = "<config>", base_dir: Path | None = None, create_dirs: bool = False
) -> Config:
    """Build a Config from an already-parsed TOML table."""
    ctx = _Context(source, base_dir or Path.cwd())
    cfg = _build(Config, {k: v for k, v in raw.items()}, "", ctx)
    cfg = dataclasses.replace(cfg, source=source)
    detrend_table = raw.get("detrend")
    if cfg.photometry.layout == "in2p3" and not (isinstance(detrend_table, Mapping) and "flat_normalisation" in detrend_table):
        # IN2P3 production flatfields with the focal-plane flat (fp_flatfield: True, ztfin2p3/scripts/config.yml)
        cfg = dataclasses.replace(cfg, detrend=dataclasses.replace(cfg.detrend, flat_normalisation="focalplane"))
    _validate(cfg, ctx)
    if create_dirs:
        _prepare_storage(cfg, ctx)
    return cfg


def _prepare_storage(cfg: Config, ctx: _Context) -> None:
    storage = cfg.storage
    for key, directory in (("storage.root", storage.root), ("storage.ledger", storage.ledger_path.parent)):
        if directory.exists() and not directory.is_dir():
            raise ctx.error(key, str(directory), "a directory (this path exists and is not one)")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ctx.error(key, str(directory), f"a directory that can be created ({err.strerror})") from None
    fstype = filesystem_type(storage.ledger_path.parent)
    if fstype in NETWORK_FILESYSTEMS:
        raise ctx.error("storage.ledger", str(storage.ledger_path), f"a path on a local filesystem, not {fstype} (SQLite over a network filesystem is unsafe)")


def filesystem_type(path: Path) -> str | None:
    """The filesystem type of the mount holding ``path`` (Linux /proc/mounts), or None."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, best_type = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        if (target == mount_point or target.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) >= len(best):
            best, best_type = mount_point, parts[2]
    return best_type


def find_config(explicit: str | None) -> Path:
    """The configuration file: --config, then $STREAMER_CONFIG, then ./config.toml."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get(CONFIG_ENV):
        return Path(env)
    candidate = Path.cwd() / DEFAULT_CONFIG_NAME
    if candidate.is_file():
        return candidate
    raise UsageError(f"no configuration: give --config FILE, set ${CONFIG_ENV}, or put {DEFAULT_CONFIG_NAME} in the current directory")
