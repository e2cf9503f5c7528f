"""The one rule for text a client sends that is stored or used as an id: bounded, no control or format
characters; and for a label (a name or tag that something is found by), no spaces around it either.

PostgreSQL refuses NUL in text (a 500 if it got that far), a lone UTF-16 surrogate (JSON's ``"\\ud800"``)
can't be encoded to UTF-8 for any database, and control characters in a name or an id only ever mean
trouble in logs, terminals and headers. Format characters (Unicode category Cf) are invisible: a bidi
override shows ``"bidi\\u202egnp.exe"`` as ``bidiexe.png``, a zero-width space makes two names that look
the same differ. Every such string is checked here, before anything is stored, and refused with its field's
path. Imports nothing of the project, so the spec's own models use it.
"""

from __future__ import annotations

import unicodedata

# Unicode's general categories that are not text, with what a message calls them: C0 and C1 controls and DEL
# (Cc), lone UTF-16 surrogates (Cs), and the invisible format characters (Cf). All of Cf, not a list of the
# known-bad ones: bidi embeddings, overrides, isolates and marks, zero-width spaces and joiners, the BOM,
# invisible operators and tag characters all disguise what a name says. The cost, emoji joined by U+200D and
# Persian's U+200C, is small for names and tags.
NOT_TEXT = {
    "Cc": "a control character",
    "Cs": "a lone UTF-16 surrogate",
    "Cf": "an invisible format character (Unicode category Cf: bidi controls, zero-width characters and the like)",
}
MAX_NAME_LENGTH = 200  # names and ids: the width of the database's name columns
MAX_TAG_LENGTH = 64  # a job's tag, a short label: the width of job_tags.tag
TAG_SEPARATOR = ","  # what joins a job's tags where they are listed (torchyard list): never in a tag
# How much of a client's value an error message repeats: enough to recognise it, never a 10 KB echo.
ECHO_LENGTH = 60


def text_problem(value: str, max_length: int = MAX_NAME_LENGTH) -> str | None:
    """What is wrong with ``value`` as stored text (too long, a control or format character), or None."""
    if len(value) > max_length:
        return f"at most {max_length} characters, not {len(value)}"
    found = _not_text(value)
    if found is not None:
        position, kind = found
        return f"{value[position]!r} at position {position} is {kind}, which is not allowed"
    return None


def label_problem(value: str, max_length: int = MAX_NAME_LENGTH) -> str | None:
    """What is wrong with ``value`` as a label that things are found by (a user, key or experiment name, a
    tag): stored text's rule, and neither empty nor blank nor with spaces around it (``" x "`` would never be
    found as ``x``); or None."""
    if not value:
        return "empty"
    problem = text_problem(value, max_length)
    if problem:
        return problem
    if not value.strip():
        return "blank: only spaces"
    if value != value.strip():
        return "no spaces around it"
    return None


def tag_problem(value: str) -> str | None:
    """What is wrong with ``value`` as a job's tag: a label of at most MAX_TAG_LENGTH characters, without the
    comma that joins tags where they are listed (``a,b`` would read as two tags); or None."""
    problem = label_problem(value, MAX_TAG_LENGTH)
    if not problem and TAG_SEPARATOR in value:
        problem = (f"{TAG_SEPARATOR!r} at position {value.index(TAG_SEPARATOR)} is not allowed in a tag "
                   "(it separates tags where they are listed): give two tags, or another character")
    return problem


def visible(text: str, replacement: str) -> str:
    """``text`` with each character that stored text refuses shown as ``replacement``."""
    if text.isprintable():  # False for every Cc, Cs and Cf character: the common case costs one scan in C
        return text
    return "".join(replacement if unicodedata.category(char) in NOT_TEXT else char for char in text)


def quoted(value: object, limit: int = ECHO_LENGTH) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters of the value when longer."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(value)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def _not_text(value: str) -> tuple[int, str] | None:
    """The position of the first character of ``value`` that isn't text and what it is, or None."""
    if value.isprintable():  # as in visible(): no character of the refused categories
        return None
    for position, char in enumerate(value):
        kind = NOT_TEXT.get(unicodedata.category(char))
        if kind:
            return position, kind
    return None
