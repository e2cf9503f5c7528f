"""The one reader of dataset files (CSV and NPZ), shared by the API's upload check and the engine's loader.

Both read a file by the same rules, in bounded chunks, so an upload the API accepts is one the engine trains
on, with the same columns:

- CSV: the first line names the columns, each stripped of the spaces around it (``a, b, label`` names
  ``a``, ``b`` and ``label``); names are checked as client text (models.text). Every later line that is
  not blank holds one number per column, as NumPy reads numbers, finite and within float32's range
  (models.numbers); only the label column may hold text instead (class labels such as ``setosa``): a
  reader that names it raises TextLabels at its first word, and the file is read again by
  ``csv_labelled_blocks``, which takes every label as text, stripped. Lines are read with a length bound,
  so a line of a million values can't become a million Python strings.
- NPZ: exactly two members, ``X.npy`` and ``y.npy``, numeric (nothing is ever unpickled). Their headers are
  checked first (dtype, shape, unpacked size), then their data is read from those very zip entries, never
  through ``np.load``'s name lookup, which prefers a member named plain ``X`` over the ``X.npy`` checked;
  their values are held to the same rule as a CSV's.

Imports NumPy but not torch: the API uses it too.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

from models.numbers import IN_RANGE, out_of_range, values_problem
from models.text import MAX_NAME_LENGTH, quoted, text_problem

# The most classes a target may have: the one limit for numeric labels (past it, a target is continuous) and
# for text labels (past it, the column is refused), at upload and in the engine.
MAX_CLASSES = 1000

# Characters of CSV text parsed at a time: a block's lines and floats stay a few MB whatever the file.
BLOCK_CHARACTERS = 1024 * 1024
# A data line may hold this many characters per column (a float's longest repr is 24), and room for one text
# class label of up to MAX_NAME_LENGTH (the client text rule labels are held to): see ``line_limit``.
MAX_CHARACTERS_PER_VALUE = 100
# Bytes of an NPZ member read (and decompressed) at a time.
CHUNK_BYTES = 1024 * 1024
NPZ_ARRAYS = ("X", "y")
# The end-of-central-directory record of a zip file: its signature and fixed size.
END_OF_DIRECTORY = b"PK\x05\x06"
END_OF_DIRECTORY_SIZE = 22
# A central directory of two members: each entry is 46 bytes plus a name, an extra field and a comment
# of at most 64 KiB each. A larger one would make zipfile build objects for members we'd refuse anyway.
MAX_CENTRAL_DIRECTORY = 2 * (46 + 3 * 0xFFFF)


class TableError(ValueError):
    """A file that can't be a dataset; ``path`` names what is at fault: ``file``, ``X`` or ``y``."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(message)


class TextLabels(Exception):
    """The label column holds text: read the file again with ``csv_labelled_blocks``. Not a TableError:
    it is no fault of the file, and only a reader that named a label column ever sees it."""


def some_names(names: list[str], shown: int = 10) -> str:
    """Column names for a message, the first ``shown`` of them: a header may be thousands wide."""
    listed = ", ".join(quoted(name, 40) for name in names[:shown])
    return listed if len(names) <= shown else f"{listed}, … ({len(names)} columns)"


# --- CSV ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_csv(path) -> Iterator[IO[str]]:
    """The file as text: UTF-8, a byte-order mark skipped, any line ending (\\r\\n, \\r) read as \\n."""
    with open(path, encoding="utf-8-sig") as handle:
        yield handle


def csv_header(handle: IO[str], max_columns: int | None = None) -> list[str]:
    """The column names of the first line, stripped and checked; at most ``max_columns`` of them."""
    limit = None if max_columns is None else max_columns * (MAX_NAME_LENGTH + 3) + 2
    line = _read_line(handle, limit, 1)
    if not line.strip():
        raise TableError("file", "the file is empty; a CSV file starts with a header row of column names")
    try:
        names = [name.strip() for name in next(csv.reader([line]))]
    except csv.Error as exc:
        raise TableError("file", f"the header row is not readable CSV: {exc}") from None
    if max_columns is not None and len(names) > max_columns:
        raise TableError("file", f"the header names {len(names)} columns; at most {max_columns} (max_columns)")
    for number, name in enumerate(names, start=1):
        problem = text_problem(name)
        if problem:
            raise TableError("file", f"column {number} of the header ({quoted(name, 20)}): {problem}")
    if len(names) < 2 or any(not name for name in names) or len(set(names)) != len(names):
        raise TableError("file", "the header row must name at least two columns, each once and not blank")
    return names


def csv_blocks(
    handle: IO[str], names: list[str], max_rows: int | None = None, label: int | None = None
) -> Iterator[np.ndarray]:
    """The rows after the header as float64 blocks (rows × columns), parsed about a megabyte of text at a
    time and each checked: one number per column, by models.numbers' rule. Blank lines are skipped; no rows
    is an error. A word in column ``label`` (and in no other) raises TextLabels."""
    for numbers, lines in _data_lines(handle, names, max_rows):
        yield _parse_block(lines, numbers, names, label)


def csv_labelled_blocks(
    handle: IO[str], names: list[str], label: int, max_rows: int | None = None
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """``csv_blocks`` of a file whose column ``label`` holds text: each block as its other columns (float64,
    rows × columns - 1) and its labels, stripped and checked as client text."""
    for numbers, lines in _data_lines(handle, names, max_rows):
        yield _parse_labelled_block(lines, numbers, names, label)


def _data_lines(handle: IO[str], names: list[str], max_rows: int | None) -> Iterator[tuple[list[int], list[str]]]:
    """The lines after the header that are not blank, in batches, with their line numbers; rows past
    ``max_rows`` and a file of no rows are errors."""
    rows = 0
    for numbers, lines in _line_batches(handle, line_limit(len(names))):
        if not all(map(str.strip, lines)):
            kept = [(number, line) for number, line in zip(numbers, lines, strict=True) if line.strip()]
            numbers, lines = [number for number, _ in kept], [line for _, line in kept]
        rows += len(lines)
        if max_rows is not None and rows > max_rows:
            raise TableError("file", f"more than {max_rows} rows (max_samples)")
        if lines:
            yield list(numbers), lines
    if rows == 0:
        raise TableError("file", "the file has a header but no rows")


def line_limit(n_columns: int) -> int:
    """The most characters a data line of ``n_columns`` may hold: MAX_CHARACTERS_PER_VALUE a column, plus
    room for a text label of the longest allowed."""
    return n_columns * MAX_CHARACTERS_PER_VALUE + MAX_NAME_LENGTH


def _too_long(line_number: int, limit: int) -> TableError:
    return TableError("file", f"line {line_number} is longer than {limit} characters (at most "
                              f"{MAX_CHARACTERS_PER_VALUE} a column, plus {MAX_NAME_LENGTH} for a text label)")


def _line_batches(handle: IO[str], limit: int) -> Iterator[tuple[range, list[str]]]:
    """The rest of the file as batches of whole lines (without newlines) and their numbers, about
    BLOCK_CHARACTERS at a time; a line longer than ``limit`` is refused before it is all read."""
    size = max(BLOCK_CHARACTERS, 2 * limit)  # room for at least one whole line of the longest allowed
    first, carry = 2, ""  # the number of the next line; line 1 is the header
    while True:
        read = _read_text(handle, size)
        text = carry + read
        cut = len(text) if not read else text.rfind("\n") + 1  # whole lines only, until the end
        text, carry = text[:cut], text[cut:]
        lines = text.split("\n")
        if not lines[-1]:
            lines.pop()  # after the last line's newline
        numbers = range(first, first + len(lines))
        first += len(lines)
        if lines and max(map(len, lines)) > limit:
            long = next(number for number, line in zip(numbers, lines, strict=True) if len(line) > limit)
            raise _too_long(long, limit)
        if len(carry) > limit:
            raise _too_long(first, limit)
        if lines:
            yield numbers, lines
        if not read:
            return


def read_csv_table(
    path, max_rows: int | None = None, max_columns: int | None = None
) -> tuple[list[str], np.ndarray]:
    """The whole file: its column names and a float64 table (rows × columns)."""
    with open_csv(path) as handle:
        names = csv_header(handle, max_columns)
        blocks = list(csv_blocks(handle, names, max_rows))
    return names, np.concatenate(blocks)


@dataclass
class LabelledTable:
    """A CSV file read for training: its feature columns and its label column. ``classes`` is None when
    the labels are numbers (``y`` as read); for text labels it is their sorted set and ``y`` their codes
    0..K-1 in that order."""

    features: list[str]
    X: np.ndarray
    y: np.ndarray
    classes: list[str] | None = None


def read_labelled_csv(path, target: str | None, max_rows: int | None = None) -> LabelledTable:
    """The whole file, split into features and the ``target`` column (default: the last one); a target
    holding text is read as class labels."""
    with open_csv(path) as handle:
        names = csv_header(handle)
        target = target or names[-1]
        if target not in names:
            raise TableError("target", f"{quoted(target)} is not a column; columns: {some_names(names)}")
        label = names.index(target)
        features = [name for name in names if name != target]
        try:
            table = np.concatenate(list(csv_blocks(handle, names, max_rows, label)))
            return LabelledTable(features, np.delete(table, label, axis=1), table[:, label])
        except TextLabels:
            pass
    with open_csv(path) as handle:
        csv_header(handle)
        blocks, labels, seen = [], [], LabelSet(target)
        for block, text in csv_labelled_blocks(handle, names, label, max_rows):
            seen.add(text)
            blocks.append(block)
            labels += text
    classes = seen.classes()
    index = {name: code for code, name in enumerate(classes)}
    codes = np.fromiter((index[text] for text in labels), dtype=np.int64, count=len(labels))
    return LabelledTable(features, np.concatenate(blocks), codes, classes)


class LabelSet:
    """The distinct text labels of a column, at most MAX_CLASSES of them (more is an error naming it)."""

    def __init__(self, column: str):
        self.column = column
        self.labels: set[str] = set()

    def add(self, labels: list[str]) -> None:
        self.labels.update(labels)
        if len(self.labels) > MAX_CLASSES:
            raise TableError("file", f"column {self.column!r} holds more than {MAX_CLASSES} distinct class labels "
                                     f"(at most {MAX_CLASSES} classes)")

    def classes(self) -> list[str]:
        """The labels sorted (by code point): class i is the i-th, the same order for every run."""
        return sorted(self.labels)


def _read_line(handle: IO[str], limit: int | None, line_number: int) -> str:
    """The next line (with its newline), or "" at the end; refused past ``limit`` characters."""
    try:
        line = handle.readline(-1 if limit is None else limit + 1)
    except UnicodeDecodeError:
        raise TableError("file", "the file is not UTF-8 text; a CSV file must be text") from None
    if limit is not None and len(line) > limit:
        raise TableError("file", f"line {line_number} is longer than {limit} characters")
    return line


def _read_text(handle: IO[str], size: int) -> str:
    """Up to ``size`` characters more, "" at the end."""
    try:
        return handle.read(size)
    except UnicodeDecodeError:
        raise TableError("file", "the file is not UTF-8 text; a CSV file must be text") from None


def _parse_block(lines: list[str], numbers: list[int], names: list[str], label: int | None) -> np.ndarray:
    """Lines of numbers as a float64 block; the first bad line named by its number and column."""
    try:
        block = _numbers(lines)
    except ValueError:
        block = None
    if block is None or block.shape[1] != len(names):
        error = _explain(lines, numbers, names, label)
        if error is None:
            raise TextLabels()
        raise error
    _check_range(block, numbers, names)
    return block


def _parse_labelled_block(
    lines: list[str], numbers: list[int], names: list[str], label: int
) -> tuple[np.ndarray, list[str]]:
    """Lines whose column ``label`` is text: the other columns as a float64 block, and the labels."""
    try:
        rows = list(csv.reader(lines))
    except csv.Error as exc:
        raise TableError("file", f"lines {numbers[0]} to {numbers[-1]} are not readable CSV: {exc}") from None
    for row, number in zip(rows, numbers, strict=True):
        if len(row) != len(names):
            raise TableError("file", f"line {number} has {len(row)} values but the header names {len(names)} columns")
    features = [column for column in range(len(names)) if column != label]
    try:
        block = _numbers(lines, features)
    except ValueError:
        block = None
    if block is None or block.shape != (len(lines), len(features)):
        raise _explain(lines, numbers, names, label) or TableError(
            "file", f"lines {numbers[0]} to {numbers[-1]} are not rows of numbers and a label")
    _check_range(block, numbers, [names[column] for column in features])
    labels = [row[label].strip() for row in rows]
    for number, text in zip(numbers, labels, strict=True):
        problem = "an empty class label" if not text else text_problem(text)
        if problem:
            raise TableError("file", f"line {number}, column {names[label]!r}: {problem}")
    return block, labels


def _check_range(block: np.ndarray, numbers: list[int], names: list[str]) -> None:
    bad = out_of_range(block)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise TableError("file", f"line {numbers[row]}, column {names[column]!r}: {block[row, column]:.4g} is not "
                                 f"a finite number {IN_RANGE}")


def _numbers(lines: list[str], columns: list[int] | None = None) -> np.ndarray:
    # NumPy's C reader is the one rule for what a number is: '"1.5"' and ' 2 ' are numbers, '1_000' is not.
    return np.loadtxt(lines, delimiter=",", quotechar='"', comments=None, dtype=np.float64, ndmin=2,
                      usecols=columns)


def _explain(lines: list[str], numbers: list[int], names: list[str], label: int | None) -> TableError | None:
    """Why a block didn't parse: the first line with the wrong count of values, or the first value that's no
    number outside column ``label`` (with every column of the block holding text named). None when only
    column ``label`` holds words: they are class labels."""
    first, text_columns, labels_are_text = None, {}, False
    for line, number in zip(lines, numbers, strict=True):
        cells = next(csv.reader([line]), [])
        if len(cells) != len(names):
            if first is None:
                return TableError(
                    "file", f"line {number} has {len(cells)} values but the header names {len(names)} columns"
                )
            break
        for column, (name, cell) in enumerate(zip(names, cells, strict=True)):
            if column == label:
                labels_are_text = labels_are_text or not _is_number(cell)
                continue
            if column in text_columns:
                continue
            if first is None:
                if not _is_number(cell):
                    first, text_columns[column] = (number, name, cell), name
            elif not _looks_numeric(cell):  # the first error is exact; the others only named
                text_columns[column] = name
    if first is None:
        return None if labels_are_text else TableError(
            "file", f"lines {numbers[0]} to {numbers[-1]} are not rows of {len(names)} numbers")
    number, name, cell = first
    message = f"line {number}, column {name!r}: {quoted(cell, 40)} is not a number; only numeric columns are allowed"
    if label is not None:
        message += (f" as features (feature columns holding text: {some_names(list(text_columns.values()))}); only "
                    f"the target column, {names[label]!r}, may hold class labels as text")
    return TableError("file", message)


def _looks_numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _is_number(cell: str) -> bool:
    if not cell.strip():
        return False  # (NumPy warns of a line without data)
    try:
        return _numbers([cell]).shape == (1, 1)
    except ValueError:
        return False


# --- label statistics -----------------------------------------------------------------------------


def class_count(low: float, high: float, whole: bool) -> int | None:
    """Classes of a target as the engine counts them: labels 0..k-1 give k (at least 2); None unless the
    labels are whole numbers from 0 (a continuous target)."""
    if not whole or low < 0 or not math.isfinite(high):
        return None
    return max(int(high) + 1, 2)


class ColumnStats:
    """The least and largest value of each column, and whether all are whole numbers, over blocks of rows."""

    def __init__(self, columns: int):
        self.rows = 0
        self.low = np.full(columns, np.inf)
        self.high = np.full(columns, -np.inf)
        self.whole = np.ones(columns, dtype=bool)

    def add(self, block: np.ndarray) -> None:
        """Take in a block of rows (rows × columns, finite)."""
        if not len(block):
            return
        block = np.asarray(block, dtype=np.float64)  # booleans and integers too
        self.rows += len(block)
        self.low = np.minimum(self.low, block.min(axis=0))
        self.high = np.maximum(self.high, block.max(axis=0))
        self.whole &= (block == np.round(block)).all(axis=0)

    def classes(self, column: int) -> int | None:
        """``class_count`` of one column."""
        return class_count(float(self.low[column]), float(self.high[column]), bool(self.whole[column]))


# --- NPZ ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NpyHeader:
    """What a .npy member's header says, and where its data starts."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


@dataclass(frozen=True)
class NpyMember:
    """One checked member of an NPZ file: the zip entry and its header."""

    name: str
    info: zipfile.ZipInfo
    header: NpyHeader


@contextlib.contextmanager
def open_npz(path) -> Iterator[zipfile.ZipFile]:
    """The file as a zip archive, once its central directory is known to be small (two members' worth)."""
    try:
        with open(path, "rb") as handle:
            _check_directory(handle)
            archive = zipfile.ZipFile(handle)
            with archive:
                yield archive
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, OSError) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression.
        raise TableError("file", f"the arrays can't be read: {exc}") from None


def npz_members(
    archive: zipfile.ZipFile, max_rows: int | None = None, max_bytes: int | None = None
) -> dict[str, NpyMember]:
    """X and y, checked from their headers before any data is unpacked: exactly these two members,
    numeric, rows within ``max_rows``, shapes that fit together, at most ``max_bytes`` unpacked."""
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if sorted(names) != ["X.npy", "y.npy"]:
        raise TableError("file", _members_message(names))
    members = {}
    for info in infos:
        name = info.filename.removesuffix(".npy")
        with archive.open(info) as stream:
            header = _npy_header(stream, name)
        _check_member(name, info, header, max_rows)
        members[name] = NpyMember(name, info, header)
    unpacked = sum(member.info.file_size for member in members.values())
    if max_bytes is not None and unpacked > max_bytes:
        raise TableError("file", f"the arrays unpack to {unpacked} bytes; at most {max_bytes} are allowed")
    _check_shapes(members["X"].header.shape, members["y"].header.shape)
    return members


def npy_blocks(archive: zipfile.ZipFile, member: NpyMember) -> Iterator[np.ndarray]:
    """A checked member's values in storage order, as flat blocks of at most CHUNK_BYTES, each finite."""
    header = member.header
    with archive.open(member.info) as stream:
        if _npy_header(stream, member.name) != header:
            raise TableError(member.name, f"{member.name}.npy changed while it was read")
        step = max(1, CHUNK_BYTES // header.dtype.itemsize) * header.dtype.itemsize
        left = header.nbytes
        while left:
            raw = stream.read(min(step, left))
            if not raw:
                raise TableError(member.name, f"{member.name}.npy ends before its data does")
            left -= len(raw)
            block = np.frombuffer(raw, dtype=header.dtype)
            problem = values_problem(block)
            if problem:
                raise TableError(member.name, f"{member.name} {problem}")
            yield block


def read_npz_arrays(
    path, max_rows: int | None = None, max_bytes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """X and y of an NPZ file, read from the members that were checked."""
    with open_npz(path) as archive:
        members = npz_members(archive, max_rows, max_bytes)
        return tuple(_whole_array(archive, members[name]) for name in NPZ_ARRAYS)  # type: ignore[return-value]


def _whole_array(archive: zipfile.ZipFile, member: NpyMember) -> np.ndarray:
    header = member.header
    array = np.empty(header.count, dtype=header.dtype)
    filled = 0
    for block in npy_blocks(archive, member):
        array[filled : filled + len(block)] = block
        filled += len(block)
    return array.reshape(header.shape, order="F" if header.fortran_order else "C")


def _check_directory(handle: IO[bytes]) -> None:
    """Refuse an archive whose central directory lists other than two members, before zipfile reads it."""
    size = handle.seek(0, io.SEEK_END)
    tail_size = min(size, END_OF_DIRECTORY_SIZE + 0xFFFF)  # the record, then a comment of up to 64 KiB
    handle.seek(size - tail_size)
    tail = handle.read(tail_size)
    # As zipfile finds it: at the very end when there's no comment, else the last signature.
    at = len(tail) - END_OF_DIRECTORY_SIZE
    if at < 0 or tail[at : at + 4] != END_OF_DIRECTORY:
        at = tail.rfind(END_OF_DIRECTORY)
    if at < 0 or len(tail) - at < END_OF_DIRECTORY_SIZE:
        raise TableError("file", "not an NPZ file (numpy.savez writes one)")
    entries, directory_size = struct.unpack("<HI", tail[at + 10 : at + 16])
    if entries != 2 or directory_size > MAX_CENTRAL_DIRECTORY:
        raise TableError("file", f"an NPZ dataset holds exactly the arrays X and y; this one lists {entries} members")
    handle.seek(0)


def _members_message(names: list[str]) -> str:
    arrays = [name.removesuffix(".npy") for name in names]
    if "X.npy" in names and "y.npy" in names:
        others = [name for name in names if name not in ("X.npy", "y.npy")] or names
        shown = ", ".join(quoted(name, 40) for name in others[:5])
        return f"an NPZ dataset holds exactly the arrays X and y (members X.npy, y.npy); it also holds {shown}"
    held = ", ".join(quoted(name, 40) for name in sorted(arrays)[:5]) or "nothing"
    return f"an NPZ dataset needs arrays 'X' and 'y'; this one holds {held}"


def _npy_header(stream: IO[bytes], name: str) -> NpyHeader:
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as exc:
        raise TableError(name, f"{name}.npy is not a readable numpy array: {exc}") from None
    return NpyHeader(tuple(shape), dtype, bool(fortran_order), stream.tell())


def _check_member(name: str, info: zipfile.ZipInfo, header: NpyHeader, max_rows: int | None) -> None:
    dtype, shape = header.dtype, header.shape
    if any(size < 0 for size in shape):
        raise TableError(name, f"{name}.npy's header gives the shape {list(shape)}; sizes can't be negative")
    if dtype.hasobject or dtype.kind not in "biuf":
        raise TableError(
            name,
            f"{name} has dtype {dtype}; only numeric arrays are allowed (object arrays would need pickle, "
            "and nothing uploaded is ever unpickled)",
        )
    if shape and max_rows is not None and shape[0] > max_rows:
        raise TableError(name, f"{shape[0]} rows exceed the limit of {max_rows} (max_samples)")
    # The entry's size bounds what zipfile will ever unpack; it must be the header and the data, exactly.
    if info.file_size != header.offset + header.nbytes:
        raise TableError(
            name,
            f"{name}.npy holds {info.file_size - header.offset} bytes of data but its header (shape "
            f"{list(shape)}, {dtype}) says {header.nbytes}",
        )


def _check_shapes(x: tuple[int, ...], y: tuple[int, ...]) -> None:
    if len(x) < 2:
        raise TableError("X", f"X has shape {list(x)}; it needs one row per sample: (samples, features)")
    if x[0] == 0 or math.prod(x[1:]) == 0:
        raise TableError("X", f"X has shape {list(x)}; it needs at least one sample and one feature")
    if len(y) not in (1, 2) or y[0] != x[0] or (len(y) == 2 and y[1] == 0):
        raise TableError("y", f"y has shape {list(y)}; it needs ({x[0]},) or ({x[0]}, targets) to match X")
