"""The ``--workers`` port's whole-answer GET from a worker's admin socket (``proxy.fetch``), on real Unix sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

from scheduler_daemon.http.proxy import fetch


async def _worker_answering(path: Path, answer: bytes) -> asyncio.Server:
    """A stand-in worker: reads the request head, writes ``answer``, closes the connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(serve, path=str(path))


async def test_a_worker_dying_inside_its_answer_is_a_503_not_an_error(tmp_path: Path) -> None:
    # A worker killed (watchdog, OOM) while it sends /metrics: the scrape leaves it out instead of failing.
    cut = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1000\r\n\r\nworldsched_ticks_tot"
    async with await _worker_answering(tmp_path / "w.sock", cut):
        answer = await fetch(str(tmp_path / "w.sock"), "/metrics", wait_seconds=5)
    assert (answer.status, answer.body) == (503, b"")


async def test_a_whole_answer_is_returned(tmp_path: Path) -> None:
    whole = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 4\r\n\r\nup 1"
    async with await _worker_answering(tmp_path / "w.sock", whole):
        answer = await fetch(str(tmp_path / "w.sock"), "/metrics", wait_seconds=5)
    assert (answer.status, answer.content_type, answer.body) == (200, b"text/plain", b"up 1")
