"""The import/export file format as bytes: JSON and NDJSON readers with line numbers, the streamed writer."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest

from scheduler_daemon.progress import ProgressBar
from scheduler_daemon.transfer.files import (
    DocumentError,
    FileFormat,
    TransferFileError,
    WorldWriter,
    format_for,
    open_export_file,
    open_import_file,
)


def _read(path: Path) -> tuple[FileFormat, int | None, list[tuple[int, int, object, str | None]]]:
    with open_import_file(str(path)) as source:
        return source.format, source.total, [(e.line, e.index, e.data, e.problem) for e in source.entries]


def test_json_document_gives_each_world_the_line_its_object_starts_on(tmp_path: Path) -> None:
    path = tmp_path / "worlds.json"
    path.write_text('{"worlds": [\n  {"name": "a"},\n\n  {\n    "name": "b"\n  }, {"name": "c"}\n]}\n')
    fmt, total, entries = _read(path)
    assert fmt is FileFormat.JSON
    assert total == 3
    assert entries == [(2, 0, {"name": "a"}, None), (4, 1, {"name": "b"}, None), (6, 2, {"name": "c"}, None)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"worlds": [\n  {"name": "a"},\n  {"name" "b"}\n]}',
            "line 3 column 11: not valid JSON: Expecting ':' delimiter",
        ),
        ('{"worlds": [\n  {"name": "a', "line 2 column 12: not valid JSON: Unterminated string"),
        ('{"worlds": [\n  {"name": "a"},\n  {"energy": NaN}\n]}', "line 3: not valid JSON: NaN is not valid JSON"),
        ('{"worlds": [\n  {"energy": 1e999}]}', "line 2: not valid JSON: number out of range: 1e999"),
        ('{"worlds": [\n  {"name": "a"}\n', "line 3: expected ',' or ']' after a world, found the end of the file"),
        ('[{"name": "a"}]', """line 1: expected a JSON object {"worlds": [...]}, found '['"""),
        ('{"world": []}', 'line 1: unknown key "world"; the document is {"worlds": [...]}'),
        ('{"worlds": [], "worlds": []}', 'line 1: "worlds" is given twice'),
        ("{}", 'line 1: the document has no "worlds" key'),
        ('{"worlds": []}\n{"worlds": []}', "line 2: unexpected data after the end of the document"),
    ],
)
def test_a_broken_json_document_is_refused_whole_with_its_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DocumentError) as info:
        _read(path)
    assert str(info.value) == f"{path}: {message}"


def test_ndjson_reports_each_bad_line_and_reads_on(tmp_path: Path) -> None:
    path = tmp_path / "worlds.ndjson"
    path.write_bytes(b'{"name": "a"}\n\nnot json\n{"name": "\xff"}\n{"e": -Infinity}\r\n{"name": "b"}')
    fmt, total, entries = _read(path)
    assert fmt is FileFormat.NDJSON
    assert total == path.stat().st_size
    assert entries == [
        (1, 0, {"name": "a"}, None),
        (3, 1, None, "not valid JSON: Expecting value (column 1)"),
        (4, 2, None, "not valid UTF-8 (byte 11)"),
        (5, 3, None, "not valid JSON: -Infinity is not valid JSON"),
        (6, 4, {"name": "b"}, None),
    ]


DEEP = b"[" * 100_000 + b"]" * 100_000  # deeper than the decoder's recursion limit


def test_json_nested_too_deeply_is_a_bad_line_not_a_crash(tmp_path: Path) -> None:
    # The decoder raised RecursionError, which no reader caught: a traceback instead of the line.
    path = tmp_path / "worlds.ndjson"
    path.write_bytes(b'{"name": "a"}\n' + DEEP + b'\n{"name": "b"}\n')
    assert _read(path)[2] == [
        (1, 0, {"name": "a"}, None),
        (2, 1, None, "not valid JSON: nested too deeply"),
        (3, 2, {"name": "b"}, None),
    ]
    document = tmp_path / "worlds.json"
    document.write_bytes(b'{"worlds": [\n  {"name": "a"},\n  {"meta": ' + DEEP + b"}\n]}")
    with pytest.raises(DocumentError, match=r"worlds\.json: line 3: not valid JSON: nested too deeply$"):
        _read(document)
    assert format_for("<stdin>", DEEP) is FileFormat.JSON


@pytest.mark.parametrize("name", ["worlds.ndjson", "worlds.json", "worlds.txt"])
def test_a_utf8_byte_order_mark_is_skipped(tmp_path: Path, name: str) -> None:
    # Windows editors write one; RFC 8259 lets a parser ignore it. It failed the first world, or the document.
    path = tmp_path / name
    text = '{"worlds": [\n  {"name": "a"}\n]}\n' if name.endswith(".json") else '{"name": "a"}\n{"name": "b"}\n'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    fmt, _, entries = _read(path)
    assert fmt is (FileFormat.JSON if name.endswith(".json") else FileFormat.NDJSON)
    first_line = 2 if fmt is FileFormat.JSON else 1
    assert entries[0] == (first_line, 0, {"name": "a"}, None)


@pytest.mark.parametrize(
    ("name", "first", "expected"),
    [
        ("x.ndjson", b"{", FileFormat.NDJSON),
        ("x.JSONL", b"{", FileFormat.NDJSON),
        ("x.json", b'{"name": "a"}', FileFormat.JSON),
        ("<stdin>", b'{"name": "a"}\n', FileFormat.NDJSON),
        ("<stdin>", b'{"worlds": []}\n', FileFormat.JSON),
        ("<stdin>", b'{"worlds": [\n', FileFormat.JSON),
        ("<stdin>", b"{\n", FileFormat.JSON),
        ("<stdin>", None, FileFormat.JSON),
    ],
)
def test_format_by_name_then_by_first_line(name: str, first: bytes | None, expected: FileFormat) -> None:
    assert format_for(name, first) is expected


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TransferFileError, match=r"missing\.json: No such file or directory") as info:
        _read(tmp_path / "missing.json")
    assert not isinstance(info.value, DocumentError)
    with pytest.raises(TransferFileError, match="Is a directory"):
        _read(tmp_path)


@pytest.mark.parametrize("fmt", list(FileFormat))
def test_the_writer_streams_worlds_that_read_back_equal(tmp_path: Path, fmt: FileFormat) -> None:
    worlds = [
        {"externalId": "w0", "name": "Ünïcode", "npcs": [], "sessions": [{"userId": "u"}]},
        {"name": "no lists"},
        {"externalId": "w2", "npcs": [{"externalId": f"n{i}", "energy": 1.5} for i in range(3)], "sessions": []},
    ]
    out = io.StringIO()
    writer = WorldWriter(out, fmt)
    for world in worlds:
        writer.begin_world({k: v for k, v in world.items() if not isinstance(v, list)})
        for key in ("npcs", "sessions"):
            if key in world:
                writer.begin_list(key)
                for item in world[key]:
                    writer.item(item)
        writer.end_world()
    writer.close()
    path = tmp_path / f"out.{fmt}"
    path.write_text(out.getvalue())
    read_fmt, _, entries = _read(path)
    assert read_fmt is fmt
    assert [data for _, _, data, _ in entries] == worlds
    if fmt is FileFormat.JSON:
        # One NPC per line: the document stays readable and diffable.
        assert out.getvalue().splitlines()[6] == '    {"externalId": "n0", "energy": 1.5},'
    else:
        assert len(out.getvalue().splitlines()) == 3


def test_an_empty_export_is_a_valid_document() -> None:
    for fmt, expected in ((FileFormat.JSON, {"worlds": []}), (FileFormat.NDJSON, None)):
        out = io.StringIO()
        WorldWriter(out, fmt).close()
        assert (json.loads(out.getvalue()) if out.getvalue() else None) == expected


def test_progress_bar_draws_in_place_and_keeps_messages_apart() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, "importing", 200, enabled=True)
    bar.update(50, "1 worlds, 10 NPCs")
    bar.print("line 3: worlds[1]: not valid JSON")
    bar.close()
    text = out.getvalue()
    first = "importing  25% [########----------------------] 1 worlds, 10 NPCs"
    assert text.startswith(first)
    # The message clears the bar, is written on a line of its own, and the bar is drawn again below it.
    assert f"{first}\r{' ' * len(first)}\rline 3: worlds[1]: not valid JSON\n{first}" in text
    assert text.endswith("\n")


def test_a_disabled_progress_bar_writes_only_messages() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, "importing", None, enabled=False)
    bar.update(10, "1 worlds")
    bar.print("line 1: problem")
    bar.close()
    assert out.getvalue() == "line 1: problem\n"


def test_export_to_a_named_pipe_writes_into_it(tmp_path: Path) -> None:
    # The export wrote a temporary file and renamed it over the pipe: the reader got nothing, and as
    # root `-o /dev/null` or `-o /dev/stdout` would have replaced the device node in /dev.
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # a reader is there: the export's open does not wait
    try:
        with open_export_file(str(pipe)) as out:
            out.write('{"worlds": []}\n')
        assert os.read(reader, 1000) == b'{"worlds": []}\n'
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(pipe.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_export_through_a_symlink_replaces_the_file_it_points_at(tmp_path: Path) -> None:
    target = tmp_path / "backups" / "2026-12-06.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    with open_export_file(str(link)) as out:
        out.write("new")
    assert link.is_symlink()
    assert target.read_text() == "new"


def test_an_exported_file_has_the_mode_of_any_new_file_or_keeps_its_own(tmp_path: Path) -> None:
    # mkstemp's 0600 made every export readable by its owner only, whatever the umask.
    old_umask = os.umask(0o022)
    try:
        with open_export_file(str(tmp_path / "new.json")) as out:
            out.write("{}")
        assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644
        kept = tmp_path / "kept.json"
        kept.write_text("old")
        kept.chmod(0o640)
        with open_export_file(str(kept)) as out:
            out.write("{}")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)
