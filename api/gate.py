"""The gate for JSON a client sends: bounded before it is read, counted before it is parsed, checked after.

A body over its byte limit is refused before it is read (413). Python's JSON parser recurses once per
nesting level, so a body (or a cursor) nested thousands of levels deep would end in RecursionError: the
nesting is counted first, by a linear scan that doesn't recurse (422 naming the limit). What parses is then
held to I-JSON's rules (RFC 7493), so no later step meets a value it can't store or print: unique keys,
finite numbers (``NaN``, ``Infinity`` and ``1e999`` are refused; the first two aren't even JSON), integers a
64-bit column holds (Python refuses to print one past 4300 digits). Each refusal names the value's path.
Strings are held to models.text's rule where they are stored or used as ids, not here.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import IO, Any

from flask import Request

from api.errors import ApiError, too_large, validation_error
from models.spec import Problem

MIN_INT, MAX_INT = -(2**63), 2**63 - 1
# Digits past which a JSON integer isn't even converted (int() of 4300+ digits raises; fewer are still slow).
MAX_INT_DIGITS = 20
# Refusals listed at most; a 1 MiB body can hold a hundred thousand bad values.
MAX_PROBLEMS = 20
READ_CHUNK = 64 * 1024
# A string, to its closing quote or (never closed) to the end of the text. Possessive, and never failing
# once started, so removing every string is one linear pass whatever the text holds.
_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class JsonRefused(ValueError):
    """JSON the API won't take: ``status`` 400 when it is malformed, 422 when it breaks a rule above."""

    def __init__(self, status: int, problems: list[Problem]):
        self.status = status
        self.problems = problems
        super().__init__("; ".join(map(str, problems)))


def read_json(request: Request, max_bytes: int, max_depth: int, what: str = "the spec") -> Any:
    """The request's JSON value, or a problem: 415 when it isn't JSON, 413 past ``max_bytes``
    (``max_spec_bytes``), 400 when malformed, 422 when too deep or against I-JSON's rules."""
    if not request.is_json:
        raise ApiError(415, "Unsupported Media Type", f"send {what} as JSON (Content-Type: application/json)")
    over_limit = too_large(what, max_bytes, "max_spec_bytes")
    if request.content_length is not None and request.content_length > max_bytes:
        raise over_limit  # before a byte of it is read
    raw = read_at_most(request.stream, max_bytes + 1)  # a chunked body says no length: one byte past tells
    if len(raw) > max_bytes:
        raise over_limit
    try:
        return loads(raw, max_depth)
    except JsonRefused as exc:
        if exc.status == 400:
            raise ApiError(400, "Bad Request", str(exc), kind="malformed-json") from None
        raise validation_error(exc.problems, "Invalid JSON") from None


def read_at_most(stream: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes of a stream; one read() of a socket (or of a chunked body) may return fewer."""
    chunks, left = [], size
    while left > 0:
        chunk = stream.read(min(left, READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def loads(raw: bytes | str, max_depth: int) -> Any:
    """Parse JSON text (bytes: UTF-8, -16 or -32) nested at most ``max_depth`` levels, by the rules above."""
    try:
        text = raw.decode(json.detect_encoding(raw)) if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        message = f"malformed JSON: not {exc.encoding.upper()} text at byte {exc.start}"
        raise JsonRefused(400, [Problem("", message)]) from None
    if nesting_depth(text) > max_depth:
        raise JsonRefused(422, [Problem("", f"nested deeper than {max_depth} levels (max_json_depth)")])
    hooks = _Hooks()
    try:
        value = json.loads(text, object_pairs_hook=hooks.object, parse_int=hooks.integer,
                           parse_float=hooks.number, parse_constant=hooks.constant)
    except ValueError as exc:
        raise JsonRefused(400, [Problem("", f"malformed JSON: {exc}")]) from None
    problems = value_problems(value) if hooks.suspect else []
    if problems:
        raise JsonRefused(422, problems)
    return value


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON text (brackets inside strings don't count), found without
    recursion and in C's loops (a megabyte of brackets takes about as long as json.loads). A malformed
    text's prefix counts the way the parser reads it, so the parser never goes deeper than this says."""
    brackets = _NOT_BRACKETS.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def value_problems(value: Any) -> list[Problem]:
    """Where a parsed value breaks I-JSON's rules (a repeated key, a number that isn't finite, an integer
    past 64 bits), each at its path, in document order; walked with a stack of iterators, not recursion,
    and a path is built only for a value at fault."""
    problems: list[Problem] = []
    root = _scalar_problem(value)
    if root is not None or not isinstance(value, (dict, list)):
        return [Problem("", root)] if root else []
    stack = [(None, _children(value))]
    if isinstance(value, _RepeatedKey):
        problems.append(Problem(value.key, _REPEATED))
    while stack and len(problems) < MAX_PROBLEMS:
        path, children = stack[-1]
        for key, child in children:
            kind = type(child)
            if kind is dict or kind is list or kind is _RepeatedKey:
                stack.append(((path, key), _children(child)))
                if kind is _RepeatedKey:
                    problems.append(Problem(json_path(((path, key), child.key)), _REPEATED))
                break
            # Inline, not a call per value: a megabyte holds half a million numbers.
            if (kind is float and not math.isfinite(child)) or kind is _HugeInt or (
                kind is int and not MIN_INT <= child <= MAX_INT
            ):
                problems.append(Problem(json_path((path, key)), _scalar_problem(child)))
        else:
            stack.pop()
    return problems[:MAX_PROBLEMS]


_REPEATED = "this key appears more than once"


def _children(value: dict | list):
    return iter(value.items()) if isinstance(value, dict) else enumerate(value)


def _scalar_problem(value: Any) -> str | None:
    """What is wrong with a number (not finite, past 64 bits), or None."""
    if type(value) is float and not math.isfinite(value):
        return f"must be a finite number, not {value}"
    if type(value) is _HugeInt or (type(value) is int and not MIN_INT <= value <= MAX_INT):
        return "must be a whole number from -2^63 to 2^63 - 1"
    return None


def json_path(linked: tuple | None) -> str:
    """A path held as nested pairs ``(((None, 'model'), 'layers'), 2)`` -> ``model.layers[2]``, the way
    specs name their fields."""
    parts = []
    while linked is not None:
        linked, part = linked
        parts.append(part)
    path = ""
    for part in reversed(parts):
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


class _RepeatedKey(dict):
    """An object in which ``key`` appeared more than once (json.loads would keep the last silently)."""

    key: str


class _HugeInt:
    """An integer literal too long to convert; only its place is reported."""


class _Hooks:
    """json.loads's hooks for one parse. Each notes a value that breaks a rule, so that the walk which
    finds its path runs only when there is one to find."""

    def __init__(self):
        self.suspect = False

    def object(self, pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        self.suspect = True
        seen: set[str] = set()
        repeated = _RepeatedKey(obj)
        repeated.key = next(key for key, _ in pairs if key in seen or seen.add(key))
        return repeated

    def integer(self, literal: str) -> int | _HugeInt:
        if len(literal) > MAX_INT_DIGITS:
            self.suspect = True
            return _HugeInt()
        value = int(literal)
        self.suspect = self.suspect or not MIN_INT <= value <= MAX_INT
        return value

    def number(self, literal: str) -> float:
        value = float(literal)  # 1e999 is inf
        self.suspect = self.suspect or not math.isfinite(value)
        return value

    def constant(self, name: str) -> float:
        self.suspect = True  # NaN, Infinity, -Infinity: Python's extensions to JSON
        return float(name)
