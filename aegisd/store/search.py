"""Full-text search of the message history (docs/api.md `messages.search`): the FTS5 index
inside the encrypted store (store/schema.py `_message_search_index`), kept in step by
triggers, so nothing here writes to it.

A query is the user's text; FTS5's own query syntax (AND, OR, NOT, NEAR, column filters,
parentheses, ``^``) is never passed through: each word and each quoted phrase becomes an
FTS5 string of its own, all of them required (a word ending in ``*`` is a prefix)."""

from __future__ import annotations

import re
import unicodedata

from .db import Store

#: Bounds on a query: its length in characters and its number of words and phrases.
MAX_QUERY = 512
MAX_TERMS = 16

_SEPARATE = frozenset({"Cc", "Cs"})
_TERM = re.compile(r'"([^"]*)"?|(\S+)')


#: One statement for both tables (?1 the match, ?2 a contact, ?3 a group, ?4 limit, ?5
#: offset): a scope given, contact or group, rules the other table out.
_SEARCH = (
    "SELECT 'contact', m.seq, m.created_at FROM messages_fts "
    "JOIN messages m ON m.seq = messages_fts.rowid WHERE messages_fts MATCH ?1 "
    "AND ?3 IS NULL AND (?2 IS NULL OR m.contact_id = ?2) "
    "AND m.contact_id NOT IN (SELECT contact_id FROM group_contacts) "
    "UNION ALL "
    "SELECT 'group', g.seq, g.created_at FROM group_messages_fts "
    "JOIN group_messages g ON g.seq = group_messages_fts.rowid "
    "WHERE group_messages_fts MATCH ?1 AND ?2 IS NULL "
    "AND (?3 IS NULL OR g.group_ref = ?3) "
    "ORDER BY 3 DESC, 2 DESC LIMIT ?4 OFFSET ?5"
)


class BadQuery(ValueError):
    """The query has nothing to search for, or is over the bounds."""


def fts_query(text: str) -> str:
    """The FTS5 expression for the user's ``text``: words and "quoted phrases", all required.
    A term is quoted (its own quotes doubled), so no FTS5 operator can come from the user."""
    if len(text) > MAX_QUERY:
        raise BadQuery(f"is longer than {MAX_QUERY} characters")
    # controls separate words (a NUL would end FTS5's string early: a syntax error), and so
    # do lone surrogates (JSON's "\ud800"), which no UTF-8 can carry to SQLite; every other
    # code point, unassigned or private-use included, encodes
    text = "".join(" " if unicodedata.category(ch) in _SEPARATE else ch for ch in text)
    terms = []
    for m in _TERM.finditer(text):
        phrase, word = m.group(1), m.group(2)
        prefix = False
        if word is not None:
            word = word.replace('"', "")
            prefix = word.endswith("*") and len(word.rstrip("*")) > 0
            phrase = word.rstrip("*")
        if phrase is None or not any(ch.isalnum() for ch in phrase):
            continue  # nothing the tokenizer would index
        terms.append('"' + phrase.replace('"', '""') + '"' + ("*" if prefix else ""))
    if not terms:
        raise BadQuery("has no word to search for")
    if len(terms) > MAX_TERMS:
        raise BadQuery(f"has more than {MAX_TERMS} words and phrases")
    return " ".join(terms)


def search(
    store: Store, match: str, *, contact_id: int | None = None, group_ref: int | None = None,
    limit: int, offset: int = 0,
) -> list[tuple[str, int]]:  # fmt: skip
    """The messages that match, newest first (by the time this profile stored them), as
    ("contact", seq) or ("group", seq); contacts hidden for their groups are left out. With
    ``contact_id`` only that contact's, with ``group_ref`` only that group's."""
    rows = store.query(_SEARCH, (match, contact_id, group_ref, limit, offset)).fetchall()
    return [(str(r[0]), int(r[1])) for r in rows]
