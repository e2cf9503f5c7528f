"""The one rule for text a client sends that is stored or used as an id: bounded, no control characters.

PostgreSQL refuses NUL in text (a 500 if it got that far), a lone UTF-16 surrogate (JSON's ``"\\ud800"``)
can't be encoded to UTF-8 for any database, and control characters in a name or an id only ever mean
trouble in logs, terminals and headers. Every such string is checked here, before anything is stored, and
refused with its field's path. Imports nothing of the project, so the spec's own models use it.
"""

from __future__ import annotations

import re

# C0 controls (NUL, tab, newline, escape, ...), DEL, the C1 controls, and lone UTF-16 surrogates.
NOT_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
MAX_NAME_LENGTH = 200  # names and ids: the width of the database's name columns
MAX_TAG_LENGTH = 64  # a job's tag, a short label: the width of job_tags.tag
# How much of a client's value an error message repeats: enough to recognise it, never a 10 KB echo.
ECHO_LENGTH = 60


def text_problem(value: str, max_length: int = MAX_NAME_LENGTH) -> str | None:
    """What is wrong with ``value`` as stored text (too long, a control character), or None."""
    if len(value) > max_length:
        return f"at most {max_length} characters, not {len(value)}"
    bad = NOT_TEXT.search(value)
    if bad:
        kind = "a lone UTF-16 surrogate" if "\ud800" <= bad.group() <= "\udfff" else "a control character"
        return f"{bad.group()!r} at position {bad.start()} is {kind}, which is not allowed"
    return None


def quoted(value: object, limit: int = ECHO_LENGTH) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters of the value when longer."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(value)
    return f"{text[:limit]!r}… ({len(text)} characters)"
