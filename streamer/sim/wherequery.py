"""The subset of SQL that IRSA's IBE accepts in ``WHERE``: a tokenizer, a recursive-descent parser and
an evaluator over one row (a dict of column values).

Grammar (keywords case-insensitive)::

    expr       := and_expr (OR and_expr)*
    and_expr   := not_expr (AND not_expr)*
    not_expr   := NOT not_expr | predicate
    predicate  := sum [ cmp sum
                      | [NOT] IN '(' sum (',' sum)* ')'
                      | [NOT] BETWEEN sum AND sum
                      | [NOT] LIKE sum
                      | IS [NOT] NULL ]
    sum        := product (('+' | '-') product)*
    product    := unary (('*' | '/') unary)*
    unary      := '-' unary | '+' unary | atom
    atom       := NUMBER | 'string' | IDENTIFIER | '(' expr ')'
    cmp        := '=' | '!=' | '<>' | '<' | '<=' | '>' | '>='

NULL semantics are simplified: a comparison with a NULL operand is false.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Row = Mapping[str, Any]
Evaluator = Callable[[Row], Any]

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<number>\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+(?:[eE][+-]?\d+)?)
      | (?P<string>'(?:[^']|'')*')
      | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
      | (?P<op><=|>=|<>|!=|=|<|>|\(|\)|,|\+|-|\*|/)
    )""",
    re.VERBOSE,
)
KEYWORDS = {"AND", "OR", "NOT", "IN", "BETWEEN", "LIKE", "IS", "NULL"}
#: Deepest nesting of parentheses accepted (each level costs the parser a few stack frames).
MAX_NESTING = 50
#: Longest number literal accepted (Python refuses to convert integers of more than 4300 digits).
MAX_NUMBER_DIGITS = 400


class QueryError(ValueError):
    """A WHERE clause that does not parse or names an unknown column."""


@dataclass(frozen=True)
class Token:
    kind: str  # 'number', 'string', 'name', 'keyword', 'op', 'end'
    text: str
    position: int


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise QueryError(f"unexpected character {text[position:].lstrip()[:1]!r} at position {position}")
        kind = match.lastgroup or "op"
        value = match.group(kind)
        if kind == "name" and value.upper() in KEYWORDS:
            tokens.append(Token("keyword", value.upper(), match.start(kind)))
        else:
            tokens.append(Token(kind, value, match.start(kind)))
        position = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


def _null_safe(compare: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def checked(left: Any, right: Any) -> bool:
        if left is None or right is None:
            return False
        try:
            return compare(left, right)
        except TypeError:
            raise QueryError(f"cannot compare {left!r} with {right!r}") from None

    return checked


_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "=": _null_safe(lambda a, b: a == b),
    "!=": _null_safe(lambda a, b: a != b),
    "<>": _null_safe(lambda a, b: a != b),
    "<": _null_safe(lambda a, b: a < b),
    "<=": _null_safe(lambda a, b: a <= b),
    ">": _null_safe(lambda a, b: a > b),
    ">=": _null_safe(lambda a, b: a >= b),
}


def _apply(op: str, a: Any, b: Any) -> Any:
    """``a op b`` for two numbers (NULL if either is NULL, or for a division by zero)."""
    if a is None or b is None:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
        raise QueryError(f"arithmetic {op!r} on non-numbers {_shown(a)} and {_shown(b)}")
    try:
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if b == 0:
            return None
        return a / b
    except OverflowError:
        raise QueryError(f"arithmetic {op!r} overflows on {_shown(a)} and {_shown(b)}") from None


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"an integer of {len(str(abs(value)))} digits"
    return text if len(text) <= 60 else text[:57] + "..."


def _fold(first: Evaluator, rest: list[tuple[str, Evaluator]]) -> Evaluator:
    """A left-associative chain ``first op1 e1 op2 e2 ...``, evaluated in a loop (no recursion per term)."""
    if not rest:
        return first

    def evaluate(row: Row) -> Any:
        value = first(row)
        for op, operand in rest:
            value = _apply(op, value, operand(row))
        return value

    return evaluate


def _like(pattern: str) -> re.Pattern[str]:
    parts = [".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL)


class Parser:
    """Parses one WHERE clause into an evaluator; ``columns`` are the names a row may hold."""

    def __init__(self, text: str, columns: set[str]) -> None:
        self.tokens = tokenize(text)
        self.index = 0
        self.columns = columns
        self.depth = 0

    def parse(self) -> Evaluator:
        if self.peek().kind == "end":
            raise QueryError("empty WHERE clause")
        result = self.expr()
        if self.peek().kind != "end":
            token = self.peek()
            raise QueryError(f"unexpected {token.text!r} at position {token.position}")
        return result

    def peek(self) -> Token:
        return self.tokens[self.index]

    def take(self) -> Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def accept(self, kind: str, text: str | None = None) -> bool:
        token = self.peek()
        if token.kind == kind and (text is None or token.text == text):
            self.index += 1
            return True
        return False

    def expect(self, kind: str, text: str) -> None:
        if not self.accept(kind, text):
            token = self.peek()
            found = token.text or "end of clause"
            raise QueryError(f"expected {text!r} at position {token.position}, found {found!r}")

    def expr(self) -> Evaluator:
        terms = [self.and_expr()]
        while self.accept("keyword", "OR"):
            terms.append(self.and_expr())
        if len(terms) == 1:
            return terms[0]
        return lambda row: any(bool(t(row)) for t in terms)

    def and_expr(self) -> Evaluator:
        terms = [self.not_expr()]
        while self.accept("keyword", "AND"):
            terms.append(self.not_expr())
        if len(terms) == 1:
            return terms[0]
        return lambda row: all(bool(t(row)) for t in terms)

    def not_expr(self) -> Evaluator:
        negations = 0
        while self.accept("keyword", "NOT"):
            negations += 1
        inner = self.predicate()
        if negations % 2:
            return lambda row: not bool(inner(row))
        return (lambda row: bool(inner(row))) if negations else inner

    def predicate(self) -> Evaluator:
        left = self.sum()
        token = self.peek()
        if token.kind == "op" and token.text in _COMPARISONS:
            self.take()
            compare = _COMPARISONS[token.text]
            right = self.sum()
            return lambda row: compare(left(row), right(row))
        if self.accept("keyword", "IS"):
            negate = self.accept("keyword", "NOT")
            self.expect("keyword", "NULL")
            return lambda row: (left(row) is None) != negate
        negate = self.accept("keyword", "NOT")
        if self.accept("keyword", "IN"):
            self.expect("op", "(")
            options = [self.sum()]
            while self.accept("op", ","):
                options.append(self.sum())
            self.expect("op", ")")

            def member(row: Row) -> bool:
                value = left(row)
                return value is not None and any(value == option(row) for option in options)

            return (lambda row: not member(row)) if negate else member
        if self.accept("keyword", "BETWEEN"):
            low = self.sum()
            self.expect("keyword", "AND")
            high = self.sum()
            at_least, at_most = _COMPARISONS[">="], _COMPARISONS["<="]

            def between(row: Row) -> bool:
                value = left(row)
                return at_least(value, low(row)) and at_most(value, high(row))

            return (lambda row: not between(row)) if negate else between
        if self.accept("keyword", "LIKE"):
            pattern_token = self.peek()
            if pattern_token.kind != "string":
                raise QueryError(f"expected a quoted pattern after LIKE at position {pattern_token.position}")
            self.take()
            pattern = _like(pattern_token.text[1:-1].replace("''", "'"))

            def like(row: Row) -> bool:
                value = left(row)
                return value is not None and pattern.fullmatch(str(value)) is not None

            return (lambda row: not like(row)) if negate else like
        if negate:
            raise QueryError(f"expected IN, BETWEEN or LIKE after NOT at position {self.peek().position}")
        return left

    def sum(self) -> Evaluator:
        first = self.product()
        rest: list[tuple[str, Evaluator]] = []
        while self.peek().kind == "op" and self.peek().text in ("+", "-"):
            op = self.take().text
            rest.append((op, self.product()))
        return _fold(first, rest)

    def product(self) -> Evaluator:
        first = self.unary()
        rest: list[tuple[str, Evaluator]] = []
        while self.peek().kind == "op" and self.peek().text in ("*", "/"):
            op = self.take().text
            rest.append((op, self.unary()))
        return _fold(first, rest)

    def unary(self) -> Evaluator:
        negate = False
        while self.peek().kind == "op" and self.peek().text in ("-", "+"):
            negate ^= self.take().text == "-"
        inner = self.atom()
        return _fold(lambda row: 0, [("-", inner)]) if negate else inner

    def _nested(self) -> None:
        """Count one level of nesting (parentheses, NOT); refuse more than MAX_NESTING."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise QueryError(f"clause nested more than {MAX_NESTING} levels deep at position {self.peek().position}")

    def atom(self) -> Evaluator:
        token = self.take()
        if token.kind == "number":
            if len(token.text) > MAX_NUMBER_DIGITS:
                raise QueryError(f"number of {len(token.text)} characters at position {token.position}: too long")
            number: int | float = float(token.text) if re.search(r"[.eE]", token.text) else int(token.text)
            return lambda row: number
        if token.kind == "string":
            text = token.text[1:-1].replace("''", "'")
            return lambda row: text
        if token.kind == "name":
            name = token.text.lower()
            if name not in self.columns:
                raise QueryError(f"column {token.text!r} does not exist")
            return lambda row: row.get(name)
        if token.kind == "op" and token.text == "(":
            self._nested()
            inner = self.expr()
            self.expect("op", ")")
            self.depth -= 1
            return inner
        found = token.text or "end of clause"
        raise QueryError(f"unexpected {found!r} at position {token.position}")


def compile_where(text: str, columns: set[str]) -> Evaluator:
    """An evaluator of ``text`` over rows; raise QueryError naming what is wrong."""
    return Parser(text, columns).parse()
