"""Property tests of every parser of outside input: for any input, a result or one of the project's own errors.

Each parser gets 2,000 derandomized examples, drawn half from anything at all and half from inputs
built near the valid shape (real column names, FITS structure keywords, configuration keys), so that
the deep branches are reached. A failure is an exception of another type, or an error message of
more than one line. The crashes these tests found are pinned with ``@example``.
"""

from __future__ import annotations

import datetime as dt
import math
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from streamer.archive.search import RAW_COLUMNS, SCI_COLUMNS, SearchError, parse_search_csv
from streamer.archive.verify import BLOCK, VerificationError, verify_fits
from streamer.config import load_config, load_targets, parse_date, parse_size
from streamer.errors import UsageError
from streamer.sim.wherequery import QueryError, compile_where
from streamer.work.exposure import InputFileError, read_sciimg_header

PROPERTY = settings(
    max_examples=2000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def _one_line(err: BaseException) -> None:
    message = str(err)
    assert message and "\n" not in message and "\r" not in message, repr(message)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("property")


# --- the archive's search CSV -----------------------------------------------------------------

_CSV_VALUES = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.sampled_from(["", " ", "nan", "inf", "-inf", "1e999", "0.5", "-0", "zr", "zg", "bi", "o", "b", "f", "object", "bias",
                     "20200924431759", "2459116.93", '"a,b"', '"', "a\nb", "\x00", "<x>", "1_0", "\u0661"]),
)  # fmt: skip


@st.composite
def search_answers(draw: st.DrawFn) -> str:
    columns = list(draw(st.sampled_from([RAW_COLUMNS, SCI_COLUMNS])))
    header = draw(st.permutations(columns + draw(st.lists(st.sampled_from(["ra", "dec", "pid", "x"]), max_size=2))))
    header = header[: len(header) - draw(st.integers(0, 1))]
    lines = [",".join(header)]
    for _ in range(draw(st.integers(0, 3))):
        width = len(header) + draw(st.sampled_from([0, 0, 0, -1, 1]))
        lines.append(",".join(draw(_CSV_VALUES) for _ in range(max(width, 0))))
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n"]))


def _checked_search_rows(text: str, columns: tuple[str, ...]) -> None:
    try:
        rows = parse_search_csv(text, columns)
    except SearchError as err:
        _one_line(err)
        return
    for row in rows:
        assert set(columns) <= set(row)
        assert 1 <= row["ccdid"] <= 16 and 0 <= row["field"] <= 999_999 and row["expid"] >= 0
        assert 1 <= row.get("qid", 1) <= 4
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))


@PROPERTY
@given(st.one_of(st.text(), search_answers()), st.sampled_from([RAW_COLUMNS, SCI_COLUMNS]))
@example("<a>\n<b>", RAW_COLUMNS)  # an error document of tags only was shown as is, newline included
@example(",".join(RAW_COLUMNS) + "\n" + "12345678,13,zr,1,object,o,20200924431759,2459116.9,30", RAW_COLUMNS)  # field
@example(",".join(SCI_COLUMNS) + "\n" + "655,13,9,zr,1,o,20200924431759,2459116.9,30" + ",1" * 8, SCI_COLUMNS)  # qid
@example(",".join(RAW_COLUMNS) + "\n" + "655,13,zr,1,object,o,20200924431759,nan,30", RAW_COLUMNS)  # obsjd
@example(",".join(RAW_COLUMNS) + "\n" + "655,13,zr,1_0,object,o,20200924431759,2459116.9,30", RAW_COLUMNS)  # Python's 1_0
def test_search_csv_gives_rows_in_range_or_a_search_error(text: str, columns: tuple[str, ...]) -> None:
    _checked_search_rows(text, columns)


# --- the simulator's WHERE parser -------------------------------------------------------------

_WHERE_COLUMNS = {"ccdid", "qid", "imgtype", "obsjd", "seeing", "filtercode"}
_WHERE_TOKENS = st.one_of(
    st.sampled_from(sorted(_WHERE_COLUMNS) + ["AND", "OR", "NOT", "IN", "BETWEEN", "LIKE", "IS", "NULL", "nosuch",
                    "=", "!=", "<>", "<", "<=", ">", ">=", "(", ")", ",", "+", "-", "*", "/", "'z%'", "'it''s'", "'",
                    "1e308", "1e999", "9" * 5000, ".5", "0"]),
    st.integers(-(10**6), 10**6).map(str),
    st.text(alphabet=string.printable, max_size=3),
)  # fmt: skip
_ROW_VALUES = st.one_of(st.none(), st.integers(-(10**400), 10**400), st.floats(), st.text(max_size=5), st.booleans())


@PROPERTY
@given(
    st.one_of(st.text(), st.lists(_WHERE_TOKENS, max_size=40).map(" ".join)),
    st.lists(st.fixed_dictionaries({c: _ROW_VALUES for c in sorted(_WHERE_COLUMNS)}), max_size=3),
)
@example("(" * 2000 + "1" + ")" * 2000, [])
@example("NOT " * 2000 + "ccdid = 1", [{"ccdid": 1}])
@example("- " * 2000 + "1 = 1", [{}])
@example(" + ".join(["1"] * 3000) + " = 1", [{}])
@example("9" * 5000 + " = 1", [{}])
@example("ccdid + 1.5 > 0", [{"ccdid": 10**400}])
@example("ccdid / 0.5 > 0", [{"ccdid": 10**400}])
def test_where_parser_evaluates_or_raises_a_query_error(text: str, rows: list[dict[str, Any]]) -> None:
    try:
        evaluate = compile_where(text, _WHERE_COLUMNS)
        for row in rows:
            evaluate(row)
    except QueryError as err:
        _one_line(err)


# --- FITS structure and the sciimg header reader ----------------------------------------------

_STRUCTURE_KEYS = ["SIMPLE", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "PCOUNT", "GCOUNT", "EXTEND",
                   "ZIMAGE", "ZBITPIX", "ZNAXIS", "ZNAXIS1", "ZNAXIS2", "CHECKSUM", "DATASUM", "CTYPE1", "END"]  # fmt: skip
_CARD_VALUES = st.one_of(
    st.integers(-3, 70).map(str),
    st.sampled_from(["T", "F", "8", "16", "-32", "'IMAGE   '", "'BINTABLE'", "'RA---TAN'", "'0'", "'abc'", "abc",
                     "1e3", "1.5", "99999999999999999999", "-1", "''", "' ", "", "1_0", "0x10", "\x7f", "/ 3"]),
)  # fmt: skip


def _card(key: str, value: str) -> bytes:
    text = f"{key:<8}= {value:>20}" if key != "END" else "END"
    return text.encode("ascii", "replace")[:80].ljust(80)


@st.composite
def fits_files(draw: st.DrawFn) -> bytes:
    out = b""
    for hdu in range(draw(st.integers(1, 2))):
        first = ("SIMPLE", "T") if hdu == 0 else ("XTENSION", draw(st.sampled_from(["'IMAGE   '", "'BINTABLE'", "1"])))
        cards = [first] + draw(st.lists(st.tuples(st.sampled_from(_STRUCTURE_KEYS), _CARD_VALUES), max_size=10))
        header = b"".join(_card(k, v) for k, v in cards)
        if draw(st.booleans()):
            header += _card("END", "")
        header = header.ljust(-(-len(header) // BLOCK) * BLOCK or BLOCK, b" ")
        out += header + bytes(BLOCK * draw(st.integers(0, 2)))
    cut = draw(st.sampled_from([0, 0, 0, BLOCK, 80, 1]))
    return out[: len(out) - cut] if cut < len(out) else out


_FITS_BYTES = st.one_of(st.binary(max_size=BLOCK + 100), fits_files())
_KINDS = st.sampled_from(["raw", "mskimg", "sciimg", "sciimg_header", "masters", "detrended"])


@PROPERTY
@given(_FITS_BYTES, _KINDS)
@example(b"".join(_card(k, v) for k, v in [("SIMPLE", "T"), ("BITPIX", "8"), ("NAXIS", "1"), ("NAXIS1", "0"), ("PCOUNT", "abc"),
                                             ("END", "")]), "raw")  # PCOUNT holding text: ValueError
@example(b"".join(_card(k, v) for k, v in [("SIMPLE", "T"), ("BITPIX", "8"), ("NAXIS", "0"), ("ZIMAGE", "T"), ("ZNAXIS", "2"),
                                             ("ZNAXIS1", "'abc'"), ("ZNAXIS2", "1"), ("END", "")]), "sciimg")  # ZNAXIS1 text
@example(b"".join(_card(k, v) for k, v in [("SIMPLE", "T"), ("BITPIX", "8"), ("NAXIS", "0"), ("DATASUM", "'12x'"),
                                             ("END", "")]), "sciimg_header")  # DATASUM holding text
def test_fits_check_passes_or_raises_a_verification_error(scratch: Path, data: bytes, kind: str) -> None:
    path = scratch / "file.fits"
    path.write_bytes(data.ljust(-(-len(data) // BLOCK) * BLOCK, b" ") if data.startswith(b"SIMPLE") else data)
    try:
        verify_fits(path, kind)
    except VerificationError as err:
        _one_line(err)


@pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyWarning")  # a warning is not an error here
@PROPERTY
@example(b"SIMPLE  = \n\x80")  # text with a non-ASCII byte: UnicodeDecodeError escaped
@example(b"SIMPLE  =" + bytes(200))  # found: astropy's VerifyError (unparsable EXTEND card) escaped
@example((_card("SIMPLE", "T") + _card("SIMPLE", "0") + _card("EXTEND", "1") + _card("END", "")).ljust(BLOCK))  # AttributeError
@example((_card("SIMPLE", "T") + _card("NAXIS", "1") + _card("EXTEND", "1") + _card("END", "")).ljust(BLOCK))  # KeyError NAXIS1
@given(st.one_of(_FITS_BYTES, st.binary(max_size=200).map(lambda b: b"SIMPLE  = " + b), st.text(max_size=400).map(
    lambda t: ("SIMPLE  =                    T\n" + t).encode("utf-8", "surrogatepass"))))
def test_sciimg_header_reader_reads_or_raises_an_input_file_error(scratch: Path, data: bytes) -> None:
    path = scratch / "header.fits"
    path.write_bytes(data)
    try:
        read_sciimg_header(path)
    except InputFileError as err:
        _one_line(err)


# --- the targets CSV ---------------------------------------------------------------------------

_TARGET_VALUES = st.one_of(
    st.floats().map(repr), st.integers(-400, 400).map(str),
    st.sampled_from(["", "nan", "inf", "2020-09-24", "2020-02-30", "9999-12-31", "2020-9-1", '"', '"1,2"', "\ufeff"]),
    st.text(max_size=8),
)  # fmt: skip


@st.composite
def targets_files(draw: st.DrawFn) -> str:
    header = draw(st.permutations(["ra", "dec", "radius_deg", "start", "end"]))[: draw(st.integers(2, 5))]
    lines = [",".join(header)]
    for _ in range(draw(st.integers(0, 3))):
        lines.append(",".join(draw(_TARGET_VALUES) for _ in range(len(header) + draw(st.sampled_from([0, 0, -1, 1])))))
    return draw(st.sampled_from(["", "\ufeff"])) + "\n".join(lines)


@PROPERTY
@given(st.one_of(st.text(), targets_files(), st.binary(max_size=100)))
def test_targets_csv_reads_or_raises_a_usage_error(scratch: Path, content: str | bytes) -> None:
    path = scratch / "targets.csv"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(content)
    try:
        targets = load_targets(path)
    except UsageError as err:
        _one_line(err)
        return
    for target in targets:
        assert 0 <= target.ra < 360 and -90 <= target.dec <= 90 and 0 < target.radius_deg <= 10


# --- size and date strings ---------------------------------------------------------------------

_SIZE_TEXT = st.one_of(
    st.text(),
    st.tuples(
        st.one_of(st.integers(0, 10**30).map(str), st.floats(0, 1e30).map(repr), st.sampled_from(["9" * 400, "1" + "0" * 320, ".5", "1."])),
        st.sampled_from(["", " ", "\n", "\t"]),
        st.sampled_from(["B", "kB", "KB", "MB", "GB", "TB", "PB", "KiB", "MiB", "GiB", "TiB", "PiB", "gb", "", "XB"]),
    ).map("".join),
)


@PROPERTY
@given(_SIZE_TEXT)
@example("9" * 400 + " PB")  # a float overflow: inf bytes
@example("1" + "0" * 320 + " B")
@example("junk\nmore")  # the message repeated the text, newline included
def test_size_strings_give_bytes_or_a_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError as err:
        _one_line(err)
        return
    assert isinstance(size, int) and size >= 0


@PROPERTY
@given(st.one_of(st.text(), st.dates().map(dt.date.isoformat), st.from_regex(r"\d{4}-\d{2}-\d{2}", fullmatch=True)))
@example("2020-02-30\n")
@example("\u0662\u0660\u0662\u0660-\u0660\u0669-\u0662\u0664")  # Arabic-Indic digits match \d
def test_date_strings_give_a_date_or_a_value_error(text: str) -> None:
    try:
        date = parse_date(text)
    except ValueError as err:
        _one_line(err)
        return
    assert date.isoformat() == text


# --- the configuration loader, from TOML text -------------------------------------------------

_SECTIONS = {
    "storage": ["root", "budget", "high_watermark", "low_watermark", "ledger", "readonly_trees"],
    "archive": ["base_url", "max_connections", "connect_timeout_s", "read_timeout_s", "min_rate_bytes_per_s",
                "max_attempts", "missing_retry_hours", "auth"],
    "compute": ["executor", "workers", "scheduler", "worker_wait_s", "memory_per_task", "slurm"],
    "detrend": ["overscan_columns", "overscan_degree", "nonlinearity", "bias_skip_first", "led_weights", "pocket",
                "clip_sigma", "max_calibration_gap_days", "write_detrended"],
    "photometry": ["catalog_dir", "radii", "mask_reject_bits", "isolation_arcsec", "background_box"],
    "backfill": ["ranges", "ccds"],
    "follow": ["enabled", "delay_hours", "poll_minutes"],
    "service": ["max_task_attempts", "log_level", "shutdown_grace_s"],
    "metrics": ["listen"],
    "nosuch": ["x"],
}  # fmt: skip
_TOML_SCALARS = st.one_of(
    st.integers(-(10**400), 10**400), st.integers(-5, 70), st.floats(), st.booleans(), st.dates(), st.text(max_size=6),
    st.sampled_from(["10 GB", "1e999 GB", "9" * 400 + " PB", "auto", "local", "dask", "http://127.0.0.1:9",
                     "https://[::1]:0", "tcp://h:1", "127.0.0.1:9464", "2020-09-24", "$NOSUCHVAR/x", "~", "x\u0000",
                     dt.datetime(2020, 9, 24, 1, 2, 3), dt.time(1, 2, 3)]),
)  # fmt: skip
_TOML_VALUES = st.one_of(
    _TOML_SCALARS, st.lists(_TOML_SCALARS, max_size=3), st.dictionaries(st.sampled_from(["a", "2", "name"]), _TOML_SCALARS, max_size=2)
)


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) and key.isascii() else _toml_string(key)


def _toml_string(text: str) -> str:
    escaped = "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in text)
    return f'"{escaped}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    lines = draw(st.lists(st.sampled_from(["source = 1", "consumers = 3", '[[consumers]]\nname = "a"\nkeep = ["raw"]']), max_size=1))
    for section in draw(st.lists(st.sampled_from(sorted(_SECTIONS)), unique=True, max_size=5)):
        lines.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(_SECTIONS[section]), unique=True, max_size=4)):
            lines.append(f"{_toml_key(key)} = {_toml_value(draw(_TOML_VALUES))}")
    return "\n".join(lines) + "\n"


@PROPERTY
@given(st.one_of(st.text(), config_texts()))
@example("source = 1\n")  # the Config's own bookkeeping field, taken for a key
@example("x = " + "9" * 5000 + "\n")  # tomllib raises a plain ValueError past 4300 digits
@example('[storage]\nroot = "s"\nbudget = "10 GB"\nhigh_watermark = ' + "9" * 400 + '\n[photometry]\ncatalog_dir = "c"\n')
@example('[storage]\nroot = "s"\nbudget = "' + "9" * 400 + ' PB"\n[photometry]\ncatalog_dir = "c"\n')
def test_config_loads_or_raises_a_usage_error(scratch: Path, text: str) -> None:
    path = scratch / "config.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path, create_dirs=False)
    except UsageError as err:
        _one_line(err)


def _valid_config_lines() -> Iterator[str]:
    yield from ('[storage]', 'root = "s"', 'budget = "10 GB"', "[photometry]", 'catalog_dir = "c"')


def test_the_valid_config_of_the_generator_loads(scratch: Path) -> None:
    """The near-valid shape the strategy builds on is valid itself (so the examples reach past the first key)."""
    path = scratch / "valid.toml"
    path.write_text("\n".join(_valid_config_lines()) + "\n")
    assert load_config(path, create_dirs=False).storage.budget == 10 * 10**9
