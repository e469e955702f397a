"""The import/export file as bytes: JSON or NDJSON, read world by world with line numbers, written streamed.

JSON is one document ``{"worlds": [world, …]}``; it is parsed whole before
anything is imported (a truncated or broken document imports nothing), and
each world keeps the line its object starts on. NDJSON is one world per line,
read a line at a time, so a file of any size streams and a bad line is just
that world's failure. Neither reader knows what a world holds: that is the
models' concern (:mod:`scheduler_daemon.transfer.importer`).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

#: File name endings that mean NDJSON; ``.json`` means JSON; anything else (and stdin) is told by content.
NDJSON_SUFFIXES: Final = (".ndjson", ".jsonl")
STDIO: Final = "-"
#: A UTF-8 byte order mark, which Windows editors write at the start of a file.
_BOM: Final = b"\xef\xbb\xbf"


class FileFormat(enum.StrEnum):
    """The two layouts of the same worlds."""

    JSON = "json"
    NDJSON = "ndjson"


class TransferFileError(Exception):
    """The file cannot be opened, read or written; the message names it."""


class DocumentError(TransferFileError):
    """A JSON document that cannot be parsed (the message names the line); nothing of it is imported."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One world of the file: the line it starts on, its position among the worlds, its decoded JSON.

    ``problem`` says why the world's text could not be decoded (then ``data``
    is ``None``). ``done`` is how far the file has been read once this entry
    is handled, in the units of :attr:`ImportFile.total`.
    """

    line: int
    index: int
    data: Any
    done: int
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class ImportFile:
    """An open import file: its name for messages, its format, and its worlds in file order.

    ``total`` is the progress bar's end (bytes of an NDJSON file, worlds of a
    JSON document), ``None`` when unknown (NDJSON on stdin).
    """

    name: str
    format: FileFormat
    total: int | None
    entries: Iterator[Entry]


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: Strict JSON: NaN, Infinity and numbers that overflow to infinity are refused.
_DECODER: Final = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)


def _decode(text: str) -> Any:
    try:
        return _DECODER.decode(text)
    except RecursionError:  # the decoder recurses per level of nesting
        raise ValueError("nested too deeply") from None


def _json_message(exc: json.JSONDecodeError) -> str:
    # The decoder's messages expect a position after them ("Unterminated string starting at").
    return exc.msg.removesuffix(" at").removesuffix(" starting")


def _decode_error(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: {_json_message(exc)} (column {exc.colno})"
    return f"not valid JSON: {exc}"


def format_for(name: str, first_line: bytes | None) -> FileFormat:
    """The format by the file name's ending, else by its first non-blank line.

    A first line that is a whole JSON object other than ``{"worlds": …}`` is
    NDJSON; anything else (an opening brace alone, a pretty-printed document) is JSON.
    """
    lowered = name.lower()
    if lowered.endswith(NDJSON_SUFFIXES):
        return FileFormat.NDJSON
    if lowered.endswith(".json") or first_line is None:
        return FileFormat.JSON
    try:
        value = _decode(first_line.decode("utf-8"))
    except ValueError:
        return FileFormat.JSON
    return FileFormat.NDJSON if isinstance(value, dict) and "worlds" not in value else FileFormat.JSON


def _ndjson_entries(lines: Iterable[bytes]) -> Iterator[Entry]:
    done = index = 0
    for number, raw in enumerate(lines, start=1):
        done += len(raw)
        if not raw.strip():
            continue
        try:
            data, problem = _decode(raw.decode("utf-8")), None
        except UnicodeDecodeError as exc:
            data, problem = None, f"not valid UTF-8 (byte {exc.start + 1})"
        except ValueError as exc:
            data, problem = None, _decode_error(exc)
        yield Entry(number, index, data, done, problem)
        index += 1


class _Document:
    """A cursor over a JSON document's text that knows the line of any position it has reached."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self._line = 1
        self._line_pos = 0

    def line_at(self, pos: int) -> int:
        # Positions only move forward, so the newlines are counted once.
        self._line += self.text.count("\n", self._line_pos, pos)
        self._line_pos = pos
        return self._line

    def fail(self, message: str) -> DocumentError:
        return DocumentError(f"line {self.line_at(self.pos)}: {message}")

    def skip(self) -> str:
        """Skip whitespace; the next character ('' at the end)."""
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1
        return self.text[self.pos : self.pos + 1]

    def expect(self, chars: str, what: str) -> str:
        char = self.skip()
        if not char or char not in chars:
            raise self.fail(f"expected {what}, found {repr(char) if char else 'the end of the file'}")
        self.pos += 1
        return char

    def value(self) -> Any:
        try:
            value, self.pos = _DECODER.raw_decode(self.text, self.pos)
        except json.JSONDecodeError as exc:
            raise DocumentError(f"line {exc.lineno} column {exc.colno}: not valid JSON: {_json_message(exc)}") from None
        except ValueError as exc:
            raise self.fail(_decode_error(exc)) from None
        except RecursionError:
            raise self.fail("not valid JSON: nested too deeply") from None
        return value


def _json_entries(text: str) -> list[Entry]:
    """Every world of a ``{"worlds": [...]}`` document, each with the line its value starts on."""
    doc = _Document(text)
    doc.expect("{", 'a JSON object {"worlds": [...]}')
    entries: list[Entry] = []
    seen = False
    if doc.skip() == "}":
        raise doc.fail('the document has no "worlds" key')
    while True:
        doc.skip()
        key = doc.value()
        if key != "worlds":
            raise doc.fail(f'unknown key {json.dumps(key)}; the document is {{"worlds": [...]}}')
        if seen:
            raise doc.fail('"worlds" is given twice')
        seen = True
        doc.expect(":", "':'")
        doc.expect("[", 'an array of worlds after "worlds"')
        if doc.skip() == "]":
            doc.pos += 1
        else:
            while True:
                doc.skip()
                line = doc.line_at(doc.pos)
                entries.append(Entry(line, len(entries), doc.value(), len(entries) + 1))
                if doc.expect(",]", "',' or ']' after a world") == "]":
                    break
        if doc.expect(",}", "',' or '}'") == "}":
            break
    if doc.skip():
        raise doc.fail("unexpected data after the end of the document")
    return entries


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DocumentError(f"line {line}: not valid UTF-8") from None


def _read_lines(stream: IO[bytes], name: str) -> Iterator[bytes]:
    try:
        yield from stream
    except OSError as exc:
        raise TransferFileError(f"{name}: {exc.strerror or exc}") from None


def _without_bom(lines: Iterator[bytes]) -> Iterator[bytes]:
    # RFC 8259 lets a parser ignore a byte order mark; json refuses it.
    first = next(lines, None)
    if first is not None:
        yield first.removeprefix(_BOM)
        yield from lines


def _read_source(stream: IO[bytes], name: str, is_file: bool) -> ImportFile:
    lines = _without_bom(_read_lines(stream, name))
    head: list[bytes] = []
    first = None
    for raw in lines:
        head.append(raw)
        if raw.strip():
            first = raw
            break
    fmt = format_for(name, first)
    if fmt is FileFormat.NDJSON:
        size = os.fstat(stream.fileno()).st_size if is_file else None
        return ImportFile(name, fmt, size, _ndjson_entries(itertools.chain(head, lines)))
    try:
        entries = _json_entries(_utf8(b"".join(itertools.chain(head, lines))))
    except DocumentError as exc:
        raise DocumentError(f"{name}: {exc}") from None
    return ImportFile(name, fmt, len(entries), iter(entries))


@contextlib.contextmanager
def open_import_file(path: str) -> Iterator[ImportFile]:
    """Open ``path`` (``-``: stdin) for import.

    Raises :class:`TransferFileError` if it cannot be read, :class:`DocumentError`
    if it is a JSON document that cannot be parsed.
    """
    if path == STDIO:
        yield _read_source(sys.stdin.buffer, "<stdin>", is_file=False)
        return
    try:
        stream = Path(path).open("rb")  # noqa: SIM115 (closed below, after the entries are read)
    except OSError as exc:
        raise TransferFileError(f"{path}: {exc.strerror or exc}") from None
    with stream:
        yield _read_source(stream, path, is_file=Path(path).is_file())


class WorldWriter:
    """Writes worlds in either format, a piece at a time, so a world never has to be in memory whole.

    For each world: :meth:`begin_world` with its own fields, then
    :meth:`begin_list` and :meth:`item` for each list (NPCs, sessions), then
    :meth:`end_world`; :meth:`close` ends the document. JSON puts each world
    and each item on a line of its own (so an import's line numbers are
    useful); NDJSON puts each world on one line.
    """

    def __init__(self, out: IO[str], fmt: FileFormat) -> None:
        self._out = out
        self._ndjson = fmt is FileFormat.NDJSON
        self._worlds = 0
        self._items = 0
        self._members = False  # the open world object has a member already
        self._in_list = False
        if not self._ndjson:
            out.write('{"worlds": [')

    def _dumps(self, value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":") if self._ndjson else None)

    def _close_list(self) -> None:
        if self._in_list:
            self._out.write("]" if self._ndjson or not self._items else "\n  ]")
            self._in_list = False

    def begin_world(self, fields: dict[str, Any]) -> None:
        """Start a world with its own fields (not its lists)."""
        head = self._dumps(fields)[:-1]  # the object stays open for the lists
        self._out.write(head if self._ndjson else ("," if self._worlds else "") + "\n  " + head)
        self._members = bool(fields)

    def begin_list(self, key: str) -> None:
        """Start one of the world's lists (``npcs``, ``sessions``)."""
        self._close_list()
        if self._members:
            self._out.write("," if self._ndjson else ", ")
        self._out.write(self._dumps(key) + (":[" if self._ndjson else ": ["))
        self._members = self._in_list = True
        self._items = 0

    def item(self, value: Any) -> None:
        """One element of the current list."""
        sep = "," if self._items else ""
        self._out.write(sep + self._dumps(value) if self._ndjson else sep + "\n    " + self._dumps(value))
        self._items += 1

    def end_world(self) -> None:
        """Close the current world."""
        self._close_list()
        self._out.write("}\n" if self._ndjson else "}")
        self._worlds += 1

    def close(self) -> None:
        """End the document (JSON); the stream itself is the caller's."""
        if not self._ndjson:
            self._out.write("\n]}\n" if self._worlds else "]}\n")


@contextlib.contextmanager
def open_export_file(path: str) -> Iterator[IO[str]]:
    """A text stream for the export: stdout for ``-``, else a temporary file renamed to ``path`` on success.

    A failed export never leaves a half-written file under the requested name.
    Through a symlink, the file it points at is replaced (the link stays); a
    path that is not a regular file (a named pipe, ``/dev/stdout``) is written
    to as it is, never replaced. The file gets the mode a new file would (the
    umask), or keeps the one it had.
    """
    if path == STDIO:
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    if target.exists() and not target.is_file():
        yield from _write_in_place(target)
        return
    target = target.resolve()
    try:
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else _new_file_mode()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise TransferFileError(f"{path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            yield out
        Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_in_place(target: Path) -> Iterator[IO[str]]:
    try:
        out = target.open("w", encoding="utf-8")
    except OSError as exc:
        raise TransferFileError(f"{target}: {exc.strerror or exc}") from None
    with out:
        yield out


def _new_file_mode() -> int:
    # The umask can only be read by setting it; nothing else in this command creates files meanwhile.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask
