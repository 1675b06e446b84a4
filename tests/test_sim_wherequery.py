"""The WHERE parser against hand-computed answers."""

from __future__ import annotations

import re
from typing import Any

import pytest

from streamer.sim.wherequery import QueryError, compile_where

COLUMNS = {"ccdid", "qid", "imgtype", "obsjd", "seeing", "filtercode"}
ROWS: list[dict[str, Any]] = [
    {"ccdid": 13, "qid": 1, "imgtype": "bias", "obsjd": 2459116.56, "seeing": None, "filtercode": "bi"},
    {"ccdid": 14, "qid": 2, "imgtype": "flat", "obsjd": 2459116.58, "seeing": None, "filtercode": "zg"},
    {"ccdid": 13, "qid": 3, "imgtype": "object", "obsjd": 2459116.65, "seeing": 2.1, "filtercode": "zr"},
    {"ccdid": 15, "qid": 4, "imgtype": "object", "obsjd": 2459116.70, "seeing": 1.8, "filtercode": "zi"},
    {"ccdid": 2, "qid": 1, "imgtype": "it's", "obsjd": 2459117.1, "seeing": 3.0, "filtercode": "zg"},
]


def matching(where: str) -> list[int]:
    evaluate = compile_where(where, COLUMNS)
    return [i for i, row in enumerate(ROWS) if evaluate(row)]


@pytest.mark.parametrize(
    "where, expected",
    [
        ("imgtype='bias'", [0]),
        ("IMGTYPE = 'object' and ccdid = 13", [2]),
        ("ccdid IN (13,14)", [0, 1, 2]),
        ("ccdid not in (13, 14)", [3, 4]),
        ("obsjd BETWEEN 2459116.5 AND 2459116.6", [0, 1]),
        ("obsjd NOT BETWEEN 2459116.5 AND 2459116.6", [2, 3, 4]),
        ("imgtype = 'bias' OR imgtype = 'flat' AND ccdid = 13", [0]),
        ("(imgtype = 'bias' OR imgtype = 'flat') AND ccdid = 14", [1]),
        ("NOT imgtype = 'object'", [0, 1, 4]),
        ("NOT NOT ccdid = 2", [4]),
        ("filtercode LIKE 'z%'", [1, 2, 3, 4]),
        ("filtercode LIKE '_g'", [1, 4]),
        ("filtercode NOT LIKE 'z_'", [0]),
        ("seeing IS NULL", [0, 1]),
        ("seeing IS NOT NULL AND seeing < 2.5", [2, 3]),
        ("seeing > 1", [2, 3, 4]),
        ("ccdid * 4 + qid - 5 = 50", [2]),
        ("ccdid / 2 = 7.5", [3]),
        ("-ccdid < -14", [3]),
        ("ccdid <> 13 AND ccdid != 14", [3, 4]),
        ("ccdid >= 14 AND ccdid <= 15", [1, 3]),
        ("imgtype = 'it''s'", [4]),
        ("obsjd > 2.4591165e6 AND obsjd < .5e7", [0, 1, 2, 3, 4]),
    ],
)
def test_clauses(where: str, expected: list[int]) -> None:
    assert matching(where) == expected


@pytest.mark.parametrize(
    "where, message",
    [
        ("", "empty"),
        ("ccdid =", "unexpected"),
        ("ccdid = 13 AND", "unexpected"),
        ("(ccdid = 13", "expected ')'"),
        ("ccdid = 13)", "unexpected ')'"),
        ("ccid = 13", "column 'ccid' does not exist"),
        ("ccdid IN 13", "expected '('"),
        ("ccdid BETWEEN 1 OR 2", "expected 'AND'"),
        ("imgtype LIKE bias", "quoted pattern"),
        ("imgtype = 'bias", "unexpected character"),
        ("ccdid NOT = 3", "after NOT"),
        ("ccdid ; DROP", "unexpected character"),
    ],
)
def test_malformed_clauses(where: str, message: str) -> None:
    with pytest.raises(QueryError, match=re.escape(message)):
        compile_where(where, COLUMNS)


def test_comparing_a_number_with_a_string_is_an_error() -> None:
    evaluate = compile_where("ccdid < 'x'", COLUMNS)
    with pytest.raises(QueryError, match="cannot compare"):
        evaluate(ROWS[0])
