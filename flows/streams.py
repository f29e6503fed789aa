"""Plain readers and writers of the file streams (JSON Lines), shared by the flow's sinks, the
model server, the simulator and batch training. Imports no Bytewax.

Each writer appends to its own file, named when it starts, and rotates by size; readers read
bytes, so no byte sequence can stop them.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from flows.events import DeadLetter, Event, encode_lines, parse_many

SUFFIX = ".jsonl"


def writer_name(tag: str) -> str:
    """A file name no other writer uses: start time first, so names sort in creation order."""
    host = socket.gethostname().replace("-", "_")[:32] or "host"
    return f"{time.time_ns()}-{host}-{os.getpid()}-{tag}"


class StreamWriter:
    """Appends JSON Lines to `<dir>/<name>[.<n>].jsonl`, starting a new file past `rotate_bytes`.

    Every `write` is one `write(2)` of whole lines, so a reader following the file never sees a
    line that is cut in two except at the end, and readers skip a last line with no newline.
    """

    def __init__(self, directory: Path | str, tag: str = "w", rotate_bytes: int = 64 << 20):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.base = writer_name(tag)
        self.rotate_bytes = rotate_bytes
        self._n = 0
        self._lock = threading.Lock()
        self._file = self._open()

    def _open(self):
        suffix = f".{self._n:05d}" if self._n else ""
        self.path = self.directory / f"{self.base}{suffix}{SUFFIX}"
        self._size = 0
        return open(self.path, "ab", buffering=0)

    def write(self, objs: Iterable[Event | DeadLetter | dict]) -> int:
        """Append a batch of objects; returns the bytes written."""
        objs = list(objs)
        if not objs:
            return 0
        data = encode_lines(objs)
        return self.write_raw(data)

    def write_raw(self, data: bytes) -> int:
        """Append already-encoded whole lines."""
        with self._lock:
            if self._size and self._size + len(data) > self.rotate_bytes:
                self._file.close()
                self._n += 1
                self._file = self._open()
            view = memoryview(data)
            while view:
                n = self._file.write(view)
                view = view[n:]
            self._size += len(data)
        return len(data)

    def flush(self) -> None:
        with self._lock:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            self._file.close()


def stream_files(directory: Path | str) -> list[Path]:
    """The stream's files, in name order (creation order for freshrec's writers)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX) and p.is_file())


def split_lines(chunk: bytes, final: bool) -> tuple[list[bytes], int]:
    """Whole lines in `chunk` and how many bytes they use; a last line without a newline counts
    only when `final` (the input is complete)."""
    end = chunk.rfind(b"\n") + 1
    lines = chunk[:end].split(b"\n")
    lines.pop()  # after the last newline
    used = end
    if final and end < len(chunk):
        lines.append(chunk[end:])
        used = len(chunk)
    # An empty line (of a CRLF file too) is framing; a line of other whitespace is a message that
    # is not JSON, and goes to the dead letters like any other.
    return [ln for ln in lines if ln and ln != b"\r"], used


def read_lines(path: Path | str, chunk_bytes: int = 1 << 20) -> Iterator[list[bytes]]:
    """The file's lines in chunks, as bytes (empty lines skipped)."""
    with open(path, "rb") as f:
        rest = b""
        while True:
            chunk = f.read(chunk_bytes)
            if not chunk:
                if rest and rest != b"\r":
                    yield [rest]
                return
            lines, used = split_lines(rest + chunk, final=False)
            rest = (rest + chunk)[used:]
            if lines:
                yield lines


def read_stream(directory: Path | str, stream: str, arrival: float | None = None
                ) -> Iterator[tuple[list[Event], list[DeadLetter]]]:
    """Parse every file of a stream in name order, batch by batch."""
    for path in stream_files(directory):
        for lines in read_lines(path):
            yield parse_many(stream, lines, time.time() if arrival is None else arrival,
                             max_future_s=float("inf"))
