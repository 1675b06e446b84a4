"""Layer rules that import-linter cannot see: SQL only in the ledger, and small functions in the service and rules.

The files are read as source (``ast``), not imported, so a module that fails to import is still checked.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "streamer"
SQL_ALLOWED = ("ledger", "sim")  # the ledger is the only SQL; the simulator is a separate world
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 200

# A string literal that starts with an SQL statement, upper-case keywords only (prose and log text are
# lower or mixed case). "DELETE" or "BEGIN" alone, as a word in a message, needs what follows it in SQL.
SQL_STATEMENT = re.compile(
    r"""^\s*(?:
        SELECT\s
      | INSERT\s+(?:OR\s+[A-Z]+\s+)?INTO\s
      | REPLACE\s+INTO\s
      | UPDATE\s+\S+\s+SET\s
      | DELETE\s+FROM\s
      | CREATE\s+(?:TEMP\s+|TEMPORARY\s+|UNIQUE\s+|VIRTUAL\s+)?(?:TABLE|INDEX|VIEW|TRIGGER)\s
      | ALTER\s+TABLE\s
      | DROP\s+(?:TABLE|INDEX|VIEW|TRIGGER)\s
      | PRAGMA\s+\w
      | BEGIN(?:\s+(?:DEFERRED|IMMEDIATE|EXCLUSIVE))?(?:\s+TRANSACTION)?\s*;?\s*$
      | WITH\s+(?:RECURSIVE\s+)?\w+(?:\s*\([^)]*\))?\s+AS\s*\(
    )""",
    re.VERBOSE,
)


def _sources(*parts: str) -> Iterator[Path]:
    for part in parts:
        yield from sorted((PACKAGE / part).rglob("*.py"))


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def _sql_literals(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every string literal in ``path`` that starts with an SQL statement.

    Implicitly concatenated literals are one constant to ``ast``; an f-string is checked by its
    leading text.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    found: dict[int, str] = {}  # an f-string's leading text is also a constant of its own: one entry per line
    for node in ast.walk(tree):
        text: str | None = None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                text = first.value
        if text is not None and SQL_STATEMENT.match(text):
            found.setdefault(node.lineno, text.strip().splitlines()[0][:60])
    yield from sorted(found.items())


def test_the_pattern_finds_sql_and_leaves_prose(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        'A = "SELECT path FROM files WHERE state = ?"\n'
        'B = (\n    "UPDATE files SET state = ? "\n    "WHERE id = ?"\n)\n'
        'C = f"DELETE FROM jobs WHERE id IN ({marks})"\n'
        'D = """\n    CREATE TABLE IF NOT EXISTS files (id INTEGER)\n"""\n'
        'E = "PRAGMA journal_mode = WAL"\n'
        'F = "BEGIN IMMEDIATE"\n'
        'G = "WITH todo AS (SELECT 1) SELECT * FROM todo"\n'
        'H = "INSERT OR IGNORE INTO files VALUES (?)"\n'
        'p1 = "select the nearest night"\n'
        'p2 = "DELETE"\n'
        'p3 = "BEGIN at the top"\n'
        'p4 = "Update the ledger"\n'
        'p5 = "UPDATE: state moved"\n'
        'p6 = "WITH the budget at 90 %"\n'
    )
    assert [line for line, _ in _sql_literals(sample)] == [1, 3, 6, 7, 10, 11, 12, 13]


def test_no_sql_outside_the_ledger() -> None:
    offenders = [
        f"{_relative(path)}:{line}: {text!r}"
        for path in _sources(".")
        if path.relative_to(PACKAGE).parts[0] not in SQL_ALLOWED
        for line, text in _sql_literals(path)
    ]
    assert not offenders, "SQL outside streamer/ledger/:\n" + "\n".join(sorted(offenders))


def _spans(path: Path, kinds: tuple[type[ast.AST], ...]) -> Iterator[tuple[str, int, int]]:
    """(name, first line, lines spanned) of every definition of ``kinds`` in ``path``, nested ones too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            assert node.end_lineno is not None
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def _too_long(parts: tuple[str, ...], kinds: tuple[type[ast.AST], ...], limit: int) -> list[str]:
    return sorted(
        f"{_relative(path)}:{line}: {name} is {length} lines"
        for path in _sources(*parts)
        for name, line, length in _spans(path, kinds)
        if length > limit
    )


def test_length_counts_the_whole_definition(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    sample.write_text("@decorator\ndef long():\n" + body + "\n\ndef short():\n    pass\n")
    spans = {name: length for name, _, length in _spans(sample, (ast.FunctionDef,))}
    assert spans == {"long": 61, "short": 2}


@pytest.mark.parametrize("package", ["service", "rules"])
def test_functions_are_short(package: str) -> None:
    long = _too_long((package,), (ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in streamer/{package}/:\n" + "\n".join(long)


def test_service_classes_are_small() -> None:
    long = _too_long(("service",), (ast.ClassDef,), MAX_CLASS_LINES)
    assert not long, f"classes over {MAX_CLASS_LINES} lines in streamer/service/:\n" + "\n".join(long)
