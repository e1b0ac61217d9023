"""Fault injection for tests (never imported by the package).

- :func:`dying_write_block`: the stream's last stage, whose worker dies right after it
  handed its rows to the writer, on the first attempt only (as a preempted node would):
  Ray then runs the task again with the same block.
- :class:`HalfWritingFS`: a pyarrow filesystem whose output streams write half of what
  they are given, then raise (a write that fails half-way).
"""

from __future__ import annotations

import os

#: Set by the test before the stream is built (the function travels by value).
MARKER: str = ""


def dying_write_block(batch, writer):
    summary = _hand_over(batch, writer)  # what raypipe's write_block does
    try:
        fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return summary  # a later attempt, or another block: go on
    os.close(fd)
    os._exit(1)  # the worker dies after the writer took the rows: Ray retries the task


def _hand_over(batch, writer):
    import ray

    return ray.get(writer.add.remote(batch))


class HalfWritingStream:
    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, data) -> int:
        data = memoryview(data)
        self.stream.write(data[: len(data) // 2])
        raise OSError("injected: the connection dropped half-way through the write")

    def close(self) -> None:
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # as pyarrow's own streams do, also after an error


class HalfWritingFS:
    """Delegates to a real filesystem; its output streams fail half-way."""

    def __init__(self, fs) -> None:
        self._fs = fs
        self.opened: list[str] = []  # paths written to (a final name must never be one)

    def open_output_stream(self, path, *args, **kwargs):
        self.opened.append(path)
        return HalfWritingStream(self._fs.open_output_stream(path, *args, **kwargs))

    def __getattr__(self, name):
        return getattr(self._fs, name)
