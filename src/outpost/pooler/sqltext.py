"""SQL text with the insides of its literals and comments blanked out, byte for byte.

In transaction mode the pooler refuses statements that need a session (LISTEN, session advisory
locks, WITH HOLD cursors) by searching the SQL text with a regular expression. The same words
inside a string, a quoted identifier, a dollar-quoted string or a comment are no statement, and
must not get a query refused: a match is therefore checked again on ``blank_literals(sql)``.

Scanning follows PostgreSQL's lexer (src/backend/parser/scan.l), standard_conforming_strings on.
"""

from __future__ import annotations

import re

_TAG = rb"(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*+)?"

#: Skips ordinary SQL, then captures what opens the next literal or comment. An identifier is
#: skipped whole, since it may hold a ``$`` (``a$b$``) that opens nothing; ``E'`` opens an escape
#: string only as a token of its own; U&, B, X and N strings scan as plain ones; ``$1`` is no quote.
_NEXT = re.compile(
    rb"(?:[^'\"$\-/A-Za-z_\x80-\xff]++"  # digits, spaces, operators, punctuation
    rb"|(?![eE]')[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*+"  # identifiers and keywords
    rb"|\$(?!" + _TAG + rb"\$)"  # a parameter's $, or a lone $
    rb"|-(?!-)|/(?!\*))*+"
    rb"([eE]'|'|\"|\$" + _TAG + rb"\$|--|/\*)"
)
#: Whitespace that continues a string literal on a later line ('a'<newline>'b' is 'ab').
_CONTINUE = rb"(?:[ \t\f\v]++|--[^\n\r]*+)*+[\n\r](?:[ \t\n\r\f\v]++|--[^\n\r]*+)*+'"
_ESCAPE_BODY = re.compile(rb"(?s)(?:[^'\\]++|\\.|''|'" + _CONTINUE + rb")*+'")
#: After an opening quote: the literal's content and closing quote.
_BODY = {
    b"'": re.compile(rb"(?:[^']++|'')*+'"),
    b'"': re.compile(rb'(?:[^"]++|"")*+"'),
    b"E'": _ESCAPE_BODY,
    b"e'": _ESCAPE_BODY,
}
_LINE_END = re.compile(rb"[\n\r]")
_BLOCK_MARK = re.compile(rb"/\*|\*/")


def blank_literals(sql: bytes) -> bytes:
    """SQL with every literal's content and every comment replaced by spaces, same length.

    A comment becomes spaces, as it is whitespace to PostgreSQL (``with/**/hold`` stays a match).
    A literal keeps its delimiters (``'``, ``E'``, ``"``, ``$tag$``) and so remains a token, not
    whitespace: ``select 'a' ; 'x' listen`` must not become ``; listen``. Unterminated literals and
    comments run to the end. Any bytes are accepted.
    """
    out = bytearray(sql)
    pos = 0
    while (found := _NEXT.match(sql, pos)) is not None:
        opener = found[1]
        if opener == b"--":
            start = found.start(1)
            line_end = _LINE_END.search(sql, start)
            stop = pos = len(sql) if line_end is None else line_end.start()
        elif opener == b"/*":
            start = found.start(1)
            stop = pos = _block_comment_end(sql, found.end())
        else:
            start = found.end()
            stop, pos = _literal_end(sql, opener, start)
        out[start:stop] = b" " * (stop - start)
    return bytes(out)


def _literal_end(sql: bytes, opener: bytes, start: int) -> tuple[int, int]:
    """Where the literal whose content begins at START closes: its closing delimiter's start and
    end, or the end of SQL twice when it never closes."""
    body = _BODY.get(opener)
    if body is None:  # $tag$: up to the same delimiter
        close = sql.find(opener, start)
        return (close, close + len(opener)) if close >= 0 else (len(sql), len(sql))
    found = body.match(sql, start)
    return (found.end() - 1, found.end()) if found is not None else (len(sql), len(sql))


def _block_comment_end(sql: bytes, pos: int) -> int:
    """The end of the /* comment whose content begins at POS (such comments nest)."""
    depth = 1
    for mark in _BLOCK_MARK.finditer(sql, pos):
        depth += 1 if mark[0] == b"/*" else -1
        if depth == 0:
            return mark.end()
    return len(sql)
