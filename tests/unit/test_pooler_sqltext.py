"""blank_literals: the pooler's session-only screen must not fire on words inside string literals,
quoted identifiers, dollar-quoted strings or comments, and must still fire on real statements."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from outpost.pooler.server import SESSION_ONLY
from outpost.pooler.sqltext import blank_literals


def session_only(sql: bytes) -> bool:
    return SESSION_ONLY.search(blank_literals(sql)) is not None


@pytest.mark.parametrize(
    "sql",
    [
        b"SELECT 'declare c cursor with hold'",
        b"SELECT 1 -- ; listen",
        b"SELECT 1 --\n-- ; listen x",
        b"SELECT $$pg_advisory_lock(1)$$",
        b'SELECT "with hold" FROM t',
        b"/* ; listen x */ SELECT 1",
        b"/* a /* b */ ; listen */ select 1",  # comments nest: the first */ ends only the inner one
        b"/* a /* b */ c */ select 'with hold'",
        rb"SELECT E'it\'s with hold'",
        rb"SELECT e'a\\', 'with hold'",  # \\ is one backslash: the quote after it closes
        b"SELECT E'it''s with hold'",
        b"SELECT E'a'\n  'b\\' with hold'",  # a continued E string keeps its escapes
        b"SELECT 'it''s with hold'",
        b"SELECT U&'with hold', U&\"with hold\", B'with hold', X'with hold', N'with hold'",
        b'SELECT "a""; listen x"',
        b"SELECT $fn$ ... with hold ... $fn$",
        b"SELECT $fn$ $x$ ; listen $x$ $fn$",
        b"SELECT $_1$pg_advisory_lock(1)$_1$",
        b"SELECT 'unterminated with hold",
        b"SELECT $q$ unterminated with hold",
        b"SELECT 1 /* unterminated /* */ ; listen",
        b"select 'with hold'; 'x' listen",  # a literal is a token: listen does not start here
    ],
)
def test_words_in_literals_and_comments_do_not_match(sql: bytes) -> None:
    assert SESSION_ONLY.search(sql) is not None  # the raw text does: the blanking is what helps
    assert not session_only(sql)


@pytest.mark.parametrize(
    "sql",
    [
        b"LISTEN x",
        b"select 1; listen x",
        b"SELECT pg_advisory_lock(1)",
        b"SELECT pg_try_advisory_lock_shared (1)",
        b"DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        b"SELECT 'a'; LISTEN x",
        b"SELECT 'a;'; LISTEN x",
        b'SELECT "a"; LISTEN "x"',
        b"/* x */ LISTEN x",
        b"/* a /* b */ c */ LISTEN x",
        b"-- x\nLISTEN x",
        b"DECLARE c CURSOR WITH/* a comment is whitespace */HOLD FOR SELECT 1",
        b"SELECT pg_advisory_lock -- x\n (1)",
        b"SELECT $1 ; listen x",
        b"SELECT $12, $fn$x$fn$; listen x",
        b"SELECT a$b$c, 1; listen x",  # $ inside an identifier opens nothing
        b"SELECT a$b$ FROM t WHERE with hold $b$",
        rb"SELECT E'\\'; listen x",
        b"SELECT 'it''s'; listen x",
        b"SELECT 'a\\'; listen x",  # standard_conforming_strings: \ is an ordinary byte
    ],
)
def test_real_statements_still_match(sql: bytes) -> None:
    assert session_only(sql)


@pytest.mark.parametrize(
    ("sql", "blanked"),
    [
        (b"a 'bc' d", b"a '  ' d"),
        (b"a E'b\\'c' d", b"a E'    ' d"),
        (b'a "b""c" d', b'a "    " d'),
        (b"a $t$ x $t$ d", b"a $t$   $t$ d"),
        (b"a -- x\r\nd", b"a     \r\nd"),
        (b"a /* /* */ */ d", b"a             d"),
        (b"a 'bc", b"a '  "),
        (b"a /* b", b"a     "),
        (b"a'b'c", b"a' 'c"),
        (b"e'x'", b"e' '"),
        (b"be'x'", b"be' '"),  # be is an identifier: 'x' is a plain string
        (b"1 */ 2", b"1 */ 2"),
        (b"a --", b"a   "),
        (b"", b""),
    ],
)
def test_blanked_text(sql: bytes, blanked: bytes) -> None:
    assert blank_literals(sql) == blanked


@given(st.binary(max_size=300))
def test_any_bytes_keep_their_length_and_are_only_blanked(sql: bytes) -> None:
    out = blank_literals(sql)
    assert len(out) == len(sql)
    assert all(o in (i, 0x20) for i, o in zip(sql, out, strict=True))
    assert blank_literals(out) == out


@given(st.binary(max_size=300))
def test_bytes_that_open_nothing_are_unchanged(sql: bytes) -> None:
    sql = bytes(b for b in sql if b not in b"'\"$-/")
    assert blank_literals(sql) == sql


_ANY = st.binary(max_size=30)
_WORDS = st.from_regex(rb"[a-zA-Z0-9_ ;(),.*+=]{0,20}", fullmatch=True)
_TAGS = st.from_regex(rb"(?:[a-zA-Z_][a-zA-Z0-9_]{0,5})?", fullmatch=True)


@st.composite
def _piece(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """One piece of SQL and what it blanks to."""
    kind = draw(st.sampled_from(["words", "string", "ident", "escape", "dollar", "line", "block"]))
    if kind == "words":
        words = draw(_WORDS)
        return words, words
    content = draw(_ANY)
    blank = b" " * len(content)
    if kind == "string":
        quoted = content.replace(b"'", b"''")
        return b"'" + quoted + b"'", b"'" + b" " * len(quoted) + b"'"
    if kind == "ident":
        quoted = content.replace(b'"', b'""')
        return b'"' + quoted + b'"', b'"' + b" " * len(quoted) + b'"'
    if kind == "escape":
        quoted = content.replace(b"\\", b"\\\\").replace(b"'", b"\\'")
        return b"E'" + quoted + b"'", b"E'" + b" " * len(quoted) + b"'"
    if kind == "dollar":
        delimiter = b"$" + draw(_TAGS) + b"$"
        assume((content + delimiter).find(delimiter) == len(content))
        return delimiter + content + delimiter, delimiter + blank + delimiter
    if kind == "line":
        text = content.replace(b"\n", b"").replace(b"\r", b"")
        return b"--" + text + b"\n", b"  " + b" " * len(text) + b"\n"
    inner = bytes(b for b in content if b not in b"/*")
    text = b"/*" + inner + b"/* " + inner + b" */" + inner + b"*/"
    return text, b" " * len(text)


@given(st.lists(_piece(), max_size=8))
def test_generated_sql_blanks_exactly_its_literals_and_comments(
    pieces: list[tuple[bytes, bytes]],
) -> None:
    # joined by ";": two string literals with only whitespace (with a newline) and comments
    # between them are one literal in PostgreSQL ('a' -- c<newline>'b'), not what this checks
    sql = b" ; ".join(text for text, _ in pieces)
    blanked = b" ; ".join(blank for _, blank in pieces)
    assert blank_literals(sql) == blanked
